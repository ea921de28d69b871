//! Server-side validation on a one-node cluster run in-process: every malformed request gets
//! `INVALID_ARGUMENT` (or `NOT_FOUND`) with a message naming the field, whatever the client
//! did or did not check, and the node keeps serving.

use std::sync::Arc;
use std::time::Duration;

use eddy_node::config::MemberConfig;
use eddy_node::config::NodeConfig;
use eddy_node::env::NodeEnv;
use eddy_node::env::ProbeSocket;
use eddy_node::env::SystemClock;
use eddy_node::env::tcp_incoming;
use eddy_proto::v1 as pb;
use eddy_proto::v1::broker_client::BrokerClient;
use eddy_raft::kv::SledStateStore;
use eddy_raft::transport::TcpConnector;
use eddy_raft::vfs::RealVfs;
use tonic::Code;
use tonic::transport::Channel;

async fn one_node() -> anyhow::Result<(eddy_node::node::NodeHandle, BrokerClient<Channel>, tempfile::TempDir)>
{
    let dir = tempfile::tempdir()?;
    let client = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let raft = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (client_addr, raft_addr) = (client.local_addr()?.to_string(), raft.local_addr()?.to_string());
    let probes = ProbeSocket::Thread(std::net::UdpSocket::bind(&raft_addr)?);
    let config = NodeConfig {
        node_id: 1,
        data_dir: dir.path().join("data"),
        client_addr: client_addr.clone(),
        raft_addr: raft_addr.clone(),
        initial_members: vec![MemberConfig { id: 1, client_addr: client_addr.clone(), raft_addr }],
        ..NodeConfig::default()
    };
    let env = NodeEnv {
        vfs: Arc::new(RealVfs::default()),
        state_store: Arc::new(SledStateStore::open(&dir.path().join("state"))?),
        clock: Arc::new(SystemClock),
        connector: Arc::new(TcpConnector),
        seed: 7,
        replica_open_delay: std::time::Duration::ZERO,
        #[cfg(feature = "planted-bugs")]
        bugs: Default::default(),
    };
    let node = eddy_node::node::start(config, env, tcp_incoming(client), tcp_incoming(raft), probes).await?;
    let channel = eddy_raft::transport::endpoint(&client_addr)?.connect_lazy();
    let client = BrokerClient::new(channel).max_encoding_message_size(64 << 20);
    Ok((node, client, dir))
}

fn record(value: Vec<u8>) -> pb::Record {
    pb::Record { key: None, value: value.into(), headers: vec![], timestamp_ms: None }
}

async fn wait_writable(c: &mut BrokerClient<Channel>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .produce(pb::ProduceRequest {
                topic: "t".into(),
                partition: Some(0),
                records: vec![record(b"first".to_vec())],
                ..Default::default()
            })
            .await;
        if r.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "partition never became writable: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_with_the_field_named() -> anyhow::Result<()> {
    let (node, mut c, _dir) = one_node().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !node.is_ready() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "node never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.create_topic(pb::CreateTopicRequest {
        name: "t".into(),
        partitions: 2,
        replication_factor: 1,
        config: Default::default(),
    })
    .await?;
    wait_writable(&mut c).await?;

    let produce = |records: Vec<pb::Record>, partition: Option<u32>, topic: &str| pb::ProduceRequest {
        topic: topic.into(),
        partition,
        records,
        ..Default::default()
    };
    let cases: Vec<(pb::ProduceRequest, Code, &str)> = vec![
        (produce(vec![record(vec![b'x'; 16 << 20])], Some(0), "t"), Code::InvalidArgument, "records[0]"),
        (produce(vec![], Some(0), "t"), Code::InvalidArgument, "records"),
        (produce(vec![record(b"v".to_vec())], Some(9), "t"), Code::NotFound, "partition 9"),
        (produce(vec![record(b"v".to_vec())], Some(0), "nope"), Code::NotFound, "\"nope\""),
        (produce(vec![record(b"v".to_vec())], Some(0), "bad/name"), Code::InvalidArgument, "topic:"),
        (produce(vec![record(b"v".to_vec()); 10_001], Some(0), "t"), Code::InvalidArgument, "records:"),
    ];
    for (req, code, needle) in cases {
        let err = c.produce(req).await.expect_err("must be refused");
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(needle), "message {:?} should contain {needle:?}", err.message());
        assert!(
            err.metadata().get(eddy_proto::error_keys::CODE).is_some(),
            "stable error code missing: {err:?}"
        );
    }
    let fetch_err = c
        .fetch(pb::FetchRequest { topic: "t".into(), partition: 5, offset: 0, ..Default::default() })
        .await
        .expect_err("unknown partition");
    assert_eq!(fetch_err.code(), Code::NotFound);
    let create_err = c
        .create_topic(pb::CreateTopicRequest {
            name: "u".into(),
            partitions: 1,
            replication_factor: 1,
            config: [("no.such.setting".to_string(), "1".to_string())].into(),
        })
        .await
        .expect_err("unknown config");
    assert!(create_err.message().contains("no.such.setting"), "{create_err:?}");

    // Still serving: the valid record written before is readable and a new one is accepted.
    let ok = c.produce(produce(vec![record(b"after".to_vec())], Some(0), "t")).await?.into_inner();
    let f = c
        .fetch(pb::FetchRequest {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            max_wait_ms: 1000,
            ..Default::default()
        })
        .await?
        .into_inner();
    let values: Vec<&[u8]> = f.records.iter().map(|r| r.value.as_ref()).collect();
    assert_eq!(values.last().copied(), Some(b"after".as_slice()));
    assert_eq!(f.records.last().map(|r| r.offset), Some(ok.base_offset));
    node.shutdown().await;
    Ok(())
}
