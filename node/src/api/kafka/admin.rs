//! Topic administration for Kafka clients: CreateTopics, DeleteTopics, CreatePartitions,
//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs, over the topic service. A topic
//! created here is an ordinary Eddy topic.
//!
//! Topic settings keep Kafka's names on this side ([`KAFKA_CONFIGS`]); the ones Eddy names
//! differently are mapped (`max.message.bytes` is `max.event.bytes`, `message.timestamp.type`
//! `CreateTime`/`LogAppendTime` is `timestamp.type` `create`/`log-append`). `cleanup.policy` is
//! `delete` and cannot be changed (Eddy has no compaction); any other key is refused with
//! `INVALID_CONFIG`, naming it.

use std::collections::BTreeMap;
use std::time::Duration;

use kafka_protocol::messages::AlterConfigsRequest;
use kafka_protocol::messages::AlterConfigsResponse;
use kafka_protocol::messages::CreatePartitionsRequest;
use kafka_protocol::messages::CreatePartitionsResponse;
use kafka_protocol::messages::CreateTopicsRequest;
use kafka_protocol::messages::CreateTopicsResponse;
use kafka_protocol::messages::DeleteTopicsRequest;
use kafka_protocol::messages::DeleteTopicsResponse;
use kafka_protocol::messages::DescribeConfigsRequest;
use kafka_protocol::messages::DescribeConfigsResponse;
use kafka_protocol::messages::IncrementalAlterConfigsRequest;
use kafka_protocol::messages::IncrementalAlterConfigsResponse;
use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::CreatableTopicConfigs;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::DescribeConfigsResourceResult;
use kafka_protocol::messages::describe_configs_response::DescribeConfigsResult;
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalResponse;
use kafka_protocol::protocol::StrBytes;

use super::codes;
use crate::error::BrokerError;
use crate::limits;
use crate::meta::state::TopicRecord;
use crate::security::Caller;
use crate::security::acl::Operation;
use crate::security::acl::ResourceType;
use crate::service::BrokerState;
use crate::service::topics::NewTopic;
use eddy_raft::NodeId;

/// The topic settings Kafka clients can read and set, by Kafka's names.
pub const KAFKA_CONFIGS: &[&str] = &[
    "cleanup.policy",
    "max.message.bytes",
    "message.timestamp.type",
    "retention.bytes",
    "retention.ms",
    "segment.bytes",
];

/// How long an admin request waits for this node's view to show its own write.
const VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Kafka's resource types in config requests.
const TOPIC: i8 = 2;
const BROKER: i8 = 4;
/// Kafka's config sources and types (DescribeConfigs v1 and later, v3 and later).
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;
/// A broker setting from the node's config file (Kafka's STATIC_BROKER_CONFIG).
const SOURCE_STATIC_BROKER: i8 = 4;
const TYPE_BOOLEAN: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// A Kafka setting as Eddy's (`None`: accepted and nothing to store), or why it is refused.
pub fn to_eddy(key: &str, value: &str) -> Result<Option<(&'static str, String)>, String> {
    match key {
        "retention.ms" => Ok(Some(("retention.ms", value.to_owned()))),
        "retention.bytes" => Ok(Some(("retention.bytes", value.to_owned()))),
        "segment.bytes" => Ok(Some(("segment.bytes", value.to_owned()))),
        "max.message.bytes" => Ok(Some(("max.event.bytes", value.to_owned()))),
        "message.timestamp.type" => match value {
            "CreateTime" => Ok(Some(("timestamp.type", "create".into()))),
            "LogAppendTime" => Ok(Some(("timestamp.type", "log-append".into()))),
            other => Err(format!("message.timestamp.type: {other:?} is not CreateTime or LogAppendTime")),
        },
        "cleanup.policy" if value == "delete" => Ok(None),
        "cleanup.policy" => {
            Err(format!("cleanup.policy: {value:?} is not supported; Eddy topics are \"delete\""))
        }
        other => {
            Err(format!("{other:?} is not a topic setting Eddy has; known: {}", KAFKA_CONFIGS.join(", ")))
        }
    }
}

