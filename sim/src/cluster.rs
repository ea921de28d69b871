//! The simulated cluster: one turmoil host per node, each running the real `eddy_node` code on
//! its own simulated disk and state store. Those survive the host: a crash throws away what was
//! not synced, and a restart runs the node again on what is left.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering;
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

/// The superuser of the simulated cluster, by its client certificate: the driver's setup
/// creates the workload's user and bindings with it.
pub const SIM_ADMIN: &str = "sim-admin";
/// The user every workload client authenticates as, by token.
pub const WORKLOAD_USER: &str = "workload";
/// A user who may only read topic `t0`: the intruder's produces as it must be refused.
pub const READER_USER: &str = "reader";
/// Where a node's certificates are on its simulated disk.
const CERT_DIR: &str = "/certs";

/// The simulated cluster's security, made from the seed: a CA, a certificate per node (so
/// every listener and every channel between nodes is TLS, mutual between nodes), the
/// superuser's client certificate, and the workload user's token. Nodes authenticate every
/// client request and authorize it with ACLs, so the code under test is what a secure
/// production cluster runs. Keys are Ed25519 from the seed (`eddy_ops::pki::Ca::seeded`), so a
/// seed's runs send the same bytes, and so the same TLS records.
pub struct SimSecurity {
    pub ca_pem: String,
    ca: eddy_ops::pki::Ca,
    /// Node certificates, issued when a node is first registered (joiners later, so the
    /// initial nodes' keys do not depend on how many join).
    nodes: Mutex<BTreeMap<NodeId, eddy_ops::pki::Issued>>,
    admin: eddy_ops::pki::Issued,
    seed: u64,
}

/// A user's token secret and the salts of its verifiers.
pub type UserSecret =
    ([u8; eddy_proto::credentials::SECRET_BYTES], [[u8; eddy_proto::credentials::SALT_BYTES]; 3]);

impl SimSecurity {
    fn new(seed: u64, ids: impl Iterator<Item = NodeId>) -> Self {
        let ca = eddy_ops::pki::Ca::seeded("eddy-sim", seed).expect("a seeded CA");
        let nodes = ids.map(|id| (id, ca.node(id, &[host_name(id)]).expect("a node certificate"))).collect();
        let admin = ca.client(SIM_ADMIN).expect("a client certificate");
        Self { ca_pem: ca.issued.cert_pem.clone(), ca, nodes: Mutex::new(nodes), admin, seed }
    }

