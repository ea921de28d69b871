//! The Kafka listener on real processes, spoken to at the protocol level with `kafka-protocol`'s
//! codecs: every API and version the listener advertises is exercised and its answer checked;
//! idempotent producers get Kafka's duplicate and out-of-order answers; fetches from a follower
//! read what the leader acknowledged; bad frames close only their own connection.
//!
//! `kcat.rs` covers the same path through a real Kafka client (librdkafka).

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use crate::kafka_conn;

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use bytes::Bytes;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use eddy_tests::wait_for;
use kafka_conn::Conn;
use kafka_conn::batch;
use kafka_conn::record;
use kafka_protocol::messages::AlterConfigsRequest;
use kafka_protocol::messages::AlterConfigsResponse;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::ApiVersionsRequest;
use kafka_protocol::messages::ApiVersionsResponse;
use kafka_protocol::messages::CreatePartitionsRequest;
use kafka_protocol::messages::CreatePartitionsResponse;
use kafka_protocol::messages::CreateTopicsRequest;
use kafka_protocol::messages::CreateTopicsResponse;
use kafka_protocol::messages::DeleteTopicsRequest;
use kafka_protocol::messages::DeleteTopicsResponse;
use kafka_protocol::messages::DescribeConfigsRequest;
use kafka_protocol::messages::DescribeConfigsResponse;
use kafka_protocol::messages::DescribeGroupsRequest;
use kafka_protocol::messages::DescribeGroupsResponse;
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::messages::FetchResponse;
use kafka_protocol::messages::FindCoordinatorRequest;
use kafka_protocol::messages::FindCoordinatorResponse;
use kafka_protocol::messages::GroupId;
use kafka_protocol::messages::HeartbeatRequest;
use kafka_protocol::messages::HeartbeatResponse;
use kafka_protocol::messages::IncrementalAlterConfigsRequest;
use kafka_protocol::messages::IncrementalAlterConfigsResponse;
use kafka_protocol::messages::InitProducerIdRequest;
use kafka_protocol::messages::InitProducerIdResponse;
use kafka_protocol::messages::JoinGroupRequest;
use kafka_protocol::messages::JoinGroupResponse;
use kafka_protocol::messages::LeaveGroupRequest;
use kafka_protocol::messages::LeaveGroupResponse;
use kafka_protocol::messages::ListGroupsRequest;
use kafka_protocol::messages::ListGroupsResponse;
use kafka_protocol::messages::ListOffsetsRequest;
use kafka_protocol::messages::ListOffsetsResponse;
use kafka_protocol::messages::MetadataRequest;
use kafka_protocol::messages::MetadataResponse;
use kafka_protocol::messages::OffsetCommitRequest;
use kafka_protocol::messages::OffsetCommitResponse;
use kafka_protocol::messages::OffsetFetchRequest;
use kafka_protocol::messages::OffsetFetchResponse;
use kafka_protocol::messages::ProduceRequest;
use kafka_protocol::messages::ProduceResponse;
use kafka_protocol::messages::SaslAuthenticateRequest;
use kafka_protocol::messages::SaslAuthenticateResponse;
use kafka_protocol::messages::SaslHandshakeRequest;
use kafka_protocol::messages::SaslHandshakeResponse;
use kafka_protocol::messages::SyncGroupRequest;
use kafka_protocol::messages::SyncGroupResponse;
use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::alter_configs_request::AlterConfigsResource;
use kafka_protocol::messages::alter_configs_request::AlterableConfig;
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopicConfig;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::FetchPartition;
use kafka_protocol::messages::fetch_request::FetchTopic;
use kafka_protocol::messages::incremental_alter_configs_request::AlterConfigsResource as IncrementalAlterConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_request::AlterableConfig as IncrementalAlterableConfig;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::list_offsets_request::ListOffsetsPartition;
use kafka_protocol::messages::list_offsets_request::ListOffsetsTopic;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::OffsetCommitRequestPartition;
use kafka_protocol::messages::offset_commit_request::OffsetCommitRequestTopic;
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::produce_request::PartitionProduceData;
use kafka_protocol::messages::produce_request::TopicProduceData;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;
use kafka_protocol::records::Record;
use kafka_protocol::records::RecordBatchDecoder;

const TOPIC: &str = "kv";

fn produce_request(partition: i32, records: Bytes, acks: i16) -> ProduceRequest {
    let mut p = PartitionProduceData::default();
    p.index = partition;
    p.records = Some(records);
    let mut t = TopicProduceData::default();
    t.name = TopicName(StrBytes::from_static_str(TOPIC));
    t.partition_data = vec![p];
    let mut req = ProduceRequest::default();
    req.acks = acks;
    req.timeout_ms = 10_000;
    req.topic_data = vec![t];
    req
}

/// The one partition answer of a produce: (error code, base offset).
fn produced(r: &ProduceResponse) -> anyhow::Result<(i16, i64)> {
    let p = r.responses.first().and_then(|t| t.partition_responses.first()).context("no partition answer")?;
    Ok((p.error_code, p.base_offset))
}

fn fetch_request(partition: i32, offset: i64, max_wait_ms: i32) -> FetchRequest {
    let mut p = FetchPartition::default();
    p.partition = partition;
    p.fetch_offset = offset;
    p.partition_max_bytes = 1 << 20;
    let mut t = FetchTopic::default();
    t.topic = TopicName(StrBytes::from_static_str(TOPIC));
    t.partitions = vec![p];
    let mut req = FetchRequest::default();
    req.max_wait_ms = max_wait_ms;
    req.min_bytes = 1;
    req.max_bytes = 8 << 20;
    req.topics = vec![t];
    req
}