/// The Kafka settings of a topic: (name, value, set on the topic, Kafka type).
fn from_eddy(t: &TopicRecord, broker: &BrokerState) -> Vec<(&'static str, String, bool, i8)> {
    let get = |k: &str| t.config.get(k).cloned();
    let mut out = vec![
        ("cleanup.policy", "delete".to_owned(), false, TYPE_STRING),
        (
            "max.message.bytes",
            get("max.event.bytes").unwrap_or_else(|| broker.limits.max_event_bytes.to_string()),
            t.config.contains_key("max.event.bytes"),
            TYPE_INT,
        ),
        (
            "message.timestamp.type",
            if t.log_append_time() { "LogAppendTime" } else { "CreateTime" }.to_owned(),
            t.config.contains_key("timestamp.type"),
            TYPE_STRING,
        ),
        (
            "retention.bytes",
            get("retention.bytes").unwrap_or_else(|| "-1".into()),
            t.config.contains_key("retention.bytes"),
            TYPE_LONG,
        ),
        (
            "retention.ms",
            get("retention.ms").unwrap_or_else(|| "-1".into()),
            t.config.contains_key("retention.ms"),
            TYPE_LONG,
        ),
    ];
    // The default segment size is the node's; only a topic's own is known here.
    if let Some(v) = get("segment.bytes") {
        out.push(("segment.bytes", v, true, TYPE_INT));
    }
    out
}

/// Kafka settings as Eddy's, or the first refusal.
fn configs_to_eddy<'a>(
    configs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in configs {
        let v = v.ok_or_else(|| format!("{k}: a value is required"))?;
        if let Some((ek, ev)) = to_eddy(k, v)? {
            out.insert(ek.to_owned(), ev);
        }
    }
    limits::validate_topic_config(&out).map_err(|e| e.to_string())?;
    Ok(out)
}

pub async fn create_topics(
    broker: &BrokerState,
    caller: &Caller,
    settings: &super::Settings,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let nodes = super::metadata::members(broker);
    let mut out = CreateTopicsResponse::default();
    // The request's timeout bounds the wait for leaders of all its topics together.
    let leaders_by = tokio::time::Instant::now()
        + Duration::from_millis(u64::try_from(req.timeout_ms).unwrap_or(0)).min(LEADERS_WAIT);
    for t in req.topics {
        let mut r = CreatableTopicResult::default();
        let name = t.name.to_string();
        // -1 asks for the broker's defaults (KIP-464): `default_partitions`, and
        // `default_replication_factor` replicas or as many as there are nodes.
        let partitions =
            if t.num_partitions == -1 { settings.default_partitions as i32 } else { t.num_partitions };
        let replication = if t.replication_factor == -1 {
            settings.replication_for(nodes) as i32
        } else {
            i32::from(t.replication_factor)
        };
        let allowed = caller.allows(Operation::Create, ResourceType::Cluster, "")
            || caller.check(Operation::Create, ResourceType::Topic, &name).is_ok();
        let checked = if !allowed {
            Err((
                codes::TOPIC_AUTHORIZATION_FAILED,
                format!("{} may not create topic \"{name}\"", caller.principal),
            ))
        } else if let Err(e) = limits::validate_topic_name("name", &name) {
            Err((codes::INVALID_TOPIC_EXCEPTION, e.to_string()))
        } else if !t.assignments.is_empty() {
            Err((
                codes::INVALID_REQUEST,
                "manual replica assignments are not supported; Eddy places replicas".into(),
            ))
        } else if !(1..=limits::PARTITIONS_MAX as i32).contains(&partitions) {
            Err((
                codes::INVALID_PARTITIONS,
                format!("{partitions} partitions: a topic has 1 to {}", limits::PARTITIONS_MAX),
            ))
        } else if !(1..=limits::REPLICATION_FACTOR_MAX as i32).contains(&replication) {
            Err((
                codes::INVALID_REPLICATION_FACTOR,
                format!(
                    "replication factor {replication}: it must be 1 to {}",
                    limits::REPLICATION_FACTOR_MAX
                ),
            ))
        } else {
            configs_to_eddy(t.configs.iter().map(|c| (c.name.as_str(), c.value.as_ref().map(|v| v.as_str()))))
                .map_err(|e| (codes::INVALID_CONFIG, e))
        };
        let result = match checked {
            Err(e) => Err(e),
            Ok(_) if req.validate_only => Ok(None),
            Ok(config) => broker
                .create_topic(NewTopic {
                    name: name.clone(),
                    partitions: partitions as u32,
                    replication_factor: replication as u32,
                    config,
                })
                .await
                .map(Some)
                .map_err(|e| (admin_code(&e), e.to_string())),
        };
        if matches!(result, Ok(Some(_))) {
            broker.await_view(VIEW_WAIT, |v| v.state.topics.contains_key(&name)).await;
            // As Kafka's controller does within the request's timeout: answer once every
            // partition has a leader, so that the client's next Metadata shows them.
            await_leaders(broker, &name, leaders_by.saturating_duration_since(tokio::time::Instant::now()))
                .await;
        }
        r.name = t.name;
        match result {
            Ok(created) => {
                r.error_message = None;
                if version >= 5 {
                    r.num_partitions = partitions;
                    r.replication_factor = replication as i16;
                    r.configs = created.map(|t| {
                        from_eddy(&t, broker)
                            .into_iter()
                            .map(|(name, value, set, _)| {
                                let mut c = CreatableTopicConfigs::default();
                                c.name = s(name);
                                c.value = Some(s(value));
                                c.config_source = if set { SOURCE_TOPIC } else { SOURCE_DEFAULT };
                                c
                            })
                            .collect()
                    });
                }
            }
            Err((code, message)) => {
                r.error_code = code;
                r.error_message = Some(s(message));
            }
        }
        out.topics.push(r);
    }
    out
}