    /// User `name`'s secret and salts, drawn from the seed.
    pub fn secret_of(&self, name: &str) -> UserSecret {
        use rand::RngCore;
        use rand::SeedableRng;
        let salt = name
            .bytes()
            .fold(0x5eed_70ce_2f1e_a3b1u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let mut rng = rand::rngs::SmallRng::seed_from_u64(self.seed ^ salt);
        let mut secret = [0u8; eddy_proto::credentials::SECRET_BYTES];
        rng.fill_bytes(&mut secret);
        let mut salts = [[0u8; eddy_proto::credentials::SALT_BYTES]; 3];
        salts.iter_mut().for_each(|s| rng.fill_bytes(s));
        (secret, salts)
    }

    /// User `name`'s token.
    pub fn token_of(&self, name: &str) -> eddy_ops::Token {
        eddy_ops::Token(eddy_proto::credentials::token(name, &self.secret_of(name).0))
    }

    /// TLS for the workload's clients: the CA, no certificate.
    pub fn client_tls(&self) -> eddy_ops::TlsOptions {
        eddy_ops::TlsOptions { ca_pem: self.ca_pem.clone(), identity: None }
    }

    /// TLS for the superuser: the CA and its client certificate.
    pub fn admin_tls(&self) -> eddy_ops::TlsOptions {
        let identity = Some((self.admin.cert_pem.clone(), self.admin.key_pem.clone()));
        eddy_ops::TlsOptions { ca_pem: self.ca_pem.clone(), identity }
    }

    /// Puts node `id`'s certificate, key and the CA on its disk, and gives the `[tls]` table
    /// naming them.
    fn install(&self, id: NodeId, disk: &MemDisk) -> eddy_node::config::TlsConfig {
        let dir = std::path::Path::new(CERT_DIR);
        let mut nodes = self.nodes.lock().expect("certificates lock");
        let issued = nodes
            .entry(id)
            .or_insert_with(|| self.ca.node(id, &[host_name(id)]).expect("a node certificate"));
        disk.install(&dir.join("ca.pem"), self.ca_pem.as_bytes());
        disk.install(&dir.join("node.pem"), issued.cert_pem.as_bytes());
        disk.install(&dir.join("node.key"), issued.key_pem.as_bytes());
        eddy_node::config::TlsConfig {
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
            ca: dir.join("ca.pem"),
            require_client_cert: false,
            http: false,
        }
    }
}

pub const CLIENT_PORT: u16 = 9091;
pub const RAFT_PORT: u16 = 9191;
/// The simulated wall clock starts here (2026-01-01T00:00:00Z), the same in every run.
pub const EPOCH_SECS: u64 = 1_767_225_600;

/// The wall clock of a simulated host: the simulation's, plus the host's offset (non-zero while
/// a `clock-jump` fault has set its clock wrong).
struct SimClock(Arc<AtomicI64>);

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        let now = turmoil::since_epoch().map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        now.saturating_add(self.0.load(Ordering::Relaxed))
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
    /// Decommissioned and switched off for good: never restarted.
    pub retired: bool,
    /// How far the host's wall clock is off, in ms (see `FaultClass::ClockJump`). A machine that
    /// loses power sets its clock right when it boots, as NTP does.
    pub clock_offset: Arc<AtomicI64>,
}

impl NodeSlot {
    fn new(id: NodeId, fsync_lies: bool) -> Self {
        let disk = MemDisk::new();
        disk.set_sync_latency(Duration::from_micros(500));
        disk.set_fsync_lies(fsync_lies);
        Self {
            id,
            disk,
            store: MemStateStore::default(),
            refs: Arc::new(Mutex::new(None)),
            up: true,
            retired: false,
            clock_offset: Arc::new(AtomicI64::new(0)),
        }
    }
}

fn member(id: NodeId) -> MemberConfig {
    MemberConfig { id, client_addr: client_addr(id), raft_addr: format!("{}:{RAFT_PORT}", host_name(id)) }
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, NodeSlot>,
    pub seed: u64,
    pub bugs: PlantedBugs,
    pub security: Arc<SimSecurity>,
    fsync_lies: bool,
}

impl Cluster {
    pub fn new(n: u64, seed: u64, bugs: PlantedBugs, fsync_lies: bool) -> Self {
        let nodes = (1..=n).map(|id| (id, NodeSlot::new(id, fsync_lies))).collect();
        let security = Arc::new(SimSecurity::new(seed, 1..=n));
        Self { nodes, seed, bugs, security, fsync_lies }
    }

    pub fn brokers(&self) -> Vec<String> {
        self.nodes.keys().map(|id| client_addr(*id)).collect()
    }

    /// Registers every node as a turmoil host.
    pub fn register(&self, sim: &mut turmoil::Sim<'_>) {
        let members: Vec<MemberConfig> = self.nodes.keys().map(|id| member(*id)).collect();
        for id in self.nodes.keys() {
            self.register_node(sim, *id, members.clone(), Vec::new());
        }
    }

