//! A node whose state store was damaged on disk: a partition replica whose stored state fails
//! its checksum does not start and is reported damaged (its node serves on), and damage to the
//! metadata state or to the node's identity stops the start with an error naming the tree.

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
use eddy_raft::kv::StateStore;
use eddy_raft::mem::MemStateStore;
use eddy_raft::transport::TcpConnector;
use eddy_raft::vfs::RealVfs;

struct Node {
    config: NodeConfig,
    store: MemStateStore,
}

impl Node {
    async fn start(&self) -> anyhow::Result<eddy_node::node::NodeHandle> {
        let client = tokio::net::TcpListener::bind(&self.config.client_addr).await?;
        let raft = tokio::net::TcpListener::bind(&self.config.raft_addr).await?;
        let probes = ProbeSocket::Thread(std::net::UdpSocket::bind(&self.config.raft_addr)?);
        let env = NodeEnv {
            vfs: Arc::new(RealVfs::default()),
            state_store: Arc::new(self.store.clone()),
            clock: Arc::new(SystemClock),
            connector: Arc::new(TcpConnector),
            seed: 7,
            replica_open_delay: Duration::ZERO,
            #[cfg(feature = "planted-bugs")]
            bugs: Default::default(),
        };
        eddy_node::node::start(self.config.clone(), env, tcp_incoming(client), tcp_incoming(raft), probes)
            .await
    }

    /// The first entry of tree `name` whose key starts with `prefix`.
    fn some_key(&self, name: &str, prefix: &[u8]) -> Vec<u8> {
        let entries = self.store.durable_entries(name);
        entries.into_iter().map(|(k, _)| k).find(|k| k.starts_with(prefix)).expect("a stored entry")
    }
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what} did not happen within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_state_is_refused_and_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let free = |_| -> anyhow::Result<String> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
    };
    let (client_addr, raft_addr) = (free(0)?, free(1)?);
    let node = Node {
        config: NodeConfig {
            node_id: 1,
            data_dir: dir.path().join("data"),
            client_addr: client_addr.clone(),
            raft_addr: raft_addr.clone(),
            initial_members: vec![MemberConfig { id: 1, client_addr: client_addr.clone(), raft_addr }],
            ..NodeConfig::default()
        },
        store: MemStateStore::default(),
    };

    // A partition with events in it, and its stored state flushed.
    let handle = node.start().await?;
    let channel = eddy_raft::transport::endpoint(&client_addr)?.connect_lazy();
    let mut c = BrokerClient::new(channel);
    until("readiness", async || handle.is_ready().then_some(())).await?;
    c.create_topic(pb::CreateTopicRequest {
        name: "t".into(),
        partitions: 1,
        replication_factor: 1,
        config: Default::default(),
    })
    .await?;
    let produce = pb::ProduceRequest {
        topic: "t".into(),
        partition: Some(0),
        records: vec![pb::Record {
            key: None,
            value: b"v".to_vec().into(),
            headers: vec![],
            timestamp_ms: None,
        }],
        ..Default::default()
    };
    until("a write", async || c.produce(produce.clone()).await.ok()).await?;
    let group = handle.meta.view().state.topics["t"].partitions[0].group_id;
    // The partition persists its state at an apply a second or more after its last persist.
    let tree = eddy_node::partition::sm::tree_name(group);
    until("the partition's state persisted", async || {
        c.produce(produce.clone()).await.ok()?;
        node.store.flush().await.ok()?;
        node.store.durable_entries(&tree).iter().any(|(k, _)| k.starts_with(b"o")).then_some(())
    })
    .await?;
    handle.shutdown().await;
    node.store.flush().await?;

    // A flipped byte in an offset-index entry: the replica does not start, and says why.
    let key = node.some_key(&tree, b"o");
    assert!(node.store.corrupt(&tree, &key, 2, 0x10));
    let handle = node.start().await?;
    let why = until("the replica reported damaged", async || handle.replicas.damaged().get(&group).cloned())
        .await?;
    assert!(why.contains(&format!("tree {tree}")) && why.contains("fails its checksum"), "{why}");
    let fetch =
        c.fetch(pb::FetchRequest { topic: "t".into(), partition: 0, offset: 0, ..Default::default() }).await;
    assert!(fetch.is_err(), "a damaged replica served a fetch: {fetch:?}");
    handle.shutdown().await;
    node.store.flush().await?;

    // The metadata state, then the node's identity: the start fails, naming the tree.
    for (tree, key) in [("meta", b"state".to_vec()), ("node", b"id".to_vec())] {
        assert!(node.store.corrupt(tree, &key, 5, 0x01));
        let e = node.start().await.err().expect("a node with damaged state must not start");
        let e = format!("{e:#}");
        assert!(e.contains(&format!("tree {tree}")) && e.contains("fails its checksum"), "{e}");
        assert!(node.store.corrupt(tree, &key, 5, 0x01), "undone");
    }
    Ok(())
}