/// The longest a CreateTopics waits for its partitions' leaders (less if the request says so).
pub const LEADERS_WAIT: Duration = Duration::from_secs(10);

/// Waits up to `wait` until the cluster status shows a leader for every partition of `topic`.
pub async fn await_leaders(broker: &BrokerState, topic: &str, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let led = broker.cluster_metadata(&[topic.to_owned()]).await.is_ok_and(|m| {
            m.topics.iter().all(|t| {
                t.partitions
                    .iter()
                    .all(|p| m.status.partitions.get(&p.group_id).is_some_and(|s| s.leader.is_some()))
            })
        });
        if led || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Admin errors by Kafka's codes where they differ from the data path's.
fn admin_code(e: &BrokerError) -> i16 {
    match e {
        BrokerError::InvalidArgument(_) => codes::INVALID_CONFIG,
        e => codes::code(e),
    }
}

pub async fn delete_topics(
    broker: &BrokerState,
    caller: &Caller,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let names: Vec<Option<TopicName>> = if version >= 6 {
        req.topics.into_iter().map(|t| t.name).collect()
    } else {
        req.topic_names.into_iter().map(Some).collect()
    };
    let mut out = DeleteTopicsResponse::default();
    for name in names {
        let mut r = DeletableTopicResult::default();
        match &name {
            Some(n) => match async {
                caller.check(Operation::Delete, ResourceType::Topic, n.as_str())?;
                broker.delete_topic(n.as_str()).await
            }
            .await
            {
                Ok(()) => {
                    broker.await_view(VIEW_WAIT, |v| !v.state.topics.contains_key(n.as_str())).await;
                }
                Err(e) => {
                    r.error_code = codes::code(&e);
                    if version >= 5 {
                        r.error_message = Some(s(e.to_string()));
                    }
                }
            },
            None => r.error_code = codes::UNKNOWN_TOPIC_ID,
        }
        r.name = name;
        out.responses.push(r);
    }
    out
}

/// CreatePartitions: Kafka's `count` is the new total.
pub async fn create_partitions(
    broker: &BrokerState,
    caller: &Caller,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut out = CreatePartitionsResponse::default();
    for t in req.topics {
        let mut r = CreatePartitionsTopicResult::default();
        let topic = caller
            .check(Operation::Alter, ResourceType::Topic, t.name.as_str())
            .and_then(|()| broker.topic(t.name.as_str()));
        let result = match topic {
            Err(e) => Err((codes::code(&e), e.to_string())),
            Ok(_) if t.assignments.as_ref().is_some_and(|a| !a.is_empty()) => {
                Err((codes::INVALID_REQUEST, "manual replica assignments are not supported".to_owned()))
            }
            Ok(topic) => {
                let have = topic.partitions.len() as i32;
                if t.count <= have {
                    Err((
                        codes::INVALID_PARTITIONS,
                        format!("topic {} has {have} partitions; ask for more", t.name.as_str()),
                    ))
                } else if req.validate_only {
                    Ok(())
                } else {
                    let name = t.name.as_str();
                    let added = broker
                        .add_partitions(name, (t.count - have) as u32)
                        .await
                        .map_err(|e| (admin_code(&e), e.to_string()));
                    if added.is_ok() {
                        let count = t.count as usize;
                        broker
                            .await_view(VIEW_WAIT, |v| {
                                v.state.topics.get(name).is_some_and(|t| t.partitions.len() >= count)
                            })
                            .await;
                    }
                    added.map(|_| ())
                }
            }
        };
        r.name = t.name;
        match result {
            Ok(()) => r.error_message = None,
            Err((code, message)) => {
                r.error_code = code;
                r.error_message = Some(s(message));
            }
        }
        out.results.push(r);
    }
    out
}

pub fn describe_configs(
    broker: &BrokerState,
    caller: &Caller,
    settings: &super::Settings,
    req: DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResponse {
    let mut out = DescribeConfigsResponse::default();
    for res in req.resources {
        let mut r = DescribeConfigsResult::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        r.error_message = None;
        let (kind, name) = match res.resource_type {
            TOPIC => (ResourceType::Topic, res.resource_name.as_str()),
            _ => (ResourceType::Cluster, ""),
        };
        if let Err(e) = caller.check(Operation::Describe, kind, name) {
            r.error_code = if kind == ResourceType::Topic {
                codes::TOPIC_AUTHORIZATION_FAILED
            } else {
                codes::CLUSTER_AUTHORIZATION_FAILED
            };
            r.error_message = Some(s(e.to_string()));
            out.results.push(r);
            continue;
        }
        match res.resource_type {
            TOPIC => match broker.topic(res.resource_name.as_str()) {
                Ok(t) => {
                    r.configs = from_eddy(&t, broker)
                        .into_iter()
                        .filter(|(name, ..)| {
                            res.configuration_keys
                                .as_ref()
                                .is_none_or(|keys| keys.iter().any(|k| k.as_str() == *name))
                        })
                        .map(|(name, value, set, kind)| {
                            let mut c = DescribeConfigsResourceResult::default();
                            c.name = s(name);
                            c.value = Some(s(value));
                            c.config_source = if set { SOURCE_TOPIC } else { SOURCE_DEFAULT };
                            if version >= 3 {
                                c.config_type = kind;
                                c.documentation = None;
                            }
                            c
                        })
                        .collect();
                }
                Err(e) => {
                    r.error_code = codes::code(&e);
                    r.error_message = Some(s(e.to_string()));
                }
            },
            BROKER => match broker_configs(broker, settings, res.resource_name.as_str()) {
                Ok(configs) => {
                    r.configs = configs
                        .into_iter()
                        .filter(|(name, ..)| {
                            res.configuration_keys
                                .as_ref()
                                .is_none_or(|keys| keys.iter().any(|k| k.as_str() == *name))
                        })
                        .map(|(name, value, kind)| {
                            let mut c = DescribeConfigsResourceResult::default();
                            c.name = s(name);
                            c.value = Some(s(value));
                            c.read_only = true;
                            c.config_source = SOURCE_STATIC_BROKER;
                            if version >= 3 {
                                c.config_type = kind;
                                c.documentation = None;
                            }
                            c
                        })
                        .collect();
                }
                Err(message) => {
                    r.error_code = codes::INVALID_REQUEST;
                    r.error_message = Some(s(message));
                }
            },
            other => {
                r.error_code = codes::INVALID_REQUEST;
                r.error_message = Some(s(format!("resource type {other} is not supported")));
            }
        }
        out.results.push(r);
    }
    out
}

/// A broker's settings under Kafka's names, read-only: its id and rack (from the node registry,
/// for any node), and for this node the Kafka listener's topic defaults.
fn broker_configs(
    broker: &BrokerState,
    settings: &super::Settings,
    name: &str,
) -> Result<Vec<(&'static str, String, i8)>, String> {
    let id: NodeId =
        name.parse().map_err(|_| format!("broker {name:?}: a broker is named by its node id"))?;
    let view = broker.meta.view();
    let node =
        view.state.nodes.get(&id).ok_or_else(|| format!("broker {id} is not a node of this cluster"))?;
    let mut out = vec![("broker.id", id.to_string(), TYPE_INT)];
    if let Some(rack) = &node.rack {
        out.push(("broker.rack", rack.clone(), TYPE_STRING));
    }
    if id == broker.me {
        out.push(("auto.create.topics.enable", settings.auto_create_topics.to_string(), TYPE_BOOLEAN));
        out.push(("num.partitions", settings.default_partitions.to_string(), TYPE_INT));
        out.push(("default.replication.factor", settings.default_replication_factor.to_string(), TYPE_INT));
        out.push(("message.max.bytes", broker.limits.max_event_bytes.to_string(), TYPE_INT));
    }
    Ok(out)
}

/// The changes of one AlterConfigs / IncrementalAlterConfigs resource: Kafka key, and its new
/// value (`None`: back to the default).
pub async fn alter_topic(
    broker: &BrokerState,
    topic: &str,
    changes: Vec<(String, Option<String>)>,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let t = broker.topic(topic).map_err(|e| (codes::code(&e), e.to_string()))?;
    let mut set: Vec<(String, Option<String>)> = Vec::new();
    for (k, v) in changes {
        let v = match v {
            Some(v) => Some(v),
            // Back to the default: the value Eddy uses when the key is not set.
            None => match k.as_str() {
                "retention.ms" | "retention.bytes" => Some("-1".into()),
                "message.timestamp.type" => Some("CreateTime".into()),
                "max.message.bytes" => Some(broker.limits.max_event_bytes.to_string()),
                "cleanup.policy" => Some("delete".into()),
                other => {
                    return Err((
                        codes::INVALID_CONFIG,
                        format!("{other} cannot be reset here; set a value"),
                    ));
                }
            },
        };
        set.push((k, v));
    }
    let config = configs_to_eddy(set.iter().map(|(k, v)| (k.as_str(), v.as_deref())))
        .map_err(|e| (codes::INVALID_CONFIG, e))?;
    if validate_only || config.is_empty() {
        return Ok(());
    }
    let after =
        broker.alter_topic_config(&t.name, config).await.map_err(|e| (admin_code(&e), e.to_string()))?;
    broker.await_view(VIEW_WAIT, |v| v.state.topics.get(&t.name).is_some_and(|t| t.config == after)).await;
    Ok(())
}

/// Alter on the resource: the topic, or (brokers) the cluster.
fn may_alter(caller: &Caller, resource_type: i8, name: &str) -> Result<(), (i16, String)> {
    let (kind, code) = match resource_type {
        TOPIC => (ResourceType::Topic, codes::TOPIC_AUTHORIZATION_FAILED),
        _ => (ResourceType::Cluster, codes::CLUSTER_AUTHORIZATION_FAILED),
    };
    caller.check(Operation::Alter, kind, name).map_err(|e| (code, e.to_string()))
}

pub async fn alter_configs(
    broker: &BrokerState,
    caller: &Caller,
    req: AlterConfigsRequest,
) -> AlterConfigsResponse {
    let mut out = AlterConfigsResponse::default();
    for res in req.resources {
        let given: Vec<(String, Option<String>)> = res
            .configs
            .iter()
            .map(|c| (c.name.to_string(), c.value.as_ref().map(|v| v.to_string())))
            .collect();
        let result = match res.resource_type {
            _ if let Err(e) = may_alter(caller, res.resource_type, res.resource_name.as_str()) => Err(e),
            TOPIC => {
                let topic = broker.topic(res.resource_name.as_str()).ok();
                let changes = full_replacement(topic.as_deref(), &given);
                alter_topic(broker, res.resource_name.as_str(), changes, req.validate_only).await
            }
            other => Err((codes::INVALID_REQUEST, format!("resource type {other} cannot be altered here"))),
        };
        out.responses.push(alter_response(res.resource_type, res.resource_name, result));
    }
    out
}

pub async fn incremental_alter_configs(
    broker: &BrokerState,
    caller: &Caller,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut out = IncrementalAlterConfigsResponse::default();
    for res in req.resources {
        let mut changes = Vec::new();
        let mut refused = None;
        for c in &res.configs {
            match c.config_operation {
                0 => changes.push((
                    c.name.to_string(),
                    Some(c.value.as_ref().map(|v| v.to_string()).unwrap_or_default()),
                )),
                1 => changes.push((c.name.to_string(), None)),
                op => {
                    refused = Some((
                        codes::INVALID_CONFIG,
                        format!(
                            "{}: operation {op} (append/subtract) applies to lists; Eddy's settings are not",
                            c.name.as_str()
                        ),
                    ));
                }
            }
        }
        let refused = may_alter(caller, res.resource_type, res.resource_name.as_str()).err().or(refused);
        let result = match (refused, res.resource_type) {
            (Some(e), _) => Err(e),
            (None, TOPIC) => {
                alter_topic(broker, res.resource_name.as_str(), changes, req.validate_only).await
            }
            (None, other) => {
                Err((codes::INVALID_REQUEST, format!("resource type {other} cannot be altered here")))
            }
        };
        let r = alter_response(res.resource_type, res.resource_name, result);
        let mut ir = IncrementalResponse::default();
        ir.error_code = r.error_code;
        ir.error_message = r.error_message;
        ir.resource_type = r.resource_type;
        ir.resource_name = r.resource_name;
        out.responses.push(ir);
    }
    out
}

fn alter_response(
    resource_type: i8,
    name: StrBytes,
    result: Result<(), (i16, String)>,
) -> AlterConfigsResourceResponse {
    let mut r = AlterConfigsResourceResponse::default();
    r.resource_type = resource_type;
    r.resource_name = name;
    match result {
        Ok(()) => r.error_message = None,
        Err((code, message)) => {
            r.error_code = code;
            r.error_message = Some(s(message));
        }
    }
    r
}

/// AlterConfigs replaces a topic's whole configuration: keys it does not name go back to their
/// defaults.
pub fn full_replacement(
    t: Option<&TopicRecord>,
    given: &[(String, Option<String>)],
) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = given.to_vec();
    if let Some(t) = t {
        for (eddy, kafka) in [
            ("retention.ms", "retention.ms"),
            ("retention.bytes", "retention.bytes"),
            ("max.event.bytes", "max.message.bytes"),
            ("timestamp.type", "message.timestamp.type"),
        ] {
            if t.config.contains_key(eddy) && !given.iter().any(|(k, _)| k == kafka) {
                out.push((kafka.to_owned(), None));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_settings_map_to_eddys_and_unknown_ones_are_named() {
        assert_eq!(to_eddy("max.message.bytes", "1000"), Ok(Some(("max.event.bytes", "1000".into()))));
        assert_eq!(
            to_eddy("message.timestamp.type", "LogAppendTime"),
            Ok(Some(("timestamp.type", "log-append".into())))
        );
        assert_eq!(to_eddy("cleanup.policy", "delete"), Ok(None));
        assert!(to_eddy("cleanup.policy", "compact").is_err_and(|e| e.contains("compact")));
        assert!(to_eddy("min.insync.replicas", "2").is_err_and(|e| e.contains("min.insync.replicas")));
        let c = configs_to_eddy([
            ("retention.ms", Some("60000")),
            ("message.timestamp.type", Some("CreateTime")),
        ])
        .expect("valid");
        assert_eq!(c.get("retention.ms").map(String::as_str), Some("60000"));
        assert_eq!(c.get("timestamp.type").map(String::as_str), Some("create"));
        assert!(configs_to_eddy([("retention.ms", Some("soon"))]).is_err(), "Eddy's own validation applies");
        assert!(configs_to_eddy([("retention.ms", None)]).is_err(), "a value is required");
    }
}