fn list_offsets_request(partition: i32, timestamp: i64) -> ListOffsetsRequest {
    let mut p = ListOffsetsPartition::default();
    p.partition_index = partition;
    p.timestamp = timestamp;
    let mut t = ListOffsetsTopic::default();
    t.name = TopicName(StrBytes::from_static_str(TOPIC));
    t.partitions = vec![p];
    let mut req = ListOffsetsRequest::default();
    req.replica_id = (-1).into();
    req.topics = vec![t];
    req
}

fn metadata_request(version: i16) -> MetadataRequest {
    let mut t = MetadataRequestTopic::default();
    t.name = Some(TopicName(StrBytes::from_static_str(TOPIC)));
    let mut req = MetadataRequest::default();
    req.topics = Some(vec![t]);
    if version >= 4 {
        req.allow_auto_topic_creation = false;
    }
    req
}

/// A topic's life through the admin APIs, once per version (as [`group_rounds`]).
fn admin_rounds(
    c: &Cluster,
    range: &dyn Fn(ApiKey) -> anyhow::Result<std::ops::RangeInclusive<i16>>,
) -> anyhow::Result<()> {
    let keys = [
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::CreatePartitions,
        ApiKey::DescribeConfigs,
        ApiKey::AlterConfigs,
        ApiKey::IncrementalAlterConfigs,
    ];
    let mut highest = 0;
    for k in keys {
        highest = highest.max(*range(k)?.end());
    }
    let mut conn = Conn::open(&c.node(2).kafka_addr)?;
    for round in 0..=highest {
        let v = |k: ApiKey| -> anyhow::Result<i16> {
            let r = range(k)?;
            Ok(round.clamp(*r.start(), *r.end()))
        };
        let name = format!("admin-{round}");
        let topic = || TopicName(StrBytes::from_string(name.clone()));
        // CreateTopics with a setting; an unknown setting and a taken name are refused by code.
        let cv = v(ApiKey::CreateTopics)?;
        let create = |name: TopicName, configs: &[(&str, &str)]| {
            let mut t = CreatableTopic::default();
            t.name = name;
            t.num_partitions = 2;
            t.replication_factor = 3;
            t.configs = configs
                .iter()
                .map(|(k, v)| {
                    let mut c = CreatableTopicConfig::default();
                    c.name = StrBytes::from_string(k.to_string());
                    c.value = Some(StrBytes::from_string(v.to_string()));
                    c
                })
                .collect();
            let mut req = CreateTopicsRequest::default();
            req.topics = vec![t];
            req.timeout_ms = 10_000;
            req
        };
        let r: CreateTopicsResponse =
            conn.call(ApiKey::CreateTopics, cv, &create(topic(), &[("retention.ms", "3600000")]))?;
        ensure!(r.topics[0].error_code == 0, "CreateTopics v{cv}: {r:?}");
        let r: CreateTopicsResponse = conn.call(ApiKey::CreateTopics, cv, &create(topic(), &[]))?;
        ensure!(r.topics[0].error_code == 36, "CreateTopics v{cv} again: TOPIC_ALREADY_EXISTS, got {r:?}");
        let other = TopicName(StrBytes::from_string(format!("{name}-x")));
        let r: CreateTopicsResponse =
            conn.call(ApiKey::CreateTopics, cv, &create(other, &[("cleanup.policy", "compact")]))?;
        ensure!(
            r.topics[0].error_code == 40,
            "CreateTopics v{cv} with compaction: INVALID_CONFIG, got {r:?}"
        );
        // DescribeConfigs shows the setting by Kafka's name.
        let dv = v(ApiKey::DescribeConfigs)?;
        let describe = || {
            let mut res = DescribeConfigsResource::default();
            res.resource_type = 2;
            res.resource_name = StrBytes::from_string(name.clone());
            res.configuration_keys = None;
            let mut req = DescribeConfigsRequest::default();
            req.resources = vec![res];
            req
        };
        let config = |r: &DescribeConfigsResponse, key: &str| {
            r.results[0]
                .configs
                .iter()
                .find(|c| c.name.as_str() == key)
                .and_then(|c| c.value.as_ref().map(|v| v.to_string()))
        };
        let r: DescribeConfigsResponse = conn.call(ApiKey::DescribeConfigs, dv, &describe())?;
        ensure!(r.results[0].error_code == 0, "DescribeConfigs v{dv}: {r:?}");
        ensure!(config(&r, "retention.ms").as_deref() == Some("3600000"), "DescribeConfigs v{dv}: {r:?}");
        ensure!(config(&r, "message.timestamp.type").as_deref() == Some("CreateTime"));
        // IncrementalAlterConfigs sets one key; AlterConfigs replaces them all.
        let iv = v(ApiKey::IncrementalAlterConfigs)?;
        let mut ic = IncrementalAlterableConfig::default();
        ic.name = StrBytes::from_static_str("message.timestamp.type");
        ic.config_operation = 0;
        ic.value = Some(StrBytes::from_static_str("LogAppendTime"));
        let mut ires = IncrementalAlterConfigsResource::default();
        ires.resource_type = 2;
        ires.resource_name = StrBytes::from_string(name.clone());
        ires.configs = vec![ic];
        let mut ireq = IncrementalAlterConfigsRequest::default();
        ireq.resources = vec![ires];
        let r: IncrementalAlterConfigsResponse = conn.call(ApiKey::IncrementalAlterConfigs, iv, &ireq)?;
        ensure!(r.responses[0].error_code == 0, "IncrementalAlterConfigs v{iv}: {r:?}");
        let r: DescribeConfigsResponse = conn.call(ApiKey::DescribeConfigs, dv, &describe())?;
        ensure!(
            config(&r, "message.timestamp.type").as_deref() == Some("LogAppendTime"),
            "after IncrementalAlterConfigs"
        );
        ensure!(
            config(&r, "retention.ms").as_deref() == Some("3600000"),
            "an incremental change keeps the rest"
        );
        let av = v(ApiKey::AlterConfigs)?;
        let mut ac = AlterableConfig::default();
        ac.name = StrBytes::from_static_str("retention.bytes");
        ac.value = Some(StrBytes::from_static_str("1048576"));
        let mut ares = AlterConfigsResource::default();
        ares.resource_type = 2;
        ares.resource_name = StrBytes::from_string(name.clone());
        ares.configs = vec![ac];
        let mut areq = AlterConfigsRequest::default();
        areq.resources = vec![ares];
        let r: AlterConfigsResponse = conn.call(ApiKey::AlterConfigs, av, &areq)?;
        ensure!(r.responses[0].error_code == 0, "AlterConfigs v{av}: {r:?}");
        let r: DescribeConfigsResponse = conn.call(ApiKey::DescribeConfigs, dv, &describe())?;
        ensure!(config(&r, "retention.bytes").as_deref() == Some("1048576"), "after AlterConfigs: {r:?}");
        ensure!(
            config(&r, "retention.ms").as_deref() == Some("-1"),
            "AlterConfigs resets what it does not name: {r:?}"
        );
        ensure!(config(&r, "message.timestamp.type").as_deref() == Some("CreateTime"), "and this: {r:?}");
        // CreatePartitions to a total of 4; fewer is refused.
        let pv = v(ApiKey::CreatePartitions)?;
        let grow = |count: i32| {
            let mut t = CreatePartitionsTopic::default();
            t.name = topic();
            t.count = count;
            t.assignments = None;
            let mut req = CreatePartitionsRequest::default();
            req.topics = vec![t];
            req.timeout_ms = 10_000;
            req
        };
        let r: CreatePartitionsResponse = conn.call(ApiKey::CreatePartitions, pv, &grow(4))?;
        ensure!(r.results[0].error_code == 0, "CreatePartitions v{pv}: {r:?}");
        let r: CreatePartitionsResponse = conn.call(ApiKey::CreatePartitions, pv, &grow(3))?;
        ensure!(
            r.results[0].error_code == 37,
            "CreatePartitions v{pv} shrinking: INVALID_PARTITIONS, got {r:?}"
        );
        let md: MetadataResponse = {
            let mut req = metadata_request(12);
            req.topics.as_mut().expect("topics")[0].name = Some(topic());
            conn.call(ApiKey::Metadata, 12, &req)?
        };
        ensure!(md.topics[0].partitions.len() == 4, "the topic has 4 partitions: {:?}", md.topics[0]);
        // DeleteTopics; then it is unknown.
        let tv = v(ApiKey::DeleteTopics)?;
        let mut del = DeleteTopicsRequest::default();
        del.topic_names = vec![topic()];
        del.timeout_ms = 10_000;
        let r: DeleteTopicsResponse = conn.call(ApiKey::DeleteTopics, tv, &del)?;
        ensure!(r.responses[0].error_code == 0, "DeleteTopics v{tv}: {r:?}");
        let r: DeleteTopicsResponse = conn.call(ApiKey::DeleteTopics, tv, &del)?;
        ensure!(
            r.responses[0].error_code == 3,
            "DeleteTopics v{tv} again: UNKNOWN_TOPIC_OR_PARTITION, got {r:?}"
        );
    }
    Ok(())
}

