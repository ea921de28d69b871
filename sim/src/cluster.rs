//! The simulated cluster: one turmoil host per node, each running the real `eddy_node` code on
//! its own simulated disk and state store. Those survive the host: a crash throws away what was
//! not synced, and a restart runs the node again on what is left.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::UNIX_EPOCH;

use eddy_node::config::MemberConfig;
use eddy_node::config::NodeConfig;
use eddy_node::control::manager::Replicas;
use eddy_node::env::Clock;
use eddy_node::env::NodeEnv;
use eddy_node::env::PlantedBugs;
use eddy_node::env::ProbeSocket;
use eddy_node::meta::MetaHandle;
use eddy_raft::NodeId;
use eddy_raft::mem::MemDisk;
use eddy_raft::mem::MemStateStore;

use crate::net;

pub const CLIENT_PORT: u16 = 9091;
pub const RAFT_PORT: u16 = 9191;
/// The simulated wall clock starts here (2026-01-01T00:00:00Z), the same in every run.
pub const EPOCH_SECS: u64 = 1_767_225_600;

/// The wall clock of a simulated host.
struct SimClock;

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        turmoil::since_epoch().map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

pub fn epoch() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_secs(EPOCH_SECS)
}

pub fn host_name(id: NodeId) -> String {
    format!("n{id}")
}

pub fn client_addr(id: NodeId) -> String {
    format!("{}:{CLIENT_PORT}", host_name(id))
}

/// What the driver can see of a running node.
#[derive(Clone)]
pub struct NodeRefs {
    pub meta: MetaHandle,
    pub replicas: Arc<Replicas>,
}

/// A node's durable parts and, while it runs, its handles.
pub struct NodeSlot {
    pub id: NodeId,
    pub disk: MemDisk,
    pub store: MemStateStore,
    pub refs: Arc<Mutex<Option<NodeRefs>>>,
    pub up: bool,
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, NodeSlot>,
    pub seed: u64,
    pub bugs: PlantedBugs,
}

impl Cluster {
    pub fn new(n: u64, seed: u64, bugs: PlantedBugs, fsync_lies: bool) -> Self {
        let nodes = (1..=n)
            .map(|id| {
                let disk = MemDisk::new();
                disk.set_sync_latency(Duration::from_micros(500));
                disk.set_fsync_lies(fsync_lies);
                (
                    id,
                    NodeSlot {
                        id,
                        disk,
                        store: MemStateStore::default(),
                        refs: Arc::new(Mutex::new(None)),
                        up: true,
                    },
                )
            })
            .collect();
        Self { nodes, seed, bugs }
    }

    pub fn brokers(&self) -> Vec<String> {
        self.nodes.keys().map(|id| client_addr(*id)).collect()
    }

    /// Registers every node as a turmoil host.
    pub fn register(&self, sim: &mut turmoil::Sim<'_>) {
        let members: Vec<MemberConfig> = self
            .nodes
            .keys()
            .map(|id| MemberConfig {
                id: *id,
                client_addr: client_addr(*id),
                raft_addr: format!("{}:{RAFT_PORT}", host_name(*id)),
            })
            .collect();
        for slot in self.nodes.values() {
            let config = NodeConfig {
                node_id: slot.id,
                data_dir: format!("/data/n{}", slot.id).into(),
                client_addr: client_addr(slot.id),
                raft_addr: format!("{}:{RAFT_PORT}", host_name(slot.id)),
                http_addr: format!("{}:9291", host_name(slot.id)),
                initial_members: members.clone(),
                // Often enough that retention (when a topic has it) acts during the chaos.
                retention_check_interval_ms: 1000,
                ..NodeConfig::default()
            };
            let (disk, store, refs) = (slot.disk.clone(), slot.store.clone(), slot.refs.clone());
            let seed = self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ slot.id;
            let bugs = self.bugs;
            sim.host(host_name(slot.id), move || {
                let env = NodeEnv {
                    vfs: Arc::new(disk.clone()),
                    state_store: Arc::new(store.clone()),
                    clock: Arc::new(SimClock),
                    connector: Arc::new(net::SimConnector),
                    seed,
                    // 0-39 ms per replica, fixed per node and seed.
                    replica_open_delay: Duration::from_millis((seed >> 11) % 40),
                    bugs,
                };
                let (config, refs) = (config.clone(), refs.clone());
                async move {
                    let client = net::listen(CLIENT_PORT).await?;
                    let raft = net::listen(RAFT_PORT).await?;
                    let probes = ProbeSocket::Task(Arc::new(net::SimDatagrams::bind(RAFT_PORT).await?));
                    let node = eddy_node::node::start(config, env, client, raft, probes)
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                    *refs.lock().expect("refs lock poisoned") =
                        Some(NodeRefs { meta: node.meta.clone(), replicas: node.replicas.clone() });
                    // The node runs until its host crashes.
                    std::future::pending::<()>().await;
                    Ok(())
                }
            });
        }
    }

    pub fn refs(&self, id: NodeId) -> Option<NodeRefs> {
        let slot = self.nodes.get(&id)?;
        if !slot.up {
            return None;
        }
        slot.refs.lock().expect("refs lock poisoned").clone()
    }

    /// Stops a node's host. With `lose_unsynced`, its disk and state store lose what was not
    /// made durable (a power loss); without, they keep everything (a process crash).
    pub fn crash(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        id: NodeId,
        lose_unsynced: Option<&mut dyn FnMut(usize) -> usize>,
        tear: bool,
    ) {
        let Some(slot) = self.nodes.get_mut(&id) else {
            return;
        };
        sim.crash(host_name(id));
        *slot.refs.lock().expect("refs lock poisoned") = None;
        if let Some(pick) = lose_unsynced {
            slot.disk.crash(if tear { Some(pick) } else { None });
            slot.store.crash();
        }
        slot.up = false;
    }

    pub fn restart(&mut self, sim: &mut turmoil::Sim<'_>, id: NodeId) {
        let Some(slot) = self.nodes.get_mut(&id) else {
            return;
        };
        sim.bounce(host_name(id));
        slot.up = true;
    }

    /// Flushes the state store of every running node, as sled does in the background.
    pub fn flush_state_stores(&self) {
        for slot in self.nodes.values().filter(|s| s.up) {
            // MemStateStore::flush does its work when called; the future only reports it.
            drop(eddy_raft::kv::StateStore::flush(&slot.store));
        }
    }

    pub fn down(&self) -> Vec<NodeId> {
        self.nodes.values().filter(|s| !s.up).map(|s| s.id).collect()
    }
}
