//! Wiring of one broker node: the metadata group, the partition manager, and the gRPC servers,
//! all built from a [`NodeConfig`] and the seams in [`NodeEnv`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use eddy_proto::v1::admin_client::AdminClient;
use eddy_proto::v1::admin_server::AdminServer;
use eddy_proto::v1::broker_server::BrokerServer;
use eddy_proto::v1::groups_server::GroupsServer;
use eddy_raft::META_GROUP;
use eddy_raft::NodeAddr;
use eddy_raft::NodeId;
use eddy_raft::Runtime;
use eddy_raft::kv::KvBatch;
use eddy_raft::kv::StateStore;
use eddy_raft::kv::checked::CheckedStore;
use eddy_raft::liveness::Liveness;
use eddy_raft::log::LogStore;
use eddy_raft::network::GroupNetwork;
use eddy_raft::registry::Registry;
use eddy_raft::service::RaftService;
use eddy_raft::transport::Peers;
use openraft::async_runtime::WatchReceiver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing::debug;
use tracing::info;
use tracing::info_span;
use tracing::warn;

use crate::api::grpc::admin::AdminService;
use crate::api::grpc::broker::BrokerService;
use crate::api::grpc::groups::GroupsService;
use crate::config::NodeConfig;
use crate::control::controller::Controller;
use crate::control::coordinator::Coordinator;
use crate::control::manager::PartitionManager;
use crate::control::manager::Replicas;
use crate::control::manager::group_seed;
use crate::control::reconciler::Reconciler;
use crate::control::reconciler::successor;
use crate::env::Incoming;
use crate::env::NodeEnv;
use crate::env::ProbeSocket;
use crate::limits::GRPC_MESSAGE_BYTES_MAX;
use crate::meta::MetaHandle;
use crate::meta::MetaStateMachine;
use crate::meta::handle::MetaForwardService;
use crate::meta::handle::MetaRaft;
use crate::meta::state::NodeState;
use crate::metrics::NodeMetrics;
use crate::partition::retention::RetentionClock;
use crate::raft_config;
use crate::security::Security;
use crate::security::layer::AuthLayer;
use crate::security::tls::CertIdentity;
use crate::security::tls::Guard;
use crate::security::tls::PlaintextAnswer;
use crate::security::tls::TlsMaterial;
use crate::service::BrokerState;

/// How long the Raft server waits for peers' streams to end when the node stops.
const RAFT_DRAIN: Duration = Duration::from_millis(200);
/// How often the data disk's available space is read (see `disk.rs`).
const DISK_CHECK: Duration = Duration::from_secs(1);
/// Streams a peer may cancel before the Raft server accepted them, per connection, before the
/// connection is closed. h2's default (20) guards a public server against rapid-reset floods;
/// between nodes, thousands of groups campaigning at once cancel that many vote RPCs whose
/// deadline passed while queued, and closing the connection then fails every group's traffic
/// on it and starts the next round of elections.
const RAFT_PENDING_RESETS_MAX: usize = 1 << 16;
/// HTTP/2 flow-control windows of the client listener (see
/// `eddy_raft::transport::CONNECTION_WINDOW`), where one producer connection carries the
/// requests of every partition it writes to.
const CLIENT_CONNECTION_WINDOW: u32 = 16 << 20;
const CLIENT_STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 limits of the client listener. Streams: a producer keeps thousands of requests in
/// flight on one connection (`eddyctl bench produce --inflight`). Resets: h2's defaults, which
/// cut off a rapid-reset flood (CVE-2023-44487) after 20 streams cancelled before they were
/// accepted. Keep-alive closes connections whose peer stopped answering PINGs.
const CLIENT_CONCURRENT_STREAMS_MAX: u32 = 8192;
const CLIENT_PENDING_RESETS_MAX: usize = 20;
const CLIENT_LOCAL_RESETS_MAX: usize = 1024;
const CLIENT_HEADER_LIST_BYTES_MAX: u32 = 16 << 10;
const CLIENT_FRAME_BYTES_MAX: u32 = 1 << 20;
const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const CLIENT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for servers to drain and groups to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How often a graceful shutdown checks whether its leaderships have moved.
const HANDOVER_POLL: Duration = Duration::from_millis(50);
/// How long a join request may take before it is retried.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running node. Dropping it does not stop it; call [`NodeHandle::shutdown`].
pub struct NodeHandle {
    pub me: NodeId,
    pub meta: MetaHandle,
    pub replicas: Arc<Replicas>,
    pub broker: Arc<BrokerState>,
    pub liveness: Arc<Liveness>,
    /// Set once the disk failed a write it was to make durable: the node must then stop.
    pub storage: crate::disk::StorageFailure,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl NodeHandle {
    /// Hands every leadership this node holds to an in-sync replica, waiting at most `within`.
    /// Returns how many groups this node still leads afterwards.
    pub async fn hand_over_leadership(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (leading, movable) = hand_over_all(self.me, &self.replicas, &self.meta, &self.liveness).await;
            // With no replica to take over (the others are down or stopping too), waiting
            // longer only delays the stop.
            if leading == 0 || movable == 0 || tokio::time::Instant::now() >= deadline {
                return leading;
            }
            tokio::time::sleep(HANDOVER_POLL).await;
        }
    }