/// One member's life in a consumer group, once per version: round `i` speaks version `i` of
/// every group API (or its highest), so every advertised version is spoken at least once.
fn group_rounds(
    c: &Cluster,
    range: &dyn Fn(ApiKey) -> anyhow::Result<std::ops::RangeInclusive<i16>>,
) -> anyhow::Result<()> {
    let keys = [
        ApiKey::FindCoordinator,
        ApiKey::JoinGroup,
        ApiKey::SyncGroup,
        ApiKey::Heartbeat,
        ApiKey::LeaveGroup,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::ListGroups,
        ApiKey::DescribeGroups,
    ];
    let mut highest = 0;
    for k in keys {
        highest = highest.max(*range(k)?.end());
    }
    let mut any = Conn::open(&c.node(1).kafka_addr)?;
    for round in 0..=highest {
        let v = |k: ApiKey| -> anyhow::Result<i16> {
            let r = range(k)?;
            Ok(round.clamp(*r.start(), *r.end()))
        };
        let group = format!("g{round}");
        let gid = || GroupId(StrBytes::from_string(group.clone()));
        // FindCoordinator: the metadata leader, wherever it is asked.
        let mut find = FindCoordinatorRequest::default();
        let fv = v(ApiKey::FindCoordinator)?;
        if fv >= 4 {
            find.coordinator_keys = vec![StrBytes::from_string(group.clone())];
        } else {
            find.key = StrBytes::from_string(group.clone());
        }
        let found: FindCoordinatorResponse = any.call(ApiKey::FindCoordinator, fv, &find)?;
        let (code, node) = if fv >= 4 {
            let k = found.coordinators.first().context("a coordinator")?;
            (k.error_code, k.node_id.0)
        } else {
            (found.error_code, found.node_id.0)
        };
        ensure!(code == 0 && node > 0, "FindCoordinator v{fv}: error {code}, node {node}");
        let mut coord = Conn::open(&c.node(node as u64).kafka_addr)?;
        // JoinGroup (v4 and later: first without a member id, which the coordinator hands out).
        let jv = v(ApiKey::JoinGroup)?;
        let mut join = JoinGroupRequest::default();
        join.group_id = gid();
        join.session_timeout_ms = 10_000;
        join.rebalance_timeout_ms = 10_000;
        join.protocol_type = StrBytes::from_static_str("consumer");
        let mut proto = JoinGroupRequestProtocol::default();
        proto.name = StrBytes::from_static_str("range");
        proto.metadata = Bytes::from_static(b"subscription");
        join.protocols = vec![proto];
        let mut joined: JoinGroupResponse = coord.call(ApiKey::JoinGroup, jv, &join)?;
        if jv >= 4 {
            ensure!(
                joined.error_code == 79,
                "JoinGroup v{jv}: MEMBER_ID_REQUIRED first, got {}",
                joined.error_code
            );
            join.member_id = joined.member_id.clone();
            joined = coord.call(ApiKey::JoinGroup, jv, &join)?;
        }
        ensure!(joined.error_code == 0, "JoinGroup v{jv}: error {}", joined.error_code);
        ensure!(
            joined.leader == joined.member_id && joined.members.len() == 1,
            "JoinGroup v{jv}: the only member leads"
        );
        ensure!(
            joined.members[0].metadata == Bytes::from_static(b"subscription"),
            "JoinGroup v{jv}: metadata"
        );
        let (member, generation) = (joined.member_id.clone(), joined.generation_id);
        // SyncGroup: the leader's assignment comes back.
        let sv = v(ApiKey::SyncGroup)?;
        let mut sync = SyncGroupRequest::default();
        sync.group_id = gid();
        sync.generation_id = generation;
        sync.member_id = member.clone();
        if sv >= 5 {
            sync.protocol_type = Some(StrBytes::from_static_str("consumer"));
            sync.protocol_name = Some(StrBytes::from_static_str("range"));
        }
        let mut a = SyncGroupRequestAssignment::default();
        a.member_id = member.clone();
        a.assignment = Bytes::from_static(b"kv:0,1,2");
        sync.assignments = vec![a];
        let synced: SyncGroupResponse = coord.call(ApiKey::SyncGroup, sv, &sync)?;
        ensure!(
            synced.error_code == 0 && synced.assignment == Bytes::from_static(b"kv:0,1,2"),
            "SyncGroup v{sv}: {synced:?}"
        );
        // Heartbeat: fine in this generation, fenced in another.
        let hv = v(ApiKey::Heartbeat)?;
        let mut hb = HeartbeatRequest::default();
        hb.group_id = gid();
        hb.generation_id = generation;
        hb.member_id = member.clone();
        let r: HeartbeatResponse = coord.call(ApiKey::Heartbeat, hv, &hb)?;
        ensure!(r.error_code == 0, "Heartbeat v{hv}: {}", r.error_code);
        hb.generation_id = generation + 1;
        let r: HeartbeatResponse = coord.call(ApiKey::Heartbeat, hv, &hb)?;
        ensure!(
            r.error_code == 22,
            "Heartbeat v{hv} in another generation: ILLEGAL_GENERATION, got {}",
            r.error_code
        );
        // OffsetCommit, then OffsetFetch reads it back; a stale generation is refused.
        let cv = v(ApiKey::OffsetCommit)?;
        let commit = |generation: i32, offset: i64| {
            let mut p = OffsetCommitRequestPartition::default();
            p.partition_index = 2;
            p.committed_offset = offset;
            let mut t = OffsetCommitRequestTopic::default();
            t.name = TopicName(StrBytes::from_static_str(TOPIC));
            t.partitions = vec![p];
            let mut req = OffsetCommitRequest::default();
            req.group_id = gid();
            req.generation_id_or_member_epoch = generation;
            req.member_id = member.clone();
            req.topics = vec![t];
            req
        };
        let r: OffsetCommitResponse =
            coord.call(ApiKey::OffsetCommit, cv, &commit(generation, 5 + i64::from(round)))?;
        ensure!(r.topics[0].partitions[0].error_code == 0, "OffsetCommit v{cv}: {r:?}");
        {
            let r: OffsetCommitResponse =
                coord.call(ApiKey::OffsetCommit, cv, &commit(generation - 1, 99))?;
            ensure!(
                r.topics[0].partitions[0].error_code == 22,
                "OffsetCommit v{cv} in an old generation: {r:?}"
            );
        }
        let ov = v(ApiKey::OffsetFetch)?;
        let mut of = OffsetFetchRequest::default();
        of.group_id = gid();
        let mut t = OffsetFetchRequestTopic::default();
        t.name = TopicName(StrBytes::from_static_str(TOPIC));
        t.partition_indexes = vec![2, 1];
        of.topics = Some(vec![t]);
        let r: OffsetFetchResponse = coord.call(ApiKey::OffsetFetch, ov, &of)?;
        let got: Vec<(i32, i64)> =
            r.topics[0].partitions.iter().map(|p| (p.partition_index, p.committed_offset)).collect();
        ensure!(got == vec![(2, 5 + i64::from(round)), (1, -1)], "OffsetFetch v{ov}: {got:?}");
        // ListGroups and DescribeGroups see the member.
        let lv = v(ApiKey::ListGroups)?;
        let r: ListGroupsResponse = coord.call(ApiKey::ListGroups, lv, &ListGroupsRequest::default())?;
        ensure!(
            r.groups
                .iter()
                .any(|g| g.group_id.as_str() == group && (lv < 4 || g.group_state.as_str() == "Stable")),
            "ListGroups v{lv}"
        );
        let dv = v(ApiKey::DescribeGroups)?;
        let mut dg = DescribeGroupsRequest::default();
        dg.groups = vec![gid()];
        let r: DescribeGroupsResponse = coord.call(ApiKey::DescribeGroups, dv, &dg)?;
        let d = &r.groups[0];
        ensure!(d.group_state.as_str() == "Stable" && d.members.len() == 1, "DescribeGroups v{dv}: {d:?}");
        ensure!(
            d.members[0].member_assignment == Bytes::from_static(b"kv:0,1,2"),
            "DescribeGroups v{dv}: assignment"
        );
        // LeaveGroup: the group is empty; its offsets stay.
        let lgv = v(ApiKey::LeaveGroup)?;
        let mut leave = LeaveGroupRequest::default();
        leave.group_id = gid();
        if lgv >= 3 {
            let mut m = MemberIdentity::default();
            m.member_id = member.clone();
            leave.members = vec![m];
        } else {
            leave.member_id = member.clone();
        }
        let r: LeaveGroupResponse = coord.call(ApiKey::LeaveGroup, lgv, &leave)?;
        let code = if lgv >= 3 { r.members.first().map_or(-1, |m| m.error_code) } else { r.error_code };
        ensure!(r.error_code == 0 && code == 0, "LeaveGroup v{lgv}: {r:?}");
        let r: HeartbeatResponse = coord.call(ApiKey::Heartbeat, hv, &hb)?;
        ensure!(r.error_code == 25, "after leaving: UNKNOWN_MEMBER_ID, got {}", r.error_code);
        let r: DescribeGroupsResponse = coord.call(ApiKey::DescribeGroups, dv, &dg)?;
        ensure!(
            r.groups[0].group_state.as_str() == "Empty",
            "DescribeGroups v{dv} after leaving: {:?}",
            r.groups[0]
        );
    }
    // A node that does not coordinate says so.
    let leader = c
        .nodes
        .keys()
        .copied()
        .find(|n| {
            let mut find = FindCoordinatorRequest::default();
            find.key = StrBytes::from_static_str("x");
            Conn::open(&c.node(1).kafka_addr)
                .and_then(|mut conn| {
                    conn.call::<_, FindCoordinatorResponse>(ApiKey::FindCoordinator, 3, &find)
                })
                .is_ok_and(|r| r.node_id.0 as u64 == *n)
        })
        .context("the coordinator")?;
    let other = c.nodes.keys().copied().find(|n| *n != leader).context("another node")?;
    let mut hb = HeartbeatRequest::default();
    hb.group_id = GroupId(StrBytes::from_static_str("g0"));
    hb.member_id = StrBytes::from_static_str("m");
    let r: HeartbeatResponse = Conn::open(&c.node(other).kafka_addr)?.call(ApiKey::Heartbeat, 4, &hb)?;
    ensure!(r.error_code == 16, "NOT_COORDINATOR from node {other}, got {}", r.error_code);
    Ok(())
}

