//! Acceptance 4 of issue 11: every method of `eddy.v1.Broker`, `Admin`, `Groups` and `Raft`
//! (and health), and every Kafka API, called by a user with no binding, with literal allows of
//! exactly what the method needs, with prefixed allows, with a deny over those allows, by a
//! superuser, and by nobody. Each call names resources that do not exist (or is invalid past
//! its authorization, or only validated), so an allowed call changes nothing; what is checked
//! is whether authorization let it through. Listings are checked to be filtered.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use eddy_proto::v1 as pb;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use kafka_conn::Conn;
use tonic::transport::Channel;

use crate::kafka_conn;

/// A topic and a group that do not exist, and the prefixes that cover them.
const TOPIC: &str = "orders.none";
const GROUP: &str = "g.none";
const TOPIC_PREFIX: &str = "orders.";
const GROUP_PREFIX: &str = "g.";

/// What a method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Anyone.
    Public,
    /// Any authenticated user; nothing named (a producer id; listings, which are filtered).
    AnyUser,
    /// Only nodes: every user is refused, the superuser too.
    Nodes,
    /// These (resource type, operation) pairs, on TOPIC, GROUP or the cluster.
    Bindings(&'static [(&'static str, &'static str)]),
}

const METHODS: &[(&str, Need)] = &[
    ("Broker/CreateTopic", Need::Bindings(&[("topic", "create")])),
    ("Broker/ListTopics", Need::AnyUser),
    ("Broker/DescribeTopic", Need::Bindings(&[("topic", "describe")])),
    ("Broker/Metadata", Need::Bindings(&[("topic", "describe")])),
    ("Broker/InitProducer", Need::AnyUser),
    ("Broker/Produce", Need::Bindings(&[("topic", "write")])),
    ("Broker/Fetch", Need::Bindings(&[("topic", "read")])),
    ("Broker/NodeStatus", Need::Bindings(&[("cluster", "describe")])),
    ("Broker/ListOffsets", Need::Bindings(&[("topic", "describe")])),
    ("Admin/TransferLeadership", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/ListNodes", Need::Bindings(&[("cluster", "describe")])),
    ("Admin/SetNodeState", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/ClusterHealth", Need::Bindings(&[("cluster", "describe")])),
    ("Admin/BalanceLeaders", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/DeleteTopic", Need::Bindings(&[("topic", "delete")])),
    ("Admin/AlterTopicConfig", Need::Bindings(&[("topic", "alter")])),
    ("Admin/AddPartitions", Need::Bindings(&[("topic", "alter")])),
    ("Admin/MovePartition", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/ListMoves", Need::Bindings(&[("cluster", "describe")])),
    ("Admin/CancelMove", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/Join", Need::Nodes),
    ("Admin/BalanceLocal", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/CreateUser", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/DeleteUser", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/ListUsers", Need::Bindings(&[("cluster", "describe")])),
    ("Admin/AddAcl", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/RemoveAcl", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/ListAcls", Need::Bindings(&[("cluster", "describe")])),
    ("Admin/WhoAmI", Need::Public),
    ("Admin/SetQuota", Need::Bindings(&[("cluster", "alter")])),
    ("Admin/ListQuotas", Need::Bindings(&[("cluster", "describe")])),
    ("Groups/JoinGroup", Need::Bindings(&[("group", "read"), ("topic", "describe")])),
    ("Groups/Heartbeat", Need::Bindings(&[("group", "read")])),
    ("Groups/LeaveGroup", Need::Bindings(&[("group", "read")])),
    ("Groups/CommitOffsets", Need::Bindings(&[("group", "read"), ("topic", "read")])),
    ("Groups/FetchOffsets", Need::Bindings(&[("group", "describe")])),
    ("Groups/ListGroups", Need::AnyUser),
    ("Groups/DescribeGroup", Need::Bindings(&[("group", "describe")])),
    ("Groups/ResetOffsets", Need::Bindings(&[("group", "read"), ("topic", "read")])),
    ("Groups/DeleteGroup", Need::Bindings(&[("group", "delete")])),
    ("Raft/Vote", Need::Nodes),
    ("Raft/PreVote", Need::Nodes),
    ("Raft/AppendEntries", Need::Nodes),
    ("Raft/InstallSnapshot", Need::Nodes),
    ("Raft/TransferLeader", Need::Nodes),
    ("Raft/ForwardMeta", Need::Nodes),
    ("Raft/Heartbeat", Need::Nodes),
    ("Raft/Members", Need::Nodes),
    ("Health/Check", Need::Public),
];

fn req<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(10));
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("ascii"));
    }
    r
}

/// Calls `method` with a request that names TOPIC and GROUP and changes nothing.
async fn call(ch: &Channel, token: Option<&str>, method: &str) -> Result<(), tonic::Status> {
    use pb::admin_client::AdminClient;
    use pb::broker_client::BrokerClient;
    use pb::groups_client::GroupsClient;
    use pb::raft_client::RaftClient;
    let (b, a, g, r) = (
        BrokerClient::new(ch.clone()),
        AdminClient::new(ch.clone()),
        GroupsClient::new(ch.clone()),
        RaftClient::new(ch.clone()),
    );
    let t = || TOPIC.to_owned();
    let offsets = || vec![pb::PartitionOffset { topic: t(), partition: 0, offset: 1 }];
    // An invalid binding: authorization comes first, then the field is refused.
    let bad_binding =
        || pb::AclBinding { principal: "User:x".into(), operation: "fly".into(), ..Default::default() };
    macro_rules! go {
        ($client:ident, $m:ident, $msg:expr) => {
            $client.clone().$m(req($msg, token)).await.map(drop)
        };
    }
    match method {
        // Zero partitions: refused as invalid once allowed.
        "Broker/CreateTopic" => go!(
            b,
            create_topic,
            pb::CreateTopicRequest { name: t(), partitions: 0, replication_factor: 1, ..Default::default() }
        ),
        "Broker/ListTopics" => go!(b, list_topics, pb::ListTopicsRequest {}),
        "Broker/DescribeTopic" => go!(b, describe_topic, pb::DescribeTopicRequest { name: t() }),
        "Broker/Metadata" => go!(b, metadata, pb::MetadataRequest { topics: vec![t()] }),
        "Broker/InitProducer" => go!(b, init_producer, pb::InitProducerRequest {}),
        "Broker/Produce" => go!(
            b,
            produce,
            pb::ProduceRequest {
                topic: t(),
                records: vec![pb::Record { value: "v".into(), ..Default::default() }],
                ..Default::default()
            }
        ),
        "Broker/Fetch" => go!(b, fetch, pb::FetchRequest { topic: t(), ..Default::default() }),
        "Broker/NodeStatus" => go!(b, node_status, pb::NodeStatusRequest::default()),
        "Broker/ListOffsets" => {
            go!(b, list_offsets, pb::ListOffsetsRequest { topic: t(), spec: 1, ..Default::default() })
        }
        "Admin/TransferLeadership" => go!(
            a,
            transfer_leadership,
            pb::TransferLeadershipRequest { topic: t(), partition: 0, to_node: 1 }
        ),
        "Admin/ListNodes" => go!(a, list_nodes, pb::ListNodesRequest {}),
        "Admin/SetNodeState" => {
            go!(a, set_node_state, pb::SetNodeStateRequest { node_id: 999, state: "draining".into() })
        }
        "Admin/ClusterHealth" => go!(a, cluster_health, pb::ClusterHealthRequest {}),
        "Admin/BalanceLeaders" => go!(a, balance_leaders, pb::BalanceLeadersRequest::default()),
        "Admin/DeleteTopic" => go!(a, delete_topic, pb::DeleteTopicRequest { name: t() }),
        "Admin/AlterTopicConfig" => {
            go!(a, alter_topic_config, pb::AlterTopicConfigRequest { name: t(), ..Default::default() })
        }
        "Admin/AddPartitions" => go!(a, add_partitions, pb::AddPartitionsRequest { name: t(), count: 1 }),
        "Admin/MovePartition" => {
            go!(a, move_partition, pb::MovePartitionRequest { topic: t(), partition: 0, replicas: vec![1] })
        }
        "Admin/ListMoves" => go!(a, list_moves, pb::ListMovesRequest {}),
        "Admin/CancelMove" => go!(a, cancel_move, pb::CancelMoveRequest { topic: t(), partition: 0 }),
        "Admin/Join" => {
            go!(a, join, pb::JoinRequest { node_id: 9, client_addr: "x:1".into(), raft_addr: "x:2".into() })
        }
        "Admin/BalanceLocal" => go!(a, balance_local, pb::BalanceLeadersRequest::default()),
        "Admin/CreateUser" => go!(
            a,
            create_user,
            pb::CreateUserRequest { name: "nobody".into(), credentials: None, replace: false }
        ),
        "Admin/DeleteUser" => go!(a, delete_user, pb::DeleteUserRequest { name: "nobody".into() }),
        "Admin/ListUsers" => go!(a, list_users, pb::ListUsersRequest {}),
        "Admin/AddAcl" => go!(a, add_acl, bad_binding()),
        "Admin/RemoveAcl" => go!(a, remove_acl, bad_binding()),
        "Admin/ListAcls" => go!(a, list_acls, pb::ListAclsRequest {}),
        "Admin/WhoAmI" => go!(a, who_am_i, pb::WhoAmIRequest {}),
        "Admin/SetQuota" => go!(
            a,
            set_quota,
            pb::Quota { user: "nobody".into(), producer_byte_rate: Some(0), consumer_byte_rate: None }
        ),
        "Admin/ListQuotas" => go!(a, list_quotas, pb::ListQuotasRequest {}),
        // An unknown assignor: refused as invalid once allowed.
        "Groups/JoinGroup" => go!(
            g,
            join_group,
            pb::JoinGroupRequest {
                group: GROUP.into(),
                topics: vec![t()],
                session_timeout_ms: 0,
                assignor: "none".into()
            }
        ),
        "Groups/Heartbeat" => go!(
            g,
            heartbeat,
            pb::HeartbeatRequest { group: GROUP.into(), member_id: "m".into(), ..Default::default() }
        ),
        "Groups/LeaveGroup" => {
            go!(g, leave_group, pb::LeaveGroupRequest { group: GROUP.into(), member_id: "m".into() })
        }
        "Groups/CommitOffsets" => go!(
            g,
            commit_offsets,
            pb::CommitOffsetsRequest { group: GROUP.into(), member_id: "m".into(), offsets: offsets() }
        ),
        "Groups/FetchOffsets" => {
            go!(g, fetch_offsets, pb::FetchOffsetsRequest { group: GROUP.into(), ..Default::default() })
        }
        "Groups/ListGroups" => go!(g, list_groups, pb::ListGroupsRequest {}),
        "Groups/DescribeGroup" => go!(g, describe_group, pb::DescribeGroupRequest { group: GROUP.into() }),
        "Groups/ResetOffsets" => {
            go!(g, reset_offsets, pb::ResetOffsetsRequest { group: GROUP.into(), offsets: offsets() })
        }
        "Groups/DeleteGroup" => go!(g, delete_group, pb::DeleteGroupRequest { group: GROUP.into() }),
        "Raft/Vote" => go!(r, vote, pb::RaftRequest::default()),
        "Raft/PreVote" => go!(r, pre_vote, pb::RaftRequest::default()),
        "Raft/AppendEntries" => go!(r, append_entries, pb::RaftRequest::default()),
        "Raft/InstallSnapshot" => go!(r, install_snapshot, pb::RaftRequest::default()),
        "Raft/TransferLeader" => go!(r, transfer_leader, pb::RaftRequest::default()),
        "Raft/ForwardMeta" => go!(r, forward_meta, pb::RaftRequest::default()),
        "Raft/Heartbeat" => go!(r, heartbeat, pb::NodeHeartbeat::default()),
        "Raft/Members" => go!(r, members, pb::NodeIds::default()),
        "Health/Check" => {
            let h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            go!(h, check, tonic_health::pb::HealthCheckRequest { service: String::new() })
        }
        other => panic!("no call for {other}"),
    }
}

/// Whether authorization let the call through (anything but `UNAUTHENTICATED` and
/// `PERMISSION_DENIED`: the method's own answer, often "not found" or "invalid").
fn passed(r: &Result<(), tonic::Status>) -> bool {
    !matches!(r, Err(s) if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
}

/// A binding as the Admin API takes it.
fn binding(rt: &str, op: &str, prefixed: bool, deny: bool) -> pb::AclBinding {
    let resource = match (rt, prefixed) {
        ("topic", false) => TOPIC,
        ("topic", true) => TOPIC_PREFIX,
        ("group", false) => GROUP,
        ("group", true) => GROUP_PREFIX,
        _ => "",
    };
    pb::AclBinding {
        principal: "User:alice".into(),
        resource_type: rt.into(),
        resource: resource.into(),
        pattern: if prefixed && rt != "cluster" { "prefixed" } else { "literal" }.into(),
        operation: op.into(),
        permission: if deny { "deny" } else { "allow" }.into(),
    }
}

async fn set_acls(admin: &Channel, bindings: &[pb::AclBinding], add: bool) -> anyhow::Result<()> {
    let mut a = pb::admin_client::AdminClient::new(admin.clone());
    for b in bindings {
        if add {
            a.add_acl(req(b.clone(), None)).await?;
        } else {
            a.remove_acl(req(b.clone(), None)).await?;
        }
    }
    Ok(())
}

/// Who calls, in a column of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// alice: by token on gRPC, by SASL PLAIN on Kafka.
    Alice,
    /// admin, a superuser, by its client certificate.
    Superuser,
    /// Nobody: TLS with no credentials.
    Anonymous,
}

/// The columns: no binding, literal allows, prefixed allows, a deny over the literal allows,
/// the superuser, and nobody.
const COLUMNS: &str = "[none, literal, prefixed, deny over allow, superuser, anonymous]";

/// Runs every row of `rows` in every column, changing alice's bindings (through `admin`)
/// once per kind of need, and checks each outcome against `expected(need)`. `run` calls the
/// given rows as `who` and gives their outcomes in order. Returns the table, one line a row.
async fn matrix<T, F, Fut>(
    admin: &Channel,
    rows: &[(&'static str, Need)],
    mut run: F,
    expected: impl Fn(Need) -> [T; 6],
) -> anyhow::Result<Vec<String>>
where
    T: Copy + PartialEq + std::fmt::Debug + Default,
    F: FnMut(Who, Vec<&'static str>) -> Fut,
    Fut: Future<Output = Vec<T>>,
{
    let mut table = Vec::new();
    // Rows that need the same bindings share each change of the bindings.
    let mut needs: Vec<Need> = Vec::new();
    for (_, need) in rows {
        if !needs.contains(need) {
            needs.push(*need);
        }
    }
    for need in needs {
        let names: Vec<&'static str> = rows.iter().filter(|(_, n)| *n == need).map(|(m, _)| *m).collect();
        let bindings: &[(&str, &str)] = match need {
            Need::Bindings(b) => b,
            _ => &[],
        };
        let mut got = vec![[T::default(); 6]; names.len()];
        let mut record = |column: usize, outcomes: Vec<T>| {
            for (g, o) in got.iter_mut().zip(outcomes) {
                g[column] = o;
            }
        };
        // No binding.
        record(0, run(Who::Alice, names.clone()).await);
        // Literal allows of what the rows need; then a deny of everything on the same resources
        // beside them (deny over allow).
        let literal: Vec<_> = bindings.iter().map(|(rt, op)| binding(rt, op, false, false)).collect();
        set_acls(admin, &literal, true).await?;
        record(1, run(Who::Alice, names.clone()).await);
        let denies: Vec<_> = bindings.iter().map(|(rt, _)| binding(rt, "all", false, true)).collect();
        set_acls(admin, &denies, true).await?;
        record(3, run(Who::Alice, names.clone()).await);
        set_acls(admin, &denies, false).await?;
        set_acls(admin, &literal, false).await?;
        // Prefixed allows.
        let prefixed: Vec<_> = bindings.iter().map(|(rt, op)| binding(rt, op, true, false)).collect();
        set_acls(admin, &prefixed, true).await?;
        record(2, run(Who::Alice, names.clone()).await);
        set_acls(admin, &prefixed, false).await?;
        record(4, run(Who::Superuser, names.clone()).await);
        record(5, run(Who::Anonymous, names.clone()).await);
        let want = expected(need);
        for (m, g) in names.iter().zip(&got) {
            table.push(format!("{m:32} {g:?}"));
            ensure!(*g == want, "{m}: {COLUMNS} = {g:?}, expected {want:?}");
        }
    }
    Ok(table)
}

/// What a Kafka request got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Outcome {
    /// An answer without an authorization error (often "unknown topic" or "invalid").
    #[default]
    Answered,
    /// `TOPIC_`, `GROUP_` or `CLUSTER_AUTHORIZATION_FAILED` (29, 30, 31) somewhere in the answer.
    Refused,
    /// The connection closed with no answer: a request before authentication.
    Closed,
}

/// Every Kafka API the listener serves, and what it needs (as `METHODS` for gRPC). A few APIs
/// appear twice, once per kind of resource they name.
const KAFKA_APIS: &[(&str, Need)] = &[
    ("ApiVersions", Need::Public),
    ("SaslHandshake", Need::Public),
    ("SaslAuthenticate", Need::Public),
    ("Metadata", Need::Bindings(&[("topic", "describe")])),
    ("Produce", Need::Bindings(&[("topic", "write")])),
    ("Fetch", Need::Bindings(&[("topic", "read")])),
    ("ListOffsets", Need::Bindings(&[("topic", "describe")])),
    ("InitProducerId", Need::AnyUser),
    ("FindCoordinator", Need::Bindings(&[("group", "describe")])),
    ("JoinGroup", Need::Bindings(&[("group", "read")])),
    ("SyncGroup", Need::Bindings(&[("group", "read")])),
    ("Heartbeat", Need::Bindings(&[("group", "read")])),
    ("LeaveGroup", Need::Bindings(&[("group", "read")])),
    ("OffsetCommit", Need::Bindings(&[("group", "read"), ("topic", "read")])),
    ("OffsetFetch", Need::Bindings(&[("group", "describe"), ("topic", "describe")])),
    ("ListGroups", Need::AnyUser),
    ("DescribeGroups", Need::Bindings(&[("group", "describe")])),
    ("CreateTopics", Need::Bindings(&[("topic", "create")])),
    ("DeleteTopics", Need::Bindings(&[("topic", "delete")])),
    ("CreatePartitions", Need::Bindings(&[("topic", "alter")])),
    ("DescribeConfigs/topic", Need::Bindings(&[("topic", "describe")])),
    ("DescribeConfigs/broker", Need::Bindings(&[("cluster", "describe")])),
    ("AlterConfigs/topic", Need::Bindings(&[("topic", "alter")])),
    ("AlterConfigs/broker", Need::Bindings(&[("cluster", "alter")])),
    ("IncrementalAlterConfigs/topic", Need::Bindings(&[("topic", "alter")])),
    ("IncrementalAlterConfigs/broker", Need::Bindings(&[("cluster", "alter")])),
];

/// How to reach the Kafka listener as each caller.
#[derive(Clone)]
struct KafkaCallers {
    addr: String,
    tls: kafka_conn::Tls,
    admin: kafka_conn::Tls,
    token: String,
}

impl KafkaCallers {
    fn connect(&self, who: Who) -> anyhow::Result<Conn> {
        match who {
            Who::Alice => {
                let mut c = Conn::open_tls(&self.addr, &self.tls)?;
                c.sasl_plain("alice", &self.token)?;
                Ok(c)
            }
            Who::Superuser => Conn::open_tls(&self.addr, &self.admin),
            Who::Anonymous => Conn::open_tls(&self.addr, &self.tls),
        }
    }

    /// Calls `api` as `who` on a connection of its own.
    fn outcome(&self, who: Who, api: &str) -> anyhow::Result<Outcome> {
        // SASL is how alice authenticates: her column is a connection before it.
        let mut conn =
            self.connect(if api.starts_with("Sasl") && who == Who::Alice { Who::Anonymous } else { who })?;
        let codes = match kafka_call(&mut conn, api) {
            Ok(codes) => codes,
            // Closed with no answer: read errors, not a response that failed to decode.
            Err(e) if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some()) => {
                return Ok(Outcome::Closed);
            }
            Err(e) => return Err(e.context(format!("{api} as {who:?}"))),
        };
        Ok(if codes.iter().any(|c| matches!(c, 29..=31)) { Outcome::Refused } else { Outcome::Answered })
    }
}

/// Sends `api`'s request (naming TOPIC and GROUP, changing nothing) and gives every error code
/// of its answer.
fn kafka_call(conn: &mut Conn, api: &str) -> anyhow::Result<Vec<i16>> {
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    let topic = || TopicName(StrBytes::from_static_str(TOPIC));
    let group = || GroupId(StrBytes::from_static_str(GROUP));
    let s = StrBytes::from_static_str;
    const TOPIC_RESOURCE: i8 = 2;
    const BROKER_RESOURCE: i8 = 4;
    // The resource of the `/topic` and `/broker` rows.
    let resource =
        || if api.ends_with("topic") { (TOPIC_RESOURCE, s(TOPIC)) } else { (BROKER_RESOURCE, s("1")) };
    Ok(match api {
        "ApiVersions" => {
            let r: ApiVersionsResponse = conn.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())?;
            vec![r.error_code]
        }
        "SaslHandshake" => {
            let mut req = SaslHandshakeRequest::default();
            req.mechanism = s("PLAIN");
            let r: SaslHandshakeResponse = conn.call(ApiKey::SaslHandshake, 1, &req)?;
            vec![r.error_code]
        }
        // A handshake, then a wrong token: SASL_AUTHENTICATION_FAILED is the answer.
        "SaslAuthenticate" => {
            let mut hs = SaslHandshakeRequest::default();
            hs.mechanism = s("PLAIN");
            let _: SaslHandshakeResponse = conn.call(ApiKey::SaslHandshake, 1, &hs)?;
            let mut req = SaslAuthenticateRequest::default();
            req.auth_bytes = bytes::Bytes::from_static(b"\0nobody\0nobody.wrong");
            let r: SaslAuthenticateResponse = conn.call(ApiKey::SaslAuthenticate, 2, &req)?;
            ensure!(r.error_code == 58, "a wrong token is SASL_AUTHENTICATION_FAILED: {r:?}");
            vec![r.error_code]
        }
        "Metadata" => {
            let mut t = metadata_request::MetadataRequestTopic::default();
            t.name = Some(topic());
            let mut req = MetadataRequest::default();
            req.topics = Some(vec![t]);
            let r: MetadataResponse = conn.call(ApiKey::Metadata, 12, &req)?;
            r.topics.iter().map(|t| t.error_code).collect()
        }
        "Produce" => {
            let batch = kafka_conn::batch(
                &[kafka_conn::record("k", "v", "h", 0)],
                kafka_protocol::records::Compression::None,
            )?;
            let mut p = produce_request::PartitionProduceData::default();
            p.records = Some(batch);
            let mut t = produce_request::TopicProduceData::default();
            t.name = topic();
            t.partition_data = vec![p];
            let mut req = ProduceRequest::default();
            req.acks = -1;
            req.timeout_ms = 10_000;
            req.topic_data = vec![t];
            let r: ProduceResponse = conn.call(ApiKey::Produce, 9, &req)?;
            r.responses.iter().flat_map(|t| &t.partition_responses).map(|p| p.error_code).collect()
        }
        "Fetch" => {
            let mut p = fetch_request::FetchPartition::default();
            p.partition_max_bytes = 1 << 20;
            let mut t = fetch_request::FetchTopic::default();
            t.topic = topic();
            t.partitions = vec![p];
            let mut req = FetchRequest::default();
            req.max_bytes = 1 << 20;
            req.topics = vec![t];
            let r: FetchResponse = conn.call(ApiKey::Fetch, 12, &req)?;
            let mut codes = vec![r.error_code];
            codes.extend(r.responses.iter().flat_map(|t| &t.partitions).map(|p| p.error_code));
            codes
        }
        "ListOffsets" => {
            let mut p = list_offsets_request::ListOffsetsPartition::default();
            p.timestamp = -1;
            let mut t = list_offsets_request::ListOffsetsTopic::default();
            t.name = topic();
            t.partitions = vec![p];
            let mut req = ListOffsetsRequest::default();
            req.replica_id = (-1).into();
            req.topics = vec![t];
            let r: ListOffsetsResponse = conn.call(ApiKey::ListOffsets, 6, &req)?;
            r.topics.iter().flat_map(|t| &t.partitions).map(|p| p.error_code).collect()
        }
        "InitProducerId" => {
            let mut req = InitProducerIdRequest::default();
            req.transaction_timeout_ms = 60_000;
            let r: InitProducerIdResponse = conn.call(ApiKey::InitProducerId, 4, &req)?;
            vec![r.error_code]
        }
        "FindCoordinator" => {
            let mut req = FindCoordinatorRequest::default();
            req.key = s(GROUP);
            let r: FindCoordinatorResponse = conn.call(ApiKey::FindCoordinator, 3, &req)?;
            vec![r.error_code]
        }
        // A session timeout of 0: INVALID_SESSION_TIMEOUT once allowed.
        "JoinGroup" => {
            let mut p = join_group_request::JoinGroupRequestProtocol::default();
            p.name = s("range");
            let mut req = JoinGroupRequest::default();
            req.group_id = group();
            req.protocol_type = s("consumer");
            req.protocols = vec![p];
            let r: JoinGroupResponse = conn.call(ApiKey::JoinGroup, 5, &req)?;
            vec![r.error_code]
        }
        "SyncGroup" => {
            let mut req = SyncGroupRequest::default();
            req.group_id = group();
            req.generation_id = 1;
            req.member_id = s("m");
            let r: SyncGroupResponse = conn.call(ApiKey::SyncGroup, 5, &req)?;
            vec![r.error_code]
        }
        "Heartbeat" => {
            let mut req = HeartbeatRequest::default();
            req.group_id = group();
            req.generation_id = 1;
            req.member_id = s("m");
            let r: HeartbeatResponse = conn.call(ApiKey::Heartbeat, 4, &req)?;
            vec![r.error_code]
        }
        "LeaveGroup" => {
            let mut m = leave_group_request::MemberIdentity::default();
            m.member_id = s("m");
            let mut req = LeaveGroupRequest::default();
            req.group_id = group();
            req.members = vec![m];
            let r: LeaveGroupResponse = conn.call(ApiKey::LeaveGroup, 4, &req)?;
            let mut codes = vec![r.error_code];
            codes.extend(r.members.iter().map(|m| m.error_code));
            codes
        }
        // A simple commit (no member), so the topic's check is reached; the topic is unknown.
        "OffsetCommit" => {
            let mut p = offset_commit_request::OffsetCommitRequestPartition::default();
            p.committed_offset = 1;
            let mut t = offset_commit_request::OffsetCommitRequestTopic::default();
            t.name = topic();
            t.partitions = vec![p];
            let mut req = OffsetCommitRequest::default();
            req.group_id = group();
            req.generation_id_or_member_epoch = -1;
            req.topics = vec![t];
            let r: OffsetCommitResponse = conn.call(ApiKey::OffsetCommit, 8, &req)?;
            r.topics.iter().flat_map(|t| &t.partitions).map(|p| p.error_code).collect()
        }
        "OffsetFetch" => {
            let mut t = offset_fetch_request::OffsetFetchRequestTopic::default();
            t.name = topic();
            t.partition_indexes = vec![0];
            let mut req = OffsetFetchRequest::default();
            req.group_id = group();
            req.topics = Some(vec![t]);
            let r: OffsetFetchResponse = conn.call(ApiKey::OffsetFetch, 7, &req)?;
            let mut codes = vec![r.error_code];
            codes.extend(r.topics.iter().flat_map(|t| &t.partitions).map(|p| p.error_code));
            codes
        }
        "ListGroups" => {
            let r: ListGroupsResponse = conn.call(ApiKey::ListGroups, 4, &ListGroupsRequest::default())?;
            vec![r.error_code]
        }
        "DescribeGroups" => {
            let mut req = DescribeGroupsRequest::default();
            req.groups = vec![group()];
            let r: DescribeGroupsResponse = conn.call(ApiKey::DescribeGroups, 5, &req)?;
            r.groups.iter().map(|g| g.error_code).collect()
        }
        "CreateTopics" => {
            let mut t = create_topics_request::CreatableTopic::default();
            t.name = topic();
            t.num_partitions = 1;
            t.replication_factor = 1;
            let mut req = CreateTopicsRequest::default();
            req.topics = vec![t];
            req.timeout_ms = 10_000;
            req.validate_only = true;
            let r: CreateTopicsResponse = conn.call(ApiKey::CreateTopics, 5, &req)?;
            r.topics.iter().map(|t| t.error_code).collect()
        }
        "DeleteTopics" => {
            let mut req = DeleteTopicsRequest::default();
            req.topic_names = vec![topic()];
            req.timeout_ms = 10_000;
            let r: DeleteTopicsResponse = conn.call(ApiKey::DeleteTopics, 5, &req)?;
            r.responses.iter().map(|t| t.error_code).collect()
        }
        "CreatePartitions" => {
            let mut t = create_partitions_request::CreatePartitionsTopic::default();
            t.name = topic();
            t.count = 2;
            let mut req = CreatePartitionsRequest::default();
            req.topics = vec![t];
            req.timeout_ms = 10_000;
            req.validate_only = true;
            let r: CreatePartitionsResponse = conn.call(ApiKey::CreatePartitions, 3, &req)?;
            r.results.iter().map(|t| t.error_code).collect()
        }
        "DescribeConfigs/topic" | "DescribeConfigs/broker" => {
            let mut res = describe_configs_request::DescribeConfigsResource::default();
            (res.resource_type, res.resource_name) = resource();
            let mut req = DescribeConfigsRequest::default();
            req.resources = vec![res];
            let r: DescribeConfigsResponse = conn.call(ApiKey::DescribeConfigs, 4, &req)?;
            r.results.iter().map(|r| r.error_code).collect()
        }
        "AlterConfigs/topic" | "AlterConfigs/broker" => {
            let mut c = alter_configs_request::AlterableConfig::default();
            c.name = s("retention.ms");
            c.value = Some(s("3600000"));
            let mut res = alter_configs_request::AlterConfigsResource::default();
            (res.resource_type, res.resource_name) = resource();
            res.configs = vec![c];
            let mut req = AlterConfigsRequest::default();
            req.resources = vec![res];
            req.validate_only = true;
            let r: AlterConfigsResponse = conn.call(ApiKey::AlterConfigs, 2, &req)?;
            r.responses.iter().map(|r| r.error_code).collect()
        }
        "IncrementalAlterConfigs/topic" | "IncrementalAlterConfigs/broker" => {
            let mut c = incremental_alter_configs_request::AlterableConfig::default();
            c.name = s("retention.ms");
            c.value = Some(s("3600000"));
            let mut res = incremental_alter_configs_request::AlterConfigsResource::default();
            (res.resource_type, res.resource_name) = resource();
            res.configs = vec![c];
            let mut req = IncrementalAlterConfigsRequest::default();
            req.resources = vec![res];
            req.validate_only = true;
            let r: IncrementalAlterConfigsResponse = conn.call(ApiKey::IncrementalAlterConfigs, 1, &req)?;
            r.responses.iter().map(|r| r.error_code).collect()
        }
        other => anyhow::bail!("no call for {other}"),
    })
}

#[test]
fn every_grpc_method_and_kafka_api_under_every_kind_of_binding() -> anyhow::Result<()> {
    let c = Cluster::start_secure_https(1, true)?;
    let s = c.secure.clone().context("secure")?;
    let out = c.ctl(&["cluster", "health", "--exit-when-healthy", "--timeout", "40s"], None, CTL_TIMEOUT)?;
    ensure!(out.ok(), "{out:?}");
    // Topics to see listings filtered: one alice may describe, one she may not.
    for t in ["orders.visible", "secret"] {
        ensure!(
            c.ctl(
                &["topic", "create", t, "--partitions", "1", "--replication-factor", "1"],
                None,
                CTL_TIMEOUT
            )?
            .ok()
        );
    }
    let out = c.ctl(&["user", "create", "alice"], None, CTL_TIMEOUT)?;
    let token = out.json()?["token"].as_str().context("token")?.to_owned();
    let addr = c.node(1).client_addr.clone();
    let ca = std::fs::read_to_string(s.path("ca.pem"))?;
    let (cert, key) =
        (std::fs::read_to_string(s.path("admin.pem"))?, std::fs::read_to_string(s.path("admin.key"))?);
    let kafka = KafkaCallers {
        addr: c.node(1).kafka_addr.clone(),
        tls: kafka_conn::Tls { ca: ca.clone(), identity: None },
        admin: kafka_conn::Tls { ca: ca.clone(), identity: Some((cert.clone(), key.clone())) },
        token: token.clone(),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca));
        let user = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.clone())?
            .connect()
            .await?;
        let admin = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.identity(tonic::transport::Identity::from_pem(&cert, &key)))?
            .connect()
            .await?;

        // gRPC: whether authorization let each call through.
        let grpc = |who: Who, methods: Vec<&'static str>| {
            let (ch, tok) = match who {
                Who::Alice => (user.clone(), Some(token.clone())),
                Who::Superuser => (admin.clone(), None),
                Who::Anonymous => (user.clone(), None),
            };
            async move {
                let mut out = Vec::new();
                for m in methods {
                    out.push(passed(&call(&ch, tok.as_deref(), m).await));
                }
                out
            }
        };
        let table = matrix(&admin, METHODS, grpc, |need| match need {
            Need::Public => [true, true, true, true, true, true],
            Need::AnyUser => [true, true, true, true, true, false],
            Need::Nodes => [false; 6],
            Need::Bindings(_) => [false, true, true, false, true, false],
        })
        .await?;
        eprintln!("gRPC: passed authorization, {COLUMNS}\n{}", table.join("\n"));

        // Kafka: answered, refused by an authorization error code, or closed (no SASL). Every
        // API the listener advertises has its rows.
        let advertised: kafka_protocol::messages::ApiVersionsResponse = kafka.connect(Who::Anonymous)?.call(
            kafka_protocol::messages::ApiKey::ApiVersions,
            3,
            &kafka_protocol::messages::ApiVersionsRequest::default(),
        )?;
        for a in &advertised.api_keys {
            let key = kafka_protocol::messages::ApiKey::try_from(a.api_key)
                .map_err(|()| anyhow::anyhow!("unknown API key {}", a.api_key))?;
            let name = format!("{key:?}");
            ensure!(
                KAFKA_APIS.iter().any(|(row, _)| row.split('/').next() == Some(name.as_str())),
                "the Kafka listener serves {name}, which has no row in KAFKA_APIS"
            );
        }
        let kafka_run = |who: Who, apis: Vec<&'static str>| {
            let k = kafka.clone();
            async move {
                apis.iter()
                    .map(|api| k.outcome(who, api).unwrap_or_else(|e| panic!("{e:#}")))
                    .collect::<Vec<_>>()
            }
        };
        use Outcome::*;
        let table = matrix(&admin, KAFKA_APIS, kafka_run, |need| match need {
            Need::Public => [Answered; 6],
            Need::AnyUser => [Answered, Answered, Answered, Answered, Answered, Closed],
            Need::Nodes => [Refused; 6],
            Need::Bindings(_) => [Refused, Answered, Answered, Refused, Answered, Closed],
        })
        .await?;
        eprintln!("Kafka: {COLUMNS}\n{}", table.join("\n"));

        // Listings are filtered, not refused.
        let list = |ch: Channel, tok: Option<String>| async move {
            let r = pb::broker_client::BrokerClient::new(ch)
                .list_topics(req(pb::ListTopicsRequest {}, tok.as_deref()))
                .await?;
            anyhow::Ok(r.into_inner().topics.into_iter().map(|t| t.name).collect::<Vec<_>>())
        };
        let kafka_list = |who: Who| -> anyhow::Result<Vec<String>> {
            let mut conn = kafka.connect(who)?;
            let mut req = kafka_protocol::messages::MetadataRequest::default();
            req.topics = None;
            let r: kafka_protocol::messages::MetadataResponse =
                conn.call(kafka_protocol::messages::ApiKey::Metadata, 12, &req)?;
            let mut names: Vec<String> =
                r.topics.iter().filter_map(|t| t.name.as_ref().map(|n| n.to_string())).collect();
            names.sort();
            Ok(names)
        };
        ensure!(
            list(user.clone(), Some(token.clone())).await?.is_empty(),
            "alice sees no topic without a binding"
        );
        ensure!(kafka_list(Who::Alice)?.is_empty(), "alice's Kafka Metadata of all topics: none");
        let see = [binding("topic", "read", true, false)];
        set_acls(&admin, &see, true).await?;
        let seen = list(user.clone(), Some(token.clone())).await?;
        ensure!(seen == ["orders.visible"], "alice sees what she may describe: {seen:?}");
        let seen = kafka_list(Who::Alice)?;
        ensure!(seen == ["orders.visible"], "alice's Kafka Metadata of all topics: {seen:?}");
        let all = list(admin.clone(), None).await?;
        ensure!(all.len() == 2, "the superuser sees every topic: {all:?}");
        ensure!(kafka_list(Who::Superuser)?.len() == 2, "the superuser's Kafka Metadata lists every topic");
        anyhow::Ok(())
    })?;

    // `[tls] http = true`: /metrics and /health over HTTPS with the cluster CA; a plaintext
    // request gets no answer.
    let http = c.node(1).http_addr.clone();
    for (path, expect) in [("/metrics", "eddy_auth_failures_total"), ("/health", "")] {
        use std::io::Read;
        use std::io::Write;
        let mut tls = kafka_conn::tls_stream(&http, &kafka.tls)?;
        write!(tls, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        tls.flush()?;
        let mut text = String::new();
        // A peer that closes without TLS's close_notify ends the read with an error after the body.
        let _ = tls.read_to_string(&mut text);
        ensure!(text.starts_with("HTTP/1.1 200"), "GET {path} over HTTPS: {text:.200}");
        ensure!(text.contains(expect), "GET {path} over HTTPS lacks {expect:?}");
    }
    let plain = c.http_get(1, "/metrics");
    ensure!(plain.is_err(), "a plaintext GET of an HTTPS listener gets no answer: {plain:?}");
    Ok(())
}