    pub async fn shutdown(self) {
        self.cancel.cancel();
        // The metadata group first: its leader's replication streams into this node's Raft
        // server end only when this side stops, and the server drains before it exits.
        if let Err(e) = self.meta.raft().shutdown().await {
            warn!("stopping the metadata group: {e}");
        }
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await.is_err() {
            // Everything acknowledged is already durable; what is left is open client streams.
            warn!("tasks still running {SHUTDOWN_GRACE:?} after shutdown began; stopping without them");
        }
    }

    /// True once the node takes part in the metadata group (knows its leader).
    pub fn is_ready(&self) -> bool {
        self.meta.is_ready()
    }
}

/// One pass of asking responsive voters to take over every group `me` leads. Returns (groups
/// `me` leads, groups with a voter to ask).
async fn hand_over_all(
    me: NodeId,
    replicas: &Replicas,
    meta: &MetaHandle,
    liveness: &Arc<Liveness>,
) -> (usize, usize) {
    let (mut leading, mut movable) = (0, 0);
    for g in replicas.all() {
        let (l, m) = hand_over(me, g.group(), g.raft(), liveness).await;
        (leading, movable) = (leading + l, movable + m);
    }
    let (l, m) = hand_over(me, META_GROUP, meta.raft(), liveness).await;
    (leading + l, movable + m)
}

/// Watches the data disk's space every [`DISK_CHECK`]: while it is below the reserve, writes are
/// refused (see `disk.rs`) and every leadership this node holds is handed to another replica,
/// so that the partitions it led take writes elsewhere.
async fn watch_disk(
    disk: Arc<crate::disk::DiskSpace>,
    vfs: Arc<dyn eddy_raft::vfs::Vfs>,
    me: NodeId,
    replicas: Arc<Replicas>,
    meta: MetaHandle,
    liveness: Arc<Liveness>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(DISK_CHECK) => {}
        }
        if disk.refresh(&*vfs) {
            hand_over_all(me, &replicas, &meta, &liveness).await;
        }
    }
}

/// If `me` leads the group, asks a responsive voter to take over. Returns (1 if `me` leads, 1 if
/// there was a voter to ask).
async fn hand_over<SM: openraft::storage::RaftStateMachine<eddy_raft::TypeConfig>>(
    me: NodeId,
    group: eddy_raft::GroupId,
    raft: &openraft::Raft<eddy_raft::TypeConfig, SM>,
    liveness: &Arc<Liveness>,
) -> (usize, usize) {
    let m = raft.metrics().borrow_watched().clone();
    if m.current_leader != Some(me) {
        return (0, 0);
    }
    let Some(to) = successor(group, &m, liveness) else { return (1, 0) };
    let _ = eddy_raft::liveness::transfer_leadership(raft, group, to, liveness).await;
    (1, 1)
}