    /// Registers node `id` as a turmoil host that forms the cluster with `initial_members`, or
    /// joins a running one through the client listeners in `join`.
    fn register_node(
        &self,
        sim: &mut turmoil::Sim<'_>,
        id: NodeId,
        initial_members: Vec<MemberConfig>,
        join: Vec<String>,
    ) {
        let slot = &self.nodes[&id];
        let config = NodeConfig {
            node_id: slot.id,
            data_dir: format!("/data/n{}", slot.id).into(),
            client_addr: client_addr(slot.id),
            raft_addr: format!("{}:{RAFT_PORT}", host_name(slot.id)),
            http_addr: format!("{}:9291", host_name(slot.id)),
            initial_members,
            join,
            // Often enough that retention (when a topic has it) acts during the chaos.
            retention_check_interval_ms: 1000,
            tls: Some(self.security.install(slot.id, &slot.disk)),
            authentication: eddy_node::config::Authentication { client: true, kafka: true },
            superusers: vec![format!("User:{SIM_ADMIN}")],
            ..NodeConfig::default()
        };
        let (disk, store, refs) = (slot.disk.clone(), slot.store.clone(), slot.refs.clone());
        let clock_offset = slot.clock_offset.clone();
        let seed = self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ slot.id;
        let bugs = self.bugs;
        sim.host(host_name(slot.id), move || {
            let env = NodeEnv {
                vfs: Arc::new(disk.clone()),
                state_store: Arc::new(store.clone()),
                clock: Arc::new(SimClock(clock_offset.clone())),
                connector: Arc::new(net::SimConnector),
                seed,
                // 0-39 ms per replica, fixed per node and seed.
                replica_open_delay: Duration::from_millis((seed >> 11) % 40),
                bugs,
            };
            let (config, refs, disk) = (config.clone(), refs.clone(), disk.clone());
            async move {
                let client = net::listen(CLIENT_PORT).await?;
                let raft = net::listen(RAFT_PORT).await?;
                let probes = ProbeSocket::Task(Arc::new(net::SimDatagrams::bind(RAFT_PORT).await?));
                let node = match eddy_node::node::start(config, env, client, raft, probes).await {
                    Ok(node) => node,
                    // A node restarted on a disk that fails its syncs cannot start, and
                    // `eddy-node` exits naming the failure; the fault's end reboots it. Any other
                    // failure to start stops the simulation.
                    Err(e) if disk.fsync_fails() => {
                        tracing::warn!("the node did not start: {e:#}");
                        return Ok(());
                    }
                    Err(e) => return Err(format!("{e:#}").into()),
                };
                *refs.lock().expect("refs lock poisoned") =
                    Some(NodeRefs { meta: node.meta.clone(), replicas: node.replicas.clone() });
                // The node runs until its host crashes, or stops itself after a write its disk
                // could not make durable, as `eddy-node` does (its process then exits).
                let storage = node.storage.clone();
                storage.wait().await;
                node.hand_over_leadership(Duration::from_secs(5)).await;
                *refs.lock().expect("refs lock poisoned") = None;
                node.shutdown().await;
                Ok(())
            }
        });
    }

    /// A new node, with the next id, on a new host: it joins the cluster through the client
    /// listeners of the nodes that are not retired.
    pub fn join(&mut self, sim: &mut turmoil::Sim<'_>) -> NodeId {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        let join: Vec<String> =
            self.nodes.values().filter(|s| !s.retired).map(|s| client_addr(s.id)).collect();
        self.nodes.insert(id, NodeSlot::new(id, self.fsync_lies));
        self.register_node(sim, id, Vec::new(), join);
        id
    }

    /// Switches off for good the host of a node the cluster has removed.
    pub fn retire(&mut self, sim: &mut turmoil::Sim<'_>, id: NodeId) {
        if self.nodes.get(&id).is_some_and(|s| s.up) {
            self.crash(sim, id, None, false);
        }
        if let Some(slot) = self.nodes.get_mut(&id) {
            slot.retired = true;
        }
    }

    /// Nodes whose hosts may run: every node not retired.
    pub fn live_ids(&self) -> Vec<NodeId> {
        self.nodes.values().filter(|s| !s.retired).map(|s| s.id).collect()
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
            slot.clock_offset.store(0, Ordering::Relaxed);
        }
        slot.up = false;
    }

    pub fn restart(&mut self, sim: &mut turmoil::Sim<'_>, id: NodeId) {
        let Some(slot) = self.nodes.get_mut(&id).filter(|s| !s.retired) else {
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
        self.nodes.values().filter(|s| !s.up && !s.retired).map(|s| s.id).collect()
    }
}