#[test]
fn kafka_protocol_every_advertised_version() -> anyhow::Result<()> {
    let c = Cluster::start(3)?;
    let result = scenario(&c);
    if result.is_err() {
        for id in c.nodes.keys() {
            eprintln!("--- node {id} log tail ---\n{}", c.log_tail(*id, 30));
        }
    }
    result
}

fn scenario(c: &Cluster) -> anyhow::Result<()> {
    let out = c.ctl(
        &["topic", "create", TOPIC, "--partitions", "3", "--replication-factor", "3"],
        None,
        CTL_TIMEOUT,
    )?;
    ensure!(out.ok(), "create topic: {}", out.stderr);
    let mut conn = Conn::open(&c.node(1).kafka_addr)?;

    // ApiVersions: what is advertised is what is tested below, version by version.
    let versions: ApiVersionsResponse = conn.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())?;
    ensure!(versions.error_code == 0);
    let range = |key: ApiKey| {
        versions
            .api_keys
            .iter()
            .find(|a| a.api_key == key as i16)
            .map(|a| a.min_version..=a.max_version)
            .with_context(|| format!("{key:?} is advertised"))
    };
    let advertised: std::collections::BTreeSet<i16> = versions.api_keys.iter().map(|a| a.api_key).collect();
    let tested = [
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::Metadata,
        ApiKey::ApiVersions,
        ApiKey::InitProducerId,
        ApiKey::FindCoordinator,
        ApiKey::JoinGroup,
        ApiKey::SyncGroup,
        ApiKey::Heartbeat,
        ApiKey::LeaveGroup,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::ListGroups,
        ApiKey::DescribeGroups,
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::CreatePartitions,
        ApiKey::DescribeConfigs,
        ApiKey::AlterConfigs,
        ApiKey::IncrementalAlterConfigs,
        ApiKey::SaslHandshake,
        ApiKey::SaslAuthenticate,
    ];
    ensure!(
        advertised == tested.iter().map(|k| *k as i16).collect(),
        "advertised {advertised:?}: every advertised API must be tested here"
    );
    for v in range(ApiKey::ApiVersions)? {
        let r: ApiVersionsResponse = conn.call(ApiKey::ApiVersions, v, &ApiVersionsRequest::default())?;
        ensure!(r.error_code == 0 && r.api_keys.len() == tested.len(), "ApiVersions v{v}");
    }

    // Metadata: brokers with their Kafka addresses and racks, the topic's leaders.
    let mut leaders = Vec::new();
    for v in range(ApiKey::Metadata)? {
        let md: MetadataResponse =
            wait_for(&format!("Metadata v{v} with every leader"), Duration::from_secs(30), || {
                let md: MetadataResponse = conn.call(ApiKey::Metadata, v, &metadata_request(v)).ok()?;
                let t = md.topics.first()?;
                (t.error_code == 0
                    && t.partitions.len() == 3
                    && t.partitions.iter().all(|p| p.error_code == 0 && p.leader_id.0 > 0))
                .then_some(md)
            })?;
        ensure!(md.brokers.len() == 3, "Metadata v{v}: {} brokers", md.brokers.len());
        for b in &md.brokers {
            let n = c.node(b.node_id.0 as u64);
            ensure!(
                format!("{}:{}", b.host.as_str(), b.port) == n.kafka_addr,
                "Metadata v{v}: broker {} address",
                b.node_id.0
            );
            if v >= 1 {
                ensure!(
                    b.rack.as_ref().map(|r| r.as_str()) == Some(eddy_tests::rack(n.id)),
                    "Metadata v{v}: broker {} rack {:?}",
                    b.node_id.0,
                    b.rack
                );
            }
        }
        let t = &md.topics[0];
        ensure!(t.name.as_ref().map(|n| n.as_str()) == Some(TOPIC));
        for p in &t.partitions {
            ensure!(p.replica_nodes.len() == 3, "Metadata v{v}: partition {} replicas", p.partition_index);
            ensure!(p.isr_nodes.contains(&p.leader_id), "Metadata v{v}: the leader is in sync");
        }
        leaders = t.partitions.iter().map(|p| p.leader_id.0 as u64).collect();
    }
    // An unknown topic is named in the answer.
    let mut unknown = metadata_request(12);
    unknown.topics.as_mut().expect("topics")[0].name = Some(TopicName(StrBytes::from_static_str("nope")));
    let md: MetadataResponse = conn.call(ApiKey::Metadata, 12, &unknown)?;
    ensure!(md.topics[0].error_code == 3, "UNKNOWN_TOPIC_OR_PARTITION for an unknown topic");

    // Produce, every version, to partition 0's leader; offsets follow each other.
    let leader = leaders[0];
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    let mut to_leader = Conn::open(&c.node(leader).kafka_addr)?;
    let t0 = 1_700_000_000_000i64;
    let mut sent = Vec::new();
    for v in range(ApiKey::Produce)? {
        let r = record(&format!("k{v}"), &format!("value {v}"), &format!("h{v}"), t0 + i64::from(v));
        let resp: ProduceResponse = to_leader.call(
            ApiKey::Produce,
            v,
            &produce_request(0, batch(std::slice::from_ref(&r), Compression::None)?, -1),
        )?;
        let (code, offset) = produced(&resp)?;
        ensure!(code == 0, "Produce v{v}: error {code}");
        ensure!(offset == sent.len() as i64, "Produce v{v}: offset {offset}, expected {}", sent.len());
        sent.push(r);
    }
    // A follower refuses a produce with NOT_LEADER_OR_FOLLOWER, which sends a client to the leader.
    let mut to_follower = Conn::open(&c.node(follower).kafka_addr)?;
    let resp: ProduceResponse = to_follower.call(
        ApiKey::Produce,
        9,
        &produce_request(0, batch(&sent[..1], Compression::None)?, -1),
    )?;
    ensure!(produced(&resp)?.0 == 6, "produce on a follower: {:?}", produced(&resp));
    // A batch whose CRC does not match, and a compressed batch, are refused by code.
    let mut corrupt = batch(&sent[..1], Compression::None)?.to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let resp: ProduceResponse =
        to_leader.call(ApiKey::Produce, 9, &produce_request(0, Bytes::from(corrupt), -1))?;
    ensure!(produced(&resp)?.0 == 2, "CORRUPT_MESSAGE: {:?}", produced(&resp));

    // Fetch, every version, from a follower: it serves what the leader acknowledged.
    for v in range(ApiKey::Fetch)? {
        let resp: FetchResponse =
            wait_for(&format!("Fetch v{v} from the follower"), Duration::from_secs(20), || {
                let resp: FetchResponse =
                    to_follower.call(ApiKey::Fetch, v, &fetch_request(0, 0, 500)).ok()?;
                let p = &resp.responses.first()?.partitions.first()?;
                (p.error_code == 0 && p.high_watermark == sent.len() as i64).then_some(resp)
            })?;
        let p = &resp.responses[0].partitions[0];
        let records: Vec<Record> =
            RecordBatchDecoder::decode_all(&mut p.records.clone().context("records")?)?
                .into_iter()
                .flat_map(|s| s.records)
                .collect();
        ensure!(records.len() == sent.len(), "Fetch v{v}: {} records", records.len());
        for (i, (got, want)) in records.iter().zip(&sent).enumerate() {
            ensure!(got.offset == i as i64, "Fetch v{v}: offset");
            ensure!(got.key == want.key && got.value == want.value, "Fetch v{v}: record {i}");
            ensure!(
                got.headers == want.headers && got.timestamp == want.timestamp,
                "Fetch v{v}: record {i} headers/timestamp"
            );
        }
    }
    // KIP-392: the leader sends a consumer in a follower's rack to that follower (no records),
    // and serves one in its own rack.
    for (rack, want) in [(eddy_tests::rack(follower), follower as i32), (eddy_tests::rack(leader), -1)] {
        let mut req = fetch_request(0, 0, 0);
        req.rack_id = StrBytes::from_string(rack.to_owned());
        let resp: FetchResponse = to_leader.call(ApiKey::Fetch, 12, &req)?;
        let p = &resp.responses[0].partitions[0];
        ensure!(
            p.preferred_read_replica.0 == want,
            "rack {rack}: preferred read replica {:?}",
            p.preferred_read_replica
        );
        let n = RecordBatchDecoder::decode_all(&mut p.records.clone().unwrap_or_default())?.len();
        ensure!((n == 0) == (want > 0), "rack {rack}: records only without a redirect");
    }

    // A long poll waits for a record and answers when it arrives (not after the whole wait).
    let next = sent.len() as i64;
    let poll = to_follower.send(ApiKey::Fetch, 12, &fetch_request(0, next, 15_000))?;
    let started = std::time::Instant::now();
    let resp: ProduceResponse = to_leader.call(
        ApiKey::Produce,
        9,
        &produce_request(0, batch(&[record("late", "late", "x", t0 + 100)], Compression::None)?, -1),
    )?;
    ensure!(produced(&resp)? == (0, next));
    let resp: FetchResponse = to_follower.receive(ApiKey::Fetch, 12, poll)?;
    let p = &resp.responses[0].partitions[0];
    let got = RecordBatchDecoder::decode_all(&mut p.records.clone().context("records")?)?;
    ensure!(got.iter().map(|s| s.records.len()).sum::<usize>() == 1, "the long poll returned the new record");
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "answered when the record arrived: {:?}",
        started.elapsed()
    );
    // Below the log start: OFFSET_OUT_OF_RANGE is not possible without retention; a negative offset is invalid.
    let resp: FetchResponse = to_follower.call(ApiKey::Fetch, 12, &fetch_request(0, -5, 0))?;
    ensure!(resp.responses[0].partitions[0].error_code != 0, "a negative offset is refused");
    // Past the end, on the leader (which has applied an entry of its term) and on a follower
    // (which tells the client to go back to the leader): OFFSET_OUT_OF_RANGE, as in Kafka, at
    // once and not after the long poll; at the end: a long poll.
    for conn in [&mut to_leader, &mut to_follower] {
        let started = std::time::Instant::now();
        let resp: FetchResponse = conn.call(ApiKey::Fetch, 12, &fetch_request(0, next + 10, 10_000))?;
        let p = &resp.responses[0].partitions[0];
        ensure!(p.error_code == 1, "past the end: OFFSET_OUT_OF_RANGE, not {}", p.error_code);
        ensure!(started.elapsed() < Duration::from_secs(5), "answered at once: {:?}", started.elapsed());
    }
    let resp: FetchResponse = to_leader.call(ApiKey::Fetch, 12, &fetch_request(0, next + 1, 200))?;
    ensure!(resp.responses[0].partitions[0].error_code == 0, "at the end: no error");
    // A request's max_bytes bounds the whole answer even when a partition may have more: the
    // first record always, then what fits.
    let mut small = fetch_request(0, 0, 0);
    small.max_bytes = 1;
    let resp: FetchResponse = to_leader.call(ApiKey::Fetch, 12, &small)?;
    let got = RecordBatchDecoder::decode_all(
        &mut resp.responses[0].partitions[0].records.clone().context("records")?,
    )?;
    let n: usize = got.iter().map(|s| s.records.len()).sum();
    ensure!(n == 1, "max_bytes 1 with 1 MiB per partition: one record, not {n}");

    // ListOffsets, every version: earliest, latest, by timestamp.
    let total = next + 1;
    for v in range(ApiKey::ListOffsets)? {
        for (ts, want) in
            [(-2i64, 0i64), (-1, total), (t0 + 3, 0), (t0 + 5, 2), (t0 + 100, next), (t0 + 1_000, -1)]
        {
            let resp: ListOffsetsResponse =
                to_leader.call(ApiKey::ListOffsets, v, &list_offsets_request(0, ts))?;
            let p = &resp.topics[0].partitions[0];
            ensure!(
                p.error_code == 0 && p.offset == want,
                "ListOffsets v{v} timestamp {ts}: offset {} (error {}), expected {want}",
                p.offset,
                p.error_code
            );
        }
    }

    // InitProducerId, every version, and Kafka's idempotence rules on partition 1.
    let mut pids = Vec::new();
    for v in range(ApiKey::InitProducerId)? {
        let mut req = InitProducerIdRequest::default();
        req.transactional_id = None;
        req.transaction_timeout_ms = 60_000;
        let r: InitProducerIdResponse = conn.call(ApiKey::InitProducerId, v, &req)?;
        ensure!(
            r.error_code == 0 && r.producer_id.0 > 0 && r.producer_epoch == 0,
            "InitProducerId v{v}: {r:?}"
        );
        pids.push(r.producer_id.0);
    }
    pids.dedup();
    ensure!(pids.len() == range(ApiKey::InitProducerId)?.count(), "every producer id is new");
    let pid = pids[0];
    let mut to_leader1 = Conn::open(&c.node(leaders[1]).kafka_addr)?;
    let idempotent = |seq: i32, n: usize| -> anyhow::Result<Bytes> {
        let records: Vec<Record> = (0..n)
            .map(|i| {
                let mut r = record("p", &format!("seq {}", seq as usize + i), "x", t0);
                r.producer_id = pid;
                r.producer_epoch = 0;
                r.sequence = seq + i as i32;
                r.offset = i as i64;
                r
            })
            .collect();
        batch(&records, Compression::None)
    };
    let first: ProduceResponse =
        to_leader1.call(ApiKey::Produce, 9, &produce_request(1, idempotent(0, 2)?, -1))?;
    let (code, base) = produced(&first)?;
    ensure!(code == 0, "idempotent produce: error {code}");
    let again: ProduceResponse =
        to_leader1.call(ApiKey::Produce, 9, &produce_request(1, idempotent(0, 2)?, -1))?;
    ensure!(
        produced(&again)? == (0, base),
        "a duplicate batch is answered with its original offset: {:?}",
        produced(&again)
    );
    let gap: ProduceResponse =
        to_leader1.call(ApiKey::Produce, 9, &produce_request(1, idempotent(5, 1)?, -1))?;
    ensure!(produced(&gap)?.0 == 45, "a sequence gap is OUT_OF_ORDER_SEQUENCE_NUMBER: {:?}", produced(&gap));
    let next_batch: ProduceResponse =
        to_leader1.call(ApiKey::Produce, 9, &produce_request(1, idempotent(2, 1)?, -1))?;
    ensure!(produced(&next_batch)? == (0, base + 2), "the next sequence is appended");

    group_rounds(c, &range)?;
    admin_rounds(c, &range)?;

    // acks=0 gets no response: the next answer on the connection is the next request's.
    let silent =
        to_leader.send(ApiKey::Produce, 9, &produce_request(0, batch(&sent[..1], Compression::None)?, 0))?;
    let md: MetadataResponse = to_leader.call(ApiKey::Metadata, 12, &metadata_request(12))?;
    ensure!(md.topics.len() == 1, "answered after the acks=0 produce (correlation {silent} got no response)");

    // Pipelined requests are answered in order.
    let mut pipelined = Vec::new();
    for v in [0i16, 12, 3, 9] {
        let (corr, frame) = conn.frame(ApiKey::Metadata, v, &metadata_request(v))?;
        conn.stream.write_all(&frame)?;
        pipelined.push((v, corr));
    }
    for (v, corr) in pipelined {
        let _: MetadataResponse = conn.receive(ApiKey::Metadata, v, corr)?;
    }

    // Bad frames close only their own connection; the node keeps serving the others.
    let bad_frames: Vec<(&str, Vec<u8>)> = vec![
        ("an oversized frame", (200i32 << 20).to_be_bytes().to_vec()),
        ("a negative length", (-1i32).to_be_bytes().to_vec()),
        (
            "an unknown API key",
            [&14i32.to_be_bytes()[..], &[0x7f, 0x7f, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0, 0]].concat(),
        ),
        (
            "garbage in a Metadata body",
            [&12i32.to_be_bytes()[..], &[0, 3, 0, 12, 0, 0, 0, 1, 0x55, 0x55, 0x55, 0x55]].concat(),
        ),
    ];
    for (what, bytes) in bad_frames {
        let mut bad = Conn::open(&c.node(1).kafka_addr)?;
        bad.stream.write_all(&bytes)?;
        ensure!(bad.closed(), "{what}: the connection is closed");
        let r: ApiVersionsResponse = conn.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())?;
        ensure!(r.error_code == 0, "{what}: the other connection still works");
    }
    // A client that sends half a frame and goes away.
    let mut half = Conn::open(&c.node(1).kafka_addr)?;
    half.stream.write_all(&100i32.to_be_bytes())?;
    half.stream.write_all(&[0, 18])?;
    drop(half);
    let r: ApiVersionsResponse = conn.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())?;
    ensure!(r.error_code == 0, "still serving after a truncated frame");
    ensure!(c.running().len() == 3, "every node is still running");

    // SASL (on a listener that does not require it, it still authenticates): a user's token
    // with PLAIN at every SaslAuthenticate version; an unknown mechanism and a wrong token are
    // refused, the latter closing the connection after the answer.
    let out = c.ctl(&["user", "create", "kafka-user"], None, CTL_TIMEOUT)?;
    ensure!(out.ok(), "user create: {out:?}");
    let token = out.json()?["token"].as_str().context("token")?.to_owned();
    for hv in range(ApiKey::SaslHandshake)?.filter(|v| *v >= 1) {
        let mut conn = Conn::open(&c.node(2).kafka_addr)?;
        let mut hs = SaslHandshakeRequest::default();
        hs.mechanism = StrBytes::from_static_str("GSSAPI");
        let r: SaslHandshakeResponse = conn.call(ApiKey::SaslHandshake, hv, &hs)?;
        ensure!(
            r.error_code == 33,
            "an unknown mechanism is UNSUPPORTED_SASL_MECHANISM, got {}",
            r.error_code
        );
        ensure!(
            r.mechanisms.iter().any(|m| m.as_str() == "SCRAM-SHA-512"),
            "mechanisms offered: {:?}",
            r.mechanisms
        );
    }
    for av in range(ApiKey::SaslAuthenticate)? {
        for (password, ok) in [(token.clone(), true), (format!("kafka-user.{}", "C".repeat(43)), false)] {
            let mut conn = Conn::open(&c.node(2).kafka_addr)?;
            let mut hs = SaslHandshakeRequest::default();
            hs.mechanism = StrBytes::from_static_str("PLAIN");
            let r: SaslHandshakeResponse = conn.call(ApiKey::SaslHandshake, 1, &hs)?;
            ensure!(r.error_code == 0, "PLAIN handshake: {}", r.error_code);
            let mut auth = SaslAuthenticateRequest::default();
            auth.auth_bytes = bytes::Bytes::from(format!("\0kafka-user\0{password}"));
            let r: SaslAuthenticateResponse = conn.call(ApiKey::SaslAuthenticate, av, &auth)?;
            if ok {
                ensure!(r.error_code == 0, "SaslAuthenticate v{av}: {:?}", r.error_message);
                let md: MetadataResponse = conn.call(ApiKey::Metadata, 12, &metadata_request(12))?;
                ensure!(!md.brokers.is_empty(), "requests go on after authentication");
            } else {
                ensure!(
                    r.error_code == 58,
                    "a wrong token is SASL_AUTHENTICATION_FAILED, got {}",
                    r.error_code
                );
                let after: anyhow::Result<MetadataResponse> =
                    conn.call(ApiKey::Metadata, 12, &metadata_request(12));
                ensure!(after.is_err(), "the connection closes after a failed authentication");
            }
        }
    }

    Ok(())
}