/// Spawns one of the node's long-running tasks; its end is logged, so a slow shutdown shows
/// which task held it up.
fn spawn_task(tasks: &TaskTracker, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
    tasks.spawn(async move {
        task.await;
        debug!(task = name, "task stopped");
    });
}

/// Starts the liveness probes (see [`ProbeSocket`]): on an OS thread with a runtime of its own
/// for a real socket (never in the simulator), as a task otherwise. The node's shutdown waits
/// for them either way: the thread's end is a task in `tasks`.
fn spawn_probes(
    tasks: &TaskTracker,
    liveness: &Arc<Liveness>,
    socket: ProbeSocket,
    raft_peers: Arc<Peers>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let span = info_span!("liveness", node = liveness.me());
    match socket {
        ProbeSocket::Task(socket) => {
            spawn_task(
                tasks,
                "liveness",
                liveness.clone().run_probes(socket, raft_peers, cancel).instrument(span),
            );
        }
        ProbeSocket::Thread(socket) => {
            socket.set_nonblocking(true).context("make the probe socket non-blocking")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the liveness runtime")?;
            let socket = {
                // Registers the socket with the liveness runtime's reactor.
                let _entered = rt.enter();
                tokio::net::UdpSocket::from_std(socket).context("register the probe socket")?
            };
            let (done, stopped) = tokio::sync::oneshot::channel::<()>();
            let liveness = liveness.clone();
            std::thread::Builder::new()
                .name("eddy-liveness".to_owned())
                .spawn(move || {
                    rt.block_on(liveness.run_probes(Arc::new(socket), raft_peers, cancel).instrument(span));
                    drop(done);
                })
                .context("start the liveness thread")?;
            spawn_task(tasks, "liveness", async move {
                let _ = stopped.await;
            });
        }
    }
    Ok(())
}

