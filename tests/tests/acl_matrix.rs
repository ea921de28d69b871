//! Acceptance 4 of issue 11 for gRPC: every method of `eddy.v1.Broker`, `Admin`, `Groups` and
//! `Raft` (and health), called by a user with no binding, with literal allows of exactly what
//! the method needs, with prefixed allows, with a deny over those allows, and by a superuser.
//! Each call names resources that do not exist (or is invalid past its authorization), so an
//! allowed call changes nothing; what is checked is whether authorization let it through.
//! Listings are checked to be filtered.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use eddy_proto::v1 as pb;
use eddy_tests::CTL_TIMEOUT;
use eddy_tests::Cluster;
use tonic::transport::Channel;

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
        "Health/Check" => {
            let h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            go!(h, check, tonic_health::pb::HealthCheckRequest { service: String::new() })
        }
        other => panic!("no call for {other}"),
    }
}

/// Whether authorization let each of `methods` through.
async fn run_all(ch: &Channel, token: Option<&str>, methods: &[&str]) -> Vec<bool> {
    let mut out = Vec::new();
    for m in methods {
        out.push(passed(&call(ch, token, m).await));
    }
    out
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

#[test]
fn every_grpc_method_under_every_kind_of_binding() -> anyhow::Result<()> {
    let c = Cluster::start_secure(1, false)?;
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
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&ca));
        let user = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.clone())?.connect().await?;
        let admin = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.identity(tonic::transport::Identity::from_pem(&cert, &key)))?
            .connect()
            .await?;
        let alice = Some(token.as_str());
        let mut table = Vec::new();
        // Methods that need the same bindings share each change of the bindings.
        let mut needs: Vec<Need> = Vec::new();
        for (_, need) in METHODS {
            if !needs.contains(need) {
                needs.push(*need);
            }
        }
        for need in needs {
            let methods: Vec<&str> = METHODS.iter().filter(|(_, n)| *n == need).map(|(m, _)| *m).collect();
            let bindings: &[(&str, &str)] = match need {
                Need::Bindings(b) => b,
                _ => &[],
            };
            let mut got = vec![[false; 6]; methods.len()];
            let record = |i: usize, out: Vec<bool>, got: &mut Vec<[bool; 6]>| {
                for (g, o) in got.iter_mut().zip(out) {
                    g[i] = o;
                }
            };
            // No binding.
            record(0, run_all(&user, alice, &methods).await, &mut got);
            // Literal allows of what the methods need; then a deny of everything on the same
            // resources beside them (deny over allow).
            let literal: Vec<_> = bindings.iter().map(|(rt, op)| binding(rt, op, false, false)).collect();
            set_acls(&admin, &literal, true).await?;
            record(1, run_all(&user, alice, &methods).await, &mut got);
            let denies: Vec<_> = bindings.iter().map(|(rt, _)| binding(rt, "all", false, true)).collect();
            set_acls(&admin, &denies, true).await?;
            record(3, run_all(&user, alice, &methods).await, &mut got);
            set_acls(&admin, &denies, false).await?;
            set_acls(&admin, &literal, false).await?;
            // Prefixed allows.
            let prefixed: Vec<_> = bindings.iter().map(|(rt, op)| binding(rt, op, true, false)).collect();
            set_acls(&admin, &prefixed, true).await?;
            record(2, run_all(&user, alice, &methods).await, &mut got);
            set_acls(&admin, &prefixed, false).await?;
            // The superuser, by its certificate; and nobody at all.
            record(4, run_all(&admin, None, &methods).await, &mut got);
            record(5, run_all(&user, None, &methods).await, &mut got);
            let expected = match need {
                Need::Public => [true, true, true, true, true, true],
                Need::AnyUser => [true, true, true, true, true, false],
                Need::Nodes => [false; 6],
                Need::Bindings(_) => [false, true, true, false, true, false],
            };
            for (m, g) in methods.iter().zip(&got) {
                let [none, lit, prefix, deny, superuser, anonymous] = *g;
                table.push(format!("{m:28} none={none:5} literal={lit:5} prefix={prefix:5} deny-over-allow={deny:5} superuser={superuser:5} anonymous={anonymous:5}"));
                ensure!(
                    *g == expected,
                    "{m}: [none, literal, prefixed, deny over allow, superuser, anonymous] = {g:?}, expected {expected:?}"
                );
            }
        }
        eprintln!("{}", table.join("\n"));

        // Listings are filtered, not refused.
        let list = |ch: Channel, tok: Option<String>| async move {
            let r = pb::broker_client::BrokerClient::new(ch).list_topics(req(pb::ListTopicsRequest {}, tok.as_deref())).await?;
            anyhow::Ok(r.into_inner().topics.into_iter().map(|t| t.name).collect::<Vec<_>>())
        };
        ensure!(list(user.clone(), Some(token.clone())).await?.is_empty(), "alice sees no topic without a binding");
        let see = [binding("topic", "read", true, false)];
        set_acls(&admin, &see, true).await?;
        let seen = list(user.clone(), Some(token.clone())).await?;
        ensure!(seen == ["orders.visible"], "alice sees what she may describe: {seen:?}");
        let all = list(admin.clone(), None).await?;
        ensure!(all.len() == 2, "the superuser sees every topic: {all:?}");
        anyhow::Ok(())
    })
}