/// Asks the nodes in `join` (in turn, until one succeeds) to make this node a member.
async fn join_cluster(
    me: NodeId,
    addr: NodeAddr,
    join: Vec<String>,
    connector: Arc<dyn eddy_raft::transport::Connector>,
    #[cfg(feature = "planted-bugs")] gives_up: bool,
) {
    let mut attempt = 0u32;
    loop {
        for target in &join {
            let mut client = AdminClient::new(connector.channel(target));
            let mut req = tonic::Request::new(eddy_proto::v1::JoinRequest {
                node_id: me,
                client_addr: addr.client_addr.clone(),
                raft_addr: addr.raft_addr.clone(),
            });
            req.set_timeout(JOIN_TIMEOUT);
            match tokio::time::timeout(JOIN_TIMEOUT, client.join(req)).await {
                Ok(Ok(r)) => {
                    info!(via = %target, voter = r.into_inner().voter, "joined the cluster");
                    return;
                }
                // Refused for good: a bad request, or the id taken by a node at other addresses.
                Ok(Err(status))
                    if status.code() == tonic::Code::InvalidArgument
                        || status
                            .metadata()
                            .get(eddy_proto::error_keys::CODE)
                            .and_then(|v| v.to_str().ok())
                            == Some(eddy_proto::error_codes::CONFLICT) =>
                {
                    warn!(via = %target, "the cluster refused to let this node join: {}", status.message());
                    return;
                }
                // The planted bug `join-gives-up`: an error that says nothing of the cluster's
                // answer (an unreachable node, a leader change) is taken for a refusal.
                #[cfg(feature = "planted-bugs")]
                Ok(Err(status)) if gives_up => {
                    warn!(via = %target, "giving up on joining: {}", status.message());
                    return;
                }
                Ok(Err(status)) => info!(via = %target, attempt, "join not done yet: {}", status.message()),
                Err(_) => info!(via = %target, attempt, "join timed out"),
            }
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The node's state store, every value checksummed and checked when read
/// ([`CheckedStore`]): a corrupt partition state makes its replica damaged (see
/// `control/manager.rs`), a corrupt metadata or identity tree stops the start, naming it.
fn checked_store(env: &NodeEnv) -> Arc<dyn StateStore> {
    #[cfg(feature = "planted-bugs")]
    if env.bugs.state_corrupt_served {
        return Arc::new(CheckedStore::unchecked(env.state_store.clone()));
    }
    Arc::new(CheckedStore::new(env.state_store.clone()))
}

/// Checks that `data_dir` belongs to this node id, recording the id on first start.
async fn check_identity(env: &NodeEnv, me: NodeId) -> anyhow::Result<()> {
    let tree = env.state_store.tree("node").context("open the node identity")?;
    match tree.get(b"id").context("read the node identity")? {
        Some(v) => {
            let stored = u64::from_be_bytes(v.as_slice().try_into().context("node identity is corrupt")?);
            if stored != me {
                bail!("data_dir belongs to node {stored}, but this node is configured as node_id {me}");
            }
        }
        None => {
            let mut b = KvBatch::default();
            b.put(*b"id", me.to_be_bytes());
            tree.apply(b).context("write the node identity")?;
            env.state_store.flush().await.context("flush the node identity")?;
        }
    }
    Ok(())
}

/// Starts a node: opens its storage, joins (or forms) the metadata group, and serves clients on
/// `client_incoming` and peers on `raft_incoming`, with liveness probes on `probes`.
/// Adds gRPC reflection, as `grpc.reflection.v1` and as `v1alpha` (which older grpcurl and
/// Python's grpcio-reflection still ask for), so `grpcurl list` works with either.
pub fn with_reflection<L>(
    router: tonic::transport::server::Router<L>,
) -> anyhow::Result<tonic::transport::server::Router<L>> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(eddy_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(router
        .add_service(builder().build_v1().context("build the reflection service")?)
        .add_service(builder().build_v1alpha().context("build the v1alpha reflection service")?))
}

pub async fn start(
    config: NodeConfig,
    mut env: NodeEnv,
    client_incoming: Incoming,
    raft_incoming: Incoming,
    probes: ProbeSocket,
) -> anyhow::Result<NodeHandle> {
    config.validate()?;
    let me = config.node_id;
    let tls = match &config.tls {
        Some(c) => {
            crate::security::tls::install_crypto_provider();
            let m = TlsMaterial::load(c, &*env.vfs, env.clock.clone())?;
            if m.identity != Some(CertIdentity::Node(me)) {
                bail!(
                    "tls.cert {} names {:?}, but this is node {me}: each node needs a certificate of its own (eddyctl cert create-node {me})",
                    c.cert.display(),
                    m.identity
                );
            }
            // Every channel to a peer is TLS, with this node's certificate, and checks that the
            // peer is the node it dialled.
            env.connector = Arc::new(crate::security::tls::TlsConnector {
                inner: env.connector.clone(),
                config: m.client_config()?,
            });
            Some(m)
        }
        None => None,
    };
    env.state_store = checked_store(&env);
    check_identity(&env, me).await?;
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let peers = Arc::new(Peers::new(env.connector.clone()));
    let client_peers = Arc::new(Peers::new(env.connector.clone()));
    let registry = Arc::new(Registry::default());
    // A new incarnation on every start: the seed differs per process, and the clock per start
    // in the simulator (where a restarted node keeps its seed).
    let incarnation = env.seed ^ (env.clock.now_ms() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // The clock time-based retention reads, and the one the liveness probes carry to compare
    // this node's clock with its peers'.
    let steady = Arc::new(crate::env::SteadyClock::new(env.clock.clone()));
    let liveness = Liveness::new(me, incarnation, {
        let steady = steady.clone();
        Arc::new(move || crate::env::Clock::now_ms(&*steady))
    });

    let metrics = Arc::new(NodeMetrics::default());
    let storage = crate::disk::StorageFailure::default();

    // The metadata group.
    let meta_dir = config.data_dir.join("groups").join(META_GROUP.to_string());
    let (log, report) = LogStore::open(
        env.vfs.clone(),
        &meta_dir,
        crate::control::manager::log_config(16 << 20, &metrics, &storage, &env),
    )
    .await
    .context("open the metadata log")?;
    info!(node = me, entries = report.entries, "opened the metadata log");
    let pristine = log.is_pristine();
    let (mut sm, view) =
        MetaStateMachine::open(env.state_store.clone()).context("open the metadata state")?;
    sm.set_apply_observer(metrics.meta_apply_observer());
    sm.set_log(log.reader());
    let network = GroupNetwork::new(META_GROUP, me, peers.clone());
    let raft: MetaRaft = Runtime::scope(
        group_seed(env.seed, META_GROUP),
        MetaRaft::new(me, raft_config::metadata_group(), network, log, sm),
    )
    .await
    .context("start the metadata group")?;
    registry.insert(META_GROUP, Arc::new(raft.clone()));
    #[cfg_attr(not(feature = "planted-bugs"), allow(unused_mut))]
    let mut meta = MetaHandle::new(raft.clone(), view, peers.clone(), me);
    #[cfg(feature = "planted-bugs")]
    {
        meta.trust_own_view = env.bugs.stale_metadata_served;
    }
    registry.set_forwarder(Arc::new(MetaForwardService { handle: meta.clone() }));

    let lowest = config.initial_members.iter().map(|m| m.id).min();
    if pristine && lowest == Some(me) {
        let members: BTreeMap<NodeId, NodeAddr> = config
            .initial_members
            .iter()
            .map(|m| (m.id, NodeAddr { raft_addr: m.raft_addr.clone(), client_addr: m.client_addr.clone() }))
            .collect();
        info!(node = me, ?members, "forming a new cluster");
        Runtime::scope(group_seed(env.seed, META_GROUP), raft.initialize(members))
            .await
            .context("initialize the metadata group")?;
    }
    if pristine && config.initial_members.is_empty() && config.join.is_empty() {
        bail!(
            "data_dir holds no state and the config has neither initial_members (to form a cluster) nor join (to join one)"
        );
    }

    #[allow(unused_mut)] // Mutated only with planted bugs.
    let mut security = Security::new(
        me,
        meta.clone(),
        config.superusers.iter().cloned().collect(),
        config.initial_members.iter().map(|m| m.id).collect(),
        metrics.clone(),
    );
    #[cfg(feature = "planted-bugs")]
    {
        security.bugs = env.bugs;
    }
    let security = Arc::new(security);
    let guard = |listener: &'static str, require_client_cert: bool| -> anyhow::Result<Guard> {
        Ok(Guard {
            listener,
            tls: match &tls {
                Some(m) => {
                    Some(tokio_rustls::TlsAcceptor::from(m.server_config(require_client_cert, &[b"h2"])?))
                }
                None => None,
            },
            max_connections: config.max_connections,
            handshake_timeout: crate::security::tls::HANDSHAKE_TIMEOUT,
            metrics: metrics.clone(),
            plaintext_answer: PlaintextAnswer::Grpc,
        })
    };
    // Between nodes a certificate is always required; on the client port when configured.
    let raft_incoming = crate::security::tls::guard(raft_incoming, guard("raft", true)?);
    let client_incoming = crate::security::tls::guard(
        client_incoming,
        guard("client", tls.as_ref().is_some_and(|t| t.require_client_cert))?,
    );
    let raft_auth = AuthLayer::nodes_only(security.clone(), "raft", tls.is_some());
    let client_auth = AuthLayer::new(security.clone(), "client", config.authentication.client);

    let replicas = Arc::new(Replicas::default());
    let disk =
        Arc::new(crate::disk::DiskSpace::new(me, config.data_dir.clone(), config.storage_min_free_bytes));
    let broker = Arc::new(BrokerState {
        me,
        limits: config.limits.clone(),
        meta: meta.clone(),
        replicas: replicas.clone(),
        clock: env.clock.clone(),
        client_peers,
        metrics: metrics.clone(),
        liveness: liveness.clone(),
        security: security.clone(),
        tls: tls.clone(),
        config: Arc::new(config.clone()),
        disk: disk.clone(),
        status_cache: Default::default(),
        local_status_cache: Default::default(),
    });

    // Peers' Raft traffic.
    let raft_service =
        RaftService::new(registry.clone(), liveness.clone(), env.seed, cancel.clone()).into_server();
    let shutdown = cancel.clone();
    spawn_task(
        &tasks,
        "raft_server",
        async move {
            let server = tonic::transport::Server::builder()
                .layer(raft_auth)
                .http2_max_pending_accept_reset_streams(Some(RAFT_PENDING_RESETS_MAX))
                // The same windows and reset limit as the peers' channels to this server (see
                // `eddy_raft::transport::endpoint`): the peers are the cluster's own nodes.
                .initial_connection_window_size(eddy_raft::transport::CONNECTION_WINDOW)
                .initial_stream_window_size(eddy_raft::transport::STREAM_WINDOW)
                .http2_max_local_error_reset_streams(None)
                .add_service(raft_service)
                .serve_with_incoming_shutdown(raft_incoming, shutdown.clone().cancelled_owned());
            // A peer's replication stream stays open as long as the peer sends, so the drain is
            // bounded; then the connections close, and peers retry elsewhere or later.
            let drained = async {
                shutdown.cancelled().await;
                tokio::time::sleep(RAFT_DRAIN).await;
            };
            tokio::select! {
                r = server => if let Err(e) = r {
                    warn!("Raft server stopped: {e}");
                },
                () = drained => debug!("closing Raft connections still open"),
            }
        }
        .instrument(info_span!("raft_server", node = me)),
    );

    // Clients, with health checking and reflection (so `grpcurl list` works).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BrokerServer<BrokerService>>().await;
    health.set_serving::<AdminServer<AdminService>>().await;
    health.set_serving::<GroupsServer<GroupsService>>().await;
    let reconciler = Arc::new(Reconciler {
        me,
        meta: meta.clone(),
        replicas: replicas.clone(),
        liveness: liveness.clone(),
        auto_balance: config.auto_balance_leaders,
        responsive_since: Default::default(),
        moving: Default::default(),
        pending: Default::default(),
        waiting: Default::default(),
    });
    // Explicit message limits per service: events travel through Broker only.
    let admin_service = AdminServer::new(AdminService::new(broker.clone(), reconciler.clone()))
        .max_decoding_message_size(crate::limits::CONTROL_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let groups_service = GroupsServer::new(GroupsService::new(broker.clone()))
        .max_decoding_message_size(crate::limits::CONTROL_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let broker_service = BrokerServer::new(BrokerService::new(broker.clone()))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let router = with_reflection(
        tonic::transport::Server::builder()
            .layer(client_auth)
            .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
            .initial_stream_window_size(CLIENT_STREAM_WINDOW)
            // Explicit HTTP/2 limits: a client is not trusted the way a peer node is.
            .max_concurrent_streams(Some(CLIENT_CONCURRENT_STREAMS_MAX))
            .http2_max_pending_accept_reset_streams(Some(CLIENT_PENDING_RESETS_MAX))
            .http2_max_local_error_reset_streams(Some(CLIENT_LOCAL_RESETS_MAX))
            .http2_max_header_list_size(Some(CLIENT_HEADER_LIST_BYTES_MAX))
            .max_frame_size(Some(CLIENT_FRAME_BYTES_MAX))
            .http2_keepalive_interval(Some(CLIENT_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(CLIENT_KEEPALIVE_TIMEOUT))
            .add_service(health_service),
    )?;
    let shutdown = cancel.clone();
    spawn_task(
        &tasks,
        "client_server",
        async move {
            let r = router
                .add_service(broker_service)
                .add_service(admin_service)
                .add_service(groups_service)
                .serve_with_incoming_shutdown(client_incoming, shutdown.cancelled_owned())
                .await;
            if let Err(e) = r {
                warn!("client server stopped: {e}");
            }
        }
        .instrument(info_span!("client_server", node = me)),
    );

    // Node liveness: probes to every other node in the metadata, whatever the groups.
    spawn_probes(&tasks, &liveness, probes, peers.clone(), cancel.clone())?;
    spawn_task(&tasks, "pulse", liveness.clone().pulse(cancel.clone()));
    spawn_task(
        &tasks,
        "disk",
        watch_disk(
            disk,
            env.vfs.clone(),
            me,
            replicas.clone(),
            meta.clone(),
            liveness.clone(),
            cancel.clone(),
        )
        .instrument(info_span!("disk", node = me)),
    );
    spawn_task(
        &tasks,
        "wakes",
        liveness
            .clone()
            .run_wakes(Arc::new(Peers::new(env.connector.clone())), cancel.clone())
            .instrument(info_span!("wakes", node = me)),
    );
    #[cfg(feature = "planted-bugs")]
    let decommission_forgets_moving = env.bugs.decommission_forgets_moving;
    #[cfg(not(feature = "planted-bugs"))]
    let decommission_forgets_moving = false;
    // The planted bug `unlisted-node-refused`: no vouching, so a node this node's metadata does
    // not list yet is refused for good (simulator seed 40 with `--retention`).
    #[cfg(feature = "planted-bugs")]
    let vouching = !env.bugs.unlisted_node_refused;
    #[cfg(not(feature = "planted-bugs"))]
    let vouching = true;
    if vouching {
        spawn_task(
            &tasks,
            "vouch",
            security
                .clone()
                .vouch(Arc::new(Peers::new(env.connector.clone())), cancel.clone())
                .instrument(info_span!("vouch", node = me)),
        );
    }
    spawn_task(&tasks, "liveness_members", {
        let (liveness, meta, cancel) = (liveness.clone(), meta.clone(), cancel.clone());
        async move {
            let mut rx = meta.subscribe();
            loop {
                let (members, gone) = {
                    let view = rx.borrow_and_update();
                    let members = view
                        .state
                        .nodes
                        .iter()
                        .filter(|(_, n)| n.state != NodeState::Removed)
                        .map(|(id, n)| (*id, n.addr.raft_addr.clone()))
                        .collect();
                    let gone = view
                        .state
                        .nodes
                        .iter()
                        .filter(|(_, n)| n.state == NodeState::Removed)
                        .map(|(id, _)| *id)
                        .collect();
                    (members, gone)
                };
                liveness.set_members_and_gone(members, gone);
                tokio::select! {
                    // Both arms only wait.
                    _ = cancel.cancelled() => break,
                    r = rx.changed() => if r.is_err() { break },
                }
            }
        }
    });

    let retention_clock = Arc::new(RetentionClock::Cluster { steady, liveness: liveness.clone() });
    #[cfg(feature = "planted-bugs")]
    let retention_clock = if env.bugs.retention_trusts_wall_clock {
        Arc::new(RetentionClock::Wall(env.clock.clone()))
    } else if env.bugs.retention_ignores_peers {
        Arc::new(RetentionClock::Wall(Arc::new(crate::env::SteadyClock::new(env.clock.clone()))))
    } else {
        retention_clock
    };
    let manager = PartitionManager {
        me,
        retention_clock,
        env: env.clone(),
        data_dir: config.data_dir.clone(),
        segment_bytes: config.segment_bytes,
        retention_check_interval: Duration::from_millis(config.retention_check_interval_ms),
        meta: meta.clone(),
        replicas: replicas.clone(),
        registry: registry.clone(),
        peers,
        liveness: liveness.clone(),
        tasks: tasks.clone(),
        metrics: metrics.clone(),
        storage: storage.clone(),
    };
    spawn_task(
        &tasks,
        "partition_manager",
        manager.run(cancel.clone()).instrument(info_span!("partition_manager", node = me)),
    );

    spawn_task(&tasks, "reconciler", {
        let r = reconciler.clone();
        let cancel = cancel.clone();
        async move { Reconciler::run(&r, cancel).await }.instrument(info_span!("reconciler", node = me))
    });
    spawn_task(
        &tasks,
        "controller",
        Controller {
            me,
            meta: meta.clone(),
            liveness: liveness.clone(),
            forget_moving: decommission_forgets_moving,
        }
        .run(cancel.clone())
        .instrument(info_span!("controller", node = me)),
    );
    spawn_task(
        &tasks,
        "coordinator",
        Coordinator { me, meta: meta.clone() }
            .run(cancel.clone())
            .instrument(info_span!("coordinator", node = me)),
    );
    spawn_task(
        &tasks,
        "registration",
        crate::control::registration::Registration {
            me,
            meta: meta.clone(),
            kafka_addr: config.advertised_kafka().map(str::to_owned),
            rack: config.rack.clone(),
        }
        .run(cancel.clone())
        .instrument(info_span!("registration", node = me)),
    );
    // A node not in the metadata group's membership (as its own log knows it) joins, pristine
    // or not: a joiner restarted before its join completed may already hold a vote (another
    // node's Raft traffic reached its address), and it would otherwise never join.
    let member = meta
        .raft()
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .nodes()
        .any(|(id, _)| *id == me);
    if (pristine || !member) && !config.join.is_empty() {
        let (join, connector, addr) = (config.join.clone(), env.connector.clone(), config.addr());
        #[cfg(feature = "planted-bugs")]
        let gives_up = env.bugs.join_gives_up;
        let cancel = cancel.clone();
        spawn_task(
            &tasks,
            "join",
            async move {
                tokio::select! {
                    // Cancel-safe: an interrupted join is retried by the next start.
                    _ = cancel.cancelled() => {}
                    () = join_cluster(
                        me,
                        addr,
                        join,
                        connector,
                        #[cfg(feature = "planted-bugs")]
                        gives_up,
                    ) => {}
                }
            }
            .instrument(info_span!("join", node = me)),
        );
    }

    info!(node = me, "node started");
    Ok(NodeHandle { me, meta, replicas, broker, liveness, storage, cancel, tasks })
}

#[cfg(test)]
mod tests {
    use tonic_reflection::pb::v1;
    use tonic_reflection::pb::v1alpha;

    use super::*;

    #[tokio::test]
    async fn reflection_answers_as_v1_and_as_v1alpha() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (_, health) = tonic_health::server::health_reporter();
        let router = with_reflection(tonic::transport::Server::builder().add_service(health))?;
        let stop = CancellationToken::new();
        let server = tokio::spawn(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;

        let ask = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
        };
        let mut answers = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter([ask]))
            .await?
            .into_inner();
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answers.message().await?.and_then(|r| r.message_response)
        else {
            anyhow::bail!("v1: no service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == "eddy.v1.Broker"), "v1 lists {names:?}");

        let ask = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut answers = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([ask]))
            .await?
            .into_inner();
        let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answers.message().await?.and_then(|r| r.message_response)
        else {
            anyhow::bail!("v1alpha: no service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == "eddy.v1.Groups"), "v1alpha lists {names:?}");
        stop.cancel();
        server.await??;
        Ok(())
    }
}
