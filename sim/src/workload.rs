//! The clients of a simulated run, each a turmoil client host using the real `ops` client:
//!
//! - `setup` creates the topics;
//! - `producer-N` write unique payloads to random partitions with idempotent, retrying
//!   producers, and record every operation's outcome;
//! - `consumer-N` read every partition from leaders and followers and record what they see;
//! - `group-N` are the members of one consumer group that consumes every topic; each now and
//!   then crashes (abandons its session without committing or leaving) and joins again, and
//!   records what it delivered, its commits, and where it started each partition it took over;
//! - `admin` creates topics and moves partition leaderships during the chaos;
//! - `verifier`, after the faults are healed, checks that every partition accepts and serves a
//!   write (liveness) and reads every partition from every replica for the checker (the audit).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eddy_ops::Client;
use eddy_ops::ClientConfig;
use eddy_ops::ClientError;
use eddy_ops::OffsetSpec;
use eddy_ops::Producer;
use eddy_ops::ProducerConfig;
use eddy_ops::ReplicaChoice;
use eddy_proto::v1 as pb;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::history::FetchObservation;
use crate::history::History;
use crate::history::Outcome;
use crate::history::PartitionKey;
use crate::net::SimConnect;
use crate::trace::Trace;

pub const REPLICATION_FACTOR: u32 = 3;
/// How long after the faults are healed every partition must accept and serve a write.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(60);
/// How long after healing every replica may take to serve what its leader committed, with no
/// new write to carry the commit point.
const IDLE_CATCH_UP_BOUND: Duration = Duration::from_secs(20);
/// States of [`Ctx::quiet_restart`].
pub const QUIET_RESTART_ASKED: u8 = 1;
pub const QUIET_RESTART_DONE: u8 = 2;
/// With `--retention`: topic t0 keeps about this much per partition, in segments of this size.
const RETENTION_BYTES: u64 = 32 << 10;
const SEGMENT_BYTES: u64 = 16 << 10;
/// With `clock-jump`: topics other than `--retention`'s keep an hour of events (of true time;
/// no run lasts that long, so they must keep everything).
const RETENTION_MS: u64 = 3_600_000;

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub topics: u32,
    pub partitions: u32,
    pub producers: u32,
    pub consumers: u32,
    pub group_members: u32,
    /// Topic t0 gets size-based retention with small segments.
    pub retention: bool,
    /// Every other topic gets time-based retention ([`RETENTION_MS`], longer than any run) with
    /// small segments: on with `clock-jump`, whose forward jumps must not purge what is younger.
    pub time_retention: bool,
    /// Events per simulated second, over all producers.
    pub events_per_sec: u32,
    /// When the faults stop (simulated time).
    pub chaos_end: Duration,
}

/// The audit: every replica's view of every partition after healing.
#[derive(Debug, Default, Clone)]
pub struct Audit {
    /// (topic, partition) -> node -> records from the replica's log start.
    pub replicas: BTreeMap<PartitionKey, BTreeMap<u64, Vec<(u64, String)>>>,
    /// Problems the verifier ran into (liveness failures, unreadable replicas).
    pub liveness: Vec<String>,
    /// The offset of the last record the verifier wrote to each partition.
    pub markers: BTreeMap<PartitionKey, u64>,
    pub done: bool,
    /// The intruder's requests and what they got.
    pub probes: Vec<AuthProbe>,
}

/// What the clients share.
#[derive(Clone)]
pub struct Ctx {
    pub brokers: Vec<String>,
    pub config: WorkloadConfig,
    pub seed: u64,
    pub history: History,
    pub trace: Trace,
    pub ready: Arc<AtomicBool>,
    pub producers_done: Arc<AtomicUsize>,
    /// The quiet restart before the audit: [`QUIET_RESTART_ASKED`] by the verifier, then
    /// [`QUIET_RESTART_DONE`] by the run loop, which owns the nodes.
    pub quiet_restart: Arc<AtomicU8>,
    pub audit: Arc<Mutex<Audit>>,
    /// Set while the nemesis still owes the operator work (a repair of a damaged replica to
    /// decide on, a move back waiting for the move away, an operation queued; kept by the run
    /// loop), and while the operator carries one out: the audit waits for either as for a move
    /// (see `settle`).
    pub admin_pending: Arc<AtomicBool>,
    pub admin_running: Arc<AtomicBool>,
    /// Node ids, for the audit.
    pub nodes: Vec<u64>,
    /// The cluster's CA and the workload's credentials; `None` for a plaintext cluster without
    /// authentication (the real-process runner's), reached over the operating system's TCP.
    pub security: Option<Arc<crate::cluster::SimSecurity>>,
}

/// When the real-process runner's current round started; unset in a simulation.
static REAL_EPOCH: Mutex<Option<std::time::Instant>> = Mutex::new(None);

/// Starts the clock of a real-process round: from now on, [`now_ms`] outside a simulation counts
/// from here. The simulator never calls this.
pub fn start_real_clock() {
    #[allow(clippy::disallowed_methods)] // Real processes: the runner measures real time.
    let now = std::time::Instant::now();
    *REAL_EPOCH.lock().expect("epoch lock") = Some(now);
}

/// Milliseconds since the run started: simulated time in a simulation, real time since
/// [`start_real_clock`] in a real-process round (0 before it).
pub fn now_ms() -> u64 {
    if let Some(d) = turmoil::sim_elapsed() {
        return d.as_millis() as u64;
    }
    REAL_EPOCH.lock().expect("epoch lock").map_or(0, |e| e.elapsed().as_millis() as u64)
}

fn topic_name(i: u32) -> String {
    format!("t{i}")
}

impl Ctx {
    /// A fresh context: nothing recorded yet, the audit empty, nobody ready.
    pub fn new(
        brokers: Vec<String>,
        config: WorkloadConfig,
        seed: u64,
        nodes: Vec<u64>,
        security: Option<Arc<crate::cluster::SimSecurity>>,
    ) -> Self {
        Self {
            brokers,
            config,
            seed,
            history: History::default(),
            trace: Trace::default(),
            ready: Arc::new(AtomicBool::new(false)),
            producers_done: Arc::new(AtomicUsize::new(0)),
            quiet_restart: Arc::new(AtomicU8::new(0)),
            audit: Arc::new(Mutex::new(Audit::default())),
            admin_pending: Arc::new(AtomicBool::new(false)),
            admin_running: Arc::new(AtomicBool::new(false)),
            nodes,
            security,
        }
    }

    fn topics(&self) -> Vec<String> {
        (0..self.config.topics).map(topic_name).collect()
    }

    fn partitions(&self) -> Vec<PartitionKey> {
        self.topics()
            .into_iter()
            .flat_map(|t| (0..self.config.partitions).map(move |p| (t.clone(), p)))
            .collect()
    }

    fn rng(&self, salt: u64) -> SmallRng {
        SmallRng::seed_from_u64(self.seed ^ salt.wrapping_mul(0x2545_f491_4f6c_dd1d))
    }

    /// A client of the workload's user (by token), retrying until some node answers.
    pub async fn connect(&self) -> Client {
        let (token, tls) = self.workload_credentials();
        self.connect_as(token, tls).await
    }

    /// The workload user's credentials: its token and the client TLS settings when the
    /// cluster is secured, none otherwise.
    fn workload_credentials(&self) -> (Option<eddy_ops::Token>, Option<eddy_ops::TlsOptions>) {
        match &self.security {
            Some(s) => (Some(s.token_of(crate::cluster::WORKLOAD_USER)), Some(s.client_tls())),
            None => (None, None),
        }
    }

    /// A client of the superuser (by client certificate).
    async fn connect_admin(&self, security: &crate::cluster::SimSecurity) -> Client {
        self.connect_as(None, Some(security.admin_tls())).await
    }

    async fn connect_as(&self, token: Option<eddy_ops::Token>, tls: Option<eddy_ops::TlsOptions>) -> Client {
        loop {
            match self.try_connect(token.clone(), tls.clone()).await {
                Ok(c) => return c,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// One attempt at a client of the workload's user whose only bootstrap broker is `addr`:
    /// connecting asks that node alone for the cluster's metadata.
    async fn try_connect_alone(&self, addr: &str) -> eddy_ops::error::Result<Client> {
        let (token, tls) = self.workload_credentials();
        self.try_connect_to(&[addr.to_owned()], token, tls).await
    }

    /// One attempt at a client with these credentials (connecting reads the cluster's metadata).
    async fn try_connect(
        &self,
        token: Option<eddy_ops::Token>,
        tls: Option<eddy_ops::TlsOptions>,
    ) -> eddy_ops::error::Result<Client> {
        self.try_connect_to(&self.brokers, token, tls).await
    }

    async fn try_connect_to(
        &self,
        brokers: &[String],
        token: Option<eddy_ops::Token>,
        tls: Option<eddy_ops::TlsOptions>,
    ) -> eddy_ops::error::Result<Client> {
        let config = ClientConfig {
            request_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(250),
            delivery_timeout: Duration::from_secs(15),
            token,
            tls: tls.clone(),
        };
        if turmoil::sim_elapsed().is_none() {
            // A real-process run: the operating system's TCP.
            return Client::connect(brokers, config).await;
        }
        Client::connect_with(brokers, config, Arc::new(SimConnect { tls })).await
    }

    async fn wait_ready(&self) {
        while !self.ready.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The workload's user and what it may do: every topic and group, and the cluster (its admin
/// actions move partitions and leaders). Made by the superuser, retried until the cluster
/// answers; creating the user again with the same secret and salts changes nothing.
async fn authorize_workload(ctx: &Ctx, security: &crate::cluster::SimSecurity) {
    use crate::cluster::READER_USER;
    use crate::cluster::WORKLOAD_USER;
    let admin = ctx.connect_admin(security).await;
    for user in [WORKLOAD_USER, READER_USER] {
        let (secret, salts) = security.secret_of(user);
        while admin.create_user_from(user, true, &secret, &salts).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let bindings = [
        (WORKLOAD_USER, "topic", "*", "all"),
        (WORKLOAD_USER, "group", "*", "all"),
        (WORKLOAD_USER, "cluster", "", "all"),
        (READER_USER, "topic", "t0", "read"),
    ];
    for (user, resource_type, resource, operation) in bindings {
        let b = eddy_proto::v1::AclBinding {
            principal: format!("User:{user}"),
            resource_type: resource_type.into(),
            resource: resource.into(),
            pattern: "literal".into(),
            operation: operation.into(),
            permission: "allow".into(),
        };
        while admin.add_acl(b.clone()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What an intruder's request got (see [`intruder`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`: what it must get.
    Refused,
    /// No node answered (a fault): says nothing.
    Unavailable(String),
    /// Another error: authentication and authorization let the request through to fail later.
    Passed(String),
    /// The request was served.
    Served(String),
}

impl ProbeOutcome {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Unavailable(_) => "unavailable",
            Self::Passed(_) => "passed",
            Self::Served(_) => "served",
        }
    }
}

/// One request of the intruder.
#[derive(Debug, Clone)]
pub struct AuthProbe {
    pub at_ms: u64,
    pub who: &'static str,
    pub outcome: ProbeOutcome,
}

/// Requests that every node must refuse, made now and then during the chaos: no credentials,
/// the workload user's name with a wrong secret, and a produce by a user who may only read.
pub async fn intruder(ctx: Ctx) -> turmoil::Result {
    use crate::cluster::READER_USER;
    use crate::cluster::WORKLOAD_USER;
    ctx.wait_ready().await;
    let Some(security) = ctx.security.clone() else {
        return Ok(());
    };
    let mut rng = ctx.rng(4000);
    let chaos_end = ctx.config.chaos_end.as_millis() as u64;
    let wrong = eddy_ops::Token(eddy_proto::credentials::token(
        WORKLOAD_USER,
        &[0x5a; eddy_proto::credentials::SECRET_BYTES],
    ));
    let reader = security.token_of(READER_USER);
    let classify = |e: ClientError| match e {
        ClientError::Server { code, .. }
            if code == eddy_proto::error_codes::UNAUTHENTICATED
                || code == eddy_proto::error_codes::PERMISSION_DENIED =>
        {
            ProbeOutcome::Refused
        }
        ClientError::Unavailable(m) => ProbeOutcome::Unavailable(m),
        other => ProbeOutcome::Passed(other.to_string()),
    };
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..6_000))).await;
        if now_ms() >= chaos_end {
            return Ok(());
        }
        let (who, token) = match rng.random_range(0..3) {
            0 => ("anonymous", None),
            1 => ("wrong-token", Some(wrong.clone())),
            _ => ("reader", Some(reader.clone())),
        };
        let outcome = match ctx.try_connect(token, Some(security.client_tls())).await {
            Err(e) => classify(e),
            Ok(client) if who == "reader" => {
                let req = eddy_proto::v1::ProduceRequest {
                    topic: topic_name(0),
                    partition: Some(0),
                    records: vec![eddy_proto::v1::Record { value: "intruder".into(), ..Default::default() }],
                    ..Default::default()
                };
                match client.produce(req).await {
                    Ok(r) => {
                        ProbeOutcome::Served(format!("produce acknowledged at offset {}", r.base_offset))
                    }
                    Err(e) => classify(e),
                }
            }
            Ok(_) => ProbeOutcome::Served("metadata answered".into()),
        };
        ctx.trace.push(now_ms(), "intruder", format!("{who}: {outcome:?}"));
        ctx.audit.lock().expect("audit lock poisoned").probes.push(AuthProbe {
            at_ms: now_ms(),
            who,
            outcome,
        });
    }
}

pub async fn setup(ctx: Ctx) -> turmoil::Result {
    if let Some(security) = &ctx.security {
        authorize_workload(&ctx, security).await;
    }
    let client = ctx.connect().await;
    for (i, t) in ctx.topics().into_iter().enumerate() {
        let mut config = BTreeMap::new();
        if ctx.config.retention && i == 0 {
            config.insert("retention.bytes".to_owned(), RETENTION_BYTES.to_string());
            config.insert("segment.bytes".to_owned(), SEGMENT_BYTES.to_string());
        } else if ctx.config.time_retention {
            config.insert("retention.ms".to_owned(), RETENTION_MS.to_string());
            config.insert("segment.bytes".to_owned(), SEGMENT_BYTES.to_string());
        }
        loop {
            match client.create_topic(&t, ctx.config.partitions, REPLICATION_FACTOR, config.clone()).await {
                Ok(_) | Err(ClientError::AlreadyExists(_)) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    // Ready once every partition has a leader.
    loop {
        let md = client.refresh_metadata().await;
        let all = md.is_ok_and(|md| {
            ctx.topics()
                .iter()
                .all(|t| md.topics.get(t).is_some_and(|t| t.partitions.iter().all(|p| p.leader.is_some())))
        });
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctx.trace.push(
        now_ms(),
        "setup",
        format!("{} topics x {} partitions ready", ctx.config.topics, ctx.config.partitions),
    );
    ctx.ready.store(true, Ordering::SeqCst);
    Ok(())
}

fn outcome(r: Result<eddy_ops::Ack, ClientError>) -> Outcome {
    match r {
        Ok(a) => Outcome::Ok { offset: a.offset },
        // Refused before it was sent: certainly not written.
        Err(ClientError::Invalid(e)) => Outcome::Fail { error: e },
        // The producer gave up retrying: it may or may not be in the log.
        Err(e) => Outcome::Unknown { error: e.to_string() },
    }
}

pub async fn producer(ctx: Ctx, i: u32) -> turmoil::Result {
    ctx.wait_ready().await;
    let name = format!("producer-{i}");
    let client = ctx.connect().await;
    let mut producers = Vec::new();
    // Every other producer pipelines (five requests in flight per partition), so requests that
    // overtake each other, are refused and are sent again meet every fault class.
    let config = ProducerConfig {
        max_in_flight: if i % 2 == 1 { eddy_ops::MAX_IN_FLIGHT_LIMIT } else { 1 },
        ..ProducerConfig::default()
    };
    for t in ctx.topics() {
        loop {
            match Producer::with_config(client.clone(), &t, config).await {
                Ok(p) => break producers.push(p),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let mut rng = ctx.rng(1000 + u64::from(i));
    let mean_gap_us =
        1_000_000.0 * f64::from(ctx.config.producers) / f64::from(ctx.config.events_per_sec.max(1));
    let chaos_end = ctx.config.chaos_end.as_millis() as u64;
    let mut pending = FuturesUnordered::new();
    let mut n = 0u64;
    while now_ms() < chaos_end {
        let t = rng.random_range(0..producers.len());
        let p = rng.random_range(0..ctx.config.partitions);
        let payload = format!("{name}-{n}");
        n += 1;
        let op = ctx.history.invoke(&name, &topic_name(t as u32), p, payload.clone(), now_ms());
        let record =
            pb::Record { key: None, value: payload.into_bytes().into(), headers: vec![], timestamp_ms: None };
        match producers[t].send(Some(p), record).await {
            Ok(ack) => pending.push(async move { (op, ack.await) }),
            Err(e) => ctx.history.complete(op, outcome(Err(e)), now_ms()),
        }
        // Exponential gaps: a Poisson stream of events.
        let gap = Duration::from_micros((-mean_gap_us * (1.0 - rng.random::<f64>()).ln()) as u64);
        let sleep = tokio::time::sleep(gap);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                // Both arms only wait; nothing is lost when one wins.
                () = &mut sleep => break,
                Some((op, r)) = pending.next(), if !pending.is_empty() => ctx.history.complete(op, outcome(r), now_ms()),
            }
        }
    }
    while let Some((op, r)) = pending.next().await {
        ctx.history.complete(op, outcome(r), now_ms());
    }
    for p in producers {
        p.close().await;
    }
    ctx.trace.push(now_ms(), "client", format!("{name} done after {n} events"));
    ctx.producers_done.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

pub async fn consumer(ctx: Ctx, i: u32) -> turmoil::Result {
    ctx.wait_ready().await;
    let name = format!("consumer-{i}");
    let client = ctx.connect().await;
    let mut rng = ctx.rng(2000 + u64::from(i));
    let parts = ctx.partitions();
    let mut next: BTreeMap<PartitionKey, u64> = parts.iter().map(|k| (k.clone(), 0)).collect();
    let end = ctx.config.chaos_end.as_millis() as u64 + 5_000;
    let mut k = 0usize;
    while now_ms() < end {
        let key = &parts[k % parts.len()];
        k += 1;
        let choice = if rng.random_bool(0.5) { ReplicaChoice::Leader } else { ReplicaChoice::Follower };
        let offset = next[key];
        let r = client.fetch(&key.0, key.1, offset, choice, 64 << 10, Duration::from_millis(50)).await;
        if let Err(e) = &r
            && e.code() == Some(eddy_proto::error_codes::OFFSET_OUT_OF_RANGE)
            && let Ok(start) = client.list_offsets(&key.0, key.1, OffsetSpec::Earliest).await
        {
            // Retention removed what this consumer had not read: go on from the log start.
            next.insert(key.clone(), offset.max(start.offset));
        }
        if let Ok(resp) = r {
            let records: Vec<(u64, String)> = resp
                .records
                .iter()
                .map(|r| (r.offset, String::from_utf8_lossy(&r.value).into_owned()))
                .collect();
            if let Some((last, _)) = records.last() {
                next.insert(key.clone(), last + 1);
            }
            ctx.history.fetched(FetchObservation {
                consumer: name.clone(),
                topic: key.0.clone(),
                partition: key.1,
                node: resp.node_id,
                requested: offset,
                at_ms: now_ms(),
                records,
            });
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..50))).await;
    }
    Ok(())
}

pub async fn admin(ctx: Ctx) -> turmoil::Result {
    ctx.wait_ready().await;
    let client = ctx.connect().await;
    let mut rng = ctx.rng(3000);
    let chaos_end = ctx.config.chaos_end.as_millis() as u64;
    let mut created = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(5_000..12_000))).await;
        if now_ms() >= chaos_end {
            break;
        }
        if rng.random_bool(0.3) {
            let name = format!("extra{created}");
            created += 1;
            let r =
                client.create_topic(&name, rng.random_range(1..3), REPLICATION_FACTOR, BTreeMap::new()).await;
            ctx.trace.push(
                now_ms(),
                "admin",
                format!("create topic {name}: {}", if r.is_ok() { "ok" } else { "failed" }),
            );
        } else {
            let t = topic_name(rng.random_range(0..ctx.config.topics));
            let p = rng.random_range(0..ctx.config.partitions);
            let Ok(md) = client.refresh_metadata().await else {
                continue;
            };
            let Some(replicas) = md.partition(&t, p).map(|p| p.replicas.clone()) else {
                continue;
            };
            let to = replicas[rng.random_range(0..replicas.len())];
            let r = client.transfer_leadership(&t, p, to).await;
            ctx.trace.push(
                now_ms(),
                "admin",
                format!("transfer {t}/{p} to node {to}: {}", if r.is_ok() { "ok" } else { "failed" }),
            );
        }
    }
    Ok(())
}

/// A membership change the nemesis asks for and the operator client carries out.
#[derive(Debug, Clone)]
pub enum AdminOp {
    Move {
        topic: String,
        partition: u32,
        replicas: Vec<u64>,
    },
    Decommission(u64),
    /// A move that takes a damaged replica away (the nemesis asks again, with a new target,
    /// while the replica is still there).
    Repair {
        topic: String,
        partition: u32,
        replicas: Vec<u64>,
    },
}

/// The operator's queue of membership changes, filled by the nemesis in the order it draws
/// them.
pub type AdminQueue = Arc<Mutex<std::collections::VecDeque<AdminOp>>>;

/// The operator: carries out the moves and decommissions the nemesis draws, one at a time and
/// in order, as an operator with `eddyctl` would, until the chaos ends and none is left.
pub async fn operator(ctx: Ctx, queue: AdminQueue) -> turmoil::Result {
    ctx.wait_ready().await;
    let client = ctx.connect().await;
    let chaos_end = ctx.config.chaos_end.as_millis() as u64;
    loop {
        let op = queue.lock().expect("admin queue lock").pop_front();
        let Some(op) = op else {
            // The nemesis may still ask for a repair of a damaged replica after the heal (its
            // node may have been down then).
            if now_ms() >= chaos_end + 1_000 && !ctx.admin_pending.load(Ordering::SeqCst) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        ctx.admin_running.store(true, Ordering::SeqCst);
        let (what, r) = match &op {
            AdminOp::Move { topic, partition, replicas } => (
                format!("move {topic}/{partition} to {replicas:?}"),
                client.move_partition(topic, *partition, replicas.clone()).await,
            ),
            AdminOp::Decommission(n) => (
                format!("decommission node {n}"),
                client.set_node_state(*n, "decommissioning").await.map(|_| ()),
            ),
            AdminOp::Repair { topic, partition, replicas } => (
                format!("repair: move {topic}/{partition} to {replicas:?}"),
                client.move_partition(topic, *partition, replicas.clone()).await,
            ),
        };
        ctx.admin_running.store(false, Ordering::SeqCst);
        let outcome = r.map_or_else(|e| format!("failed: {e}"), |()| "started".into());
        ctx.trace.push(now_ms(), "admin", format!("{what}: {outcome}"));
    }
}

/// How long after the heal moves and decommissions may still run.
const SETTLE_BOUND: Duration = Duration::from_secs(120);
/// How long the placement must be seen holding still before the audit: longer than a node may
/// answer from a view it confirmed earlier (`SERVE_STALE_MAX`), so a move started just before
/// shows in some answer within it.
const SETTLE_QUIET: Duration =
    eddy_node::meta::handle::SERVE_STALE_MAX.saturating_add(Duration::from_secs(1));

/// Waits until no partition is moving, no node is being decommissioned and the nemesis owes
/// the operator nothing, seen so for [`SETTLE_QUIET`] on end, so that the audit reads a
/// placement that holds still; a liveness violation if that takes over [`SETTLE_BOUND`]. (A
/// move back queued after a `ListMoves` answered from a view without it let the audit read a
/// replica the move then took away: simulator seed 212.)
async fn settle(ctx: &Ctx, client: &Client) {
    let deadline = now_ms() + SETTLE_BOUND.as_millis() as u64;
    let mut quiet_since = None;
    loop {
        let moving = if ctx.admin_pending.load(Ordering::SeqCst) || ctx.admin_running.load(Ordering::SeqCst) {
            // An operation not started yet counts as a move under way.
            Ok(1)
        } else {
            client.list_moves().await.map(|m| m.moves.len())
        };
        let leaving = client
            .list_nodes()
            .await
            .map(|l| l.nodes.iter().filter(|n| n.state == "decommissioning").count());
        if let (Ok(0), Ok(0)) = (&moving, &leaving) {
            let since = *quiet_since.get_or_insert(now_ms());
            if now_ms() >= since + SETTLE_QUIET.as_millis() as u64 {
                return;
            }
        } else {
            quiet_since = None;
        }
        if now_ms() >= deadline {
            let list = client.list_moves().await.map(|m| {
                m.moves
                    .iter()
                    .map(|m| {
                        format!(
                            "{}/{} {:?} -> {:?} (voters {:?}, learners {:?})",
                            m.topic, m.partition, m.from, m.to, m.voters, m.learners
                        )
                    })
                    .collect::<Vec<_>>()
            });
            ctx.audit.lock().expect("audit lock").liveness.push(format!(
                "{SETTLE_BOUND:?} after healing, partitions still moving: {list:?}; nodes still \
                 decommissioning: {leaving:?}"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads a partition from node `node` up to and including `last`.
async fn read_replica(
    client: &Client,
    key: &PartitionKey,
    node: u64,
    last: u64,
) -> Result<Vec<(u64, String)>, String> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // From the replica's log start: retention may have removed what came before.
    let mut offset = loop {
        match client.list_offsets_on(&key.0, key.1, OffsetSpec::Earliest, ReplicaChoice::Node(node)).await {
            Ok(r) => break r.offset,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => {
                return Err(format!("node {node} did not name its log start of {}/{}: {e}", key.0, key.1));
            }
        }
    };
    let mut last_error = None;
    while offset <= last {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "node {node} served {}/{} offsets of {}/{} before the deadline (from offset {offset}: {})",
                out.len(),
                last + 1,
                key.0,
                key.1,
                last_error.unwrap_or_else(|| "no records".to_owned())
            ));
        }
        match client
            .fetch(&key.0, key.1, offset, ReplicaChoice::Node(node), 1 << 20, Duration::from_millis(200))
            .await
        {
            Ok(resp) => {
                for r in resp.records {
                    if r.offset > last {
                        break;
                    }
                    out.push((r.offset, String::from_utf8_lossy(&r.value).into_owned()));
                    offset = r.offset + 1;
                }
            }
            Err(e) if e.code() == Some(eddy_proto::error_codes::OFFSET_OUT_OF_RANGE) => {
                // Retention moved the log start while we read: go on from there.
                if let Ok(r) = client
                    .list_offsets_on(&key.0, key.1, OffsetSpec::Earliest, ReplicaChoice::Node(node))
                    .await
                {
                    offset = offset.max(r.offset);
                }
            }
            Err(e) => {
                last_error = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await
            }
        }
    }
    Ok(out)
}

/// Catch-up without writes: once the faults are healed, and before anything new is written,
/// every replica of every partition comes to serve everything its leader had committed. Idle
/// partition groups exchange no periodic messages, so a replica that returned (a restart, a
/// healed partition, a thawed freeze) must be brought up to date by the liveness layer alone; a
/// later write would hide a replica that never was.
async fn idle_catch_up(ctx: &Ctx, client: &Client) {
    let deadline = tokio::time::Instant::now() + IDLE_CATCH_UP_BOUND;
    let md = loop {
        match client.refresh_metadata().await {
            Ok(md) => break Some(md),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(_) => break None,
        }
    };
    let Some(md) = md else {
        ctx.audit.lock().expect("audit lock").liveness.push("no metadata after healing".into());
        return;
    };
    for t in ctx.topics() {
        for p in 0..ctx.config.partitions {
            let hw = loop {
                match client.list_offsets_on(&t, p, OffsetSpec::Latest, ReplicaChoice::Leader).await {
                    Ok(r) => break Some(r.offset),
                    Err(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(_) => break None,
                }
            };
            // A partition without a leader is reported by the liveness writes that follow.
            let Some(hw) = hw else { continue };
            let replicas = md.partition(&t, p).map(|p| p.replicas.clone()).unwrap_or_default();
            for node in replicas {
                let mut seen = None;
                loop {
                    match client.list_offsets_on(&t, p, OffsetSpec::Latest, ReplicaChoice::Node(node)).await {
                        Ok(r) => {
                            seen = Some(r.offset);
                            if r.offset >= hw {
                                break;
                            }
                        }
                        // The metadata read may have come from a node behind a move that took
                        // this replica away (a damaged one, say): ask again before judging it.
                        Err(_) => {
                            if let Ok(md) = client.refresh_metadata().await
                                && md.partition(&t, p).is_some_and(|p| !p.replicas.contains(&node))
                            {
                                break;
                            }
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        ctx.audit.lock().expect("audit lock").liveness.push(format!(
                            "node {node} served {t}/{p} up to {seen:?} of {hw} committed, with no write, \
                             {IDLE_CATCH_UP_BOUND:?} after healing"
                        ));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

pub async fn verifier(ctx: Ctx) -> turmoil::Result {
    let heal_at = ctx.config.chaos_end.as_millis() as u64;
    while now_ms() < heal_at || ctx.producers_done.load(Ordering::SeqCst) < ctx.config.producers as usize {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The node held down since the heal restarts into the quiet cluster: it missed the last
    // writes and nothing is written any more, so only the liveness layer can bring its replicas
    // up to date.
    ctx.quiet_restart.store(QUIET_RESTART_ASKED, Ordering::SeqCst);
    while ctx.quiet_restart.load(Ordering::SeqCst) != QUIET_RESTART_DONE {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = ctx.connect().await;
    settle(&ctx, &client).await;
    let start = now_ms();
    let deadline = start + LIVENESS_BOUND.as_millis() as u64;
    idle_catch_up(&ctx, &client).await;
    ctx.trace.push(now_ms(), "verifier", format!("idle catch-up checked after {} ms", now_ms() - start));
    let mut markers: BTreeMap<PartitionKey, u64> = BTreeMap::new();
    // Liveness: every partition accepts a write and serves it back.
    for t in ctx.topics() {
        let producer = loop {
            match Producer::new(client.clone(), &t).await {
                Ok(p) => break Some(p),
                Err(_) if now_ms() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => break None,
            }
        };
        let Some(producer) = producer else {
            ctx.audit
                .lock()
                .expect("audit lock")
                .liveness
                .push(format!("topic {t} unreachable after healing"));
            continue;
        };
        for p in 0..ctx.config.partitions {
            loop {
                let payload = format!("marker-{t}-{p}-{}", now_ms());
                let op = ctx.history.invoke("verifier", &t, p, payload.clone(), now_ms());
                let rec = pb::Record {
                    key: None,
                    value: payload.into_bytes().into(),
                    headers: vec![],
                    timestamp_ms: None,
                };
                let r = match producer.send(Some(p), rec).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                if let Err(e) = &r {
                    ctx.trace.push(now_ms(), "verifier", format!("write to {t}/{p} failed: {e}"));
                }
                let o = outcome(r);
                ctx.history.complete(op, o.clone(), now_ms());
                if let Outcome::Ok { offset } = o {
                    markers.insert((t.clone(), p), offset);
                    break;
                }
                if now_ms() >= deadline {
                    ctx.audit
                        .lock()
                        .expect("audit lock")
                        .liveness
                        .push(format!("{t}/{p} accepted no write within {LIVENESS_BOUND:?} of healing"));
                    break;
                }
            }
        }
        producer.close().await;
    }
    ctx.trace.push(now_ms(), "verifier", format!("liveness writes done after {} ms", now_ms() - start));
    // Audit: every replica serves every offset up to the marker.
    let md = loop {
        match client.refresh_metadata().await {
            Ok(md) => break md,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    for (key, marker) in &markers {
        let replicas = md.partition(&key.0, key.1).map(|p| p.replicas.clone()).unwrap_or_default();
        for node in replicas {
            match read_replica(&client, key, node, *marker).await {
                Ok(records) => {
                    ctx.audit
                        .lock()
                        .expect("audit lock")
                        .replicas
                        .entry(key.clone())
                        .or_default()
                        .insert(node, records);
                }
                Err(e) => ctx.audit.lock().expect("audit lock").liveness.push(e),
            }
        }
    }
    ctx.trace.push(now_ms(), "verifier", format!("audit done after {} ms", now_ms() - start));
    metadata_current(&ctx, &md).await;
    ctx.trace.push(now_ms(), "verifier", format!("metadata checked after {} ms", now_ms() - start));
    let mut audit = ctx.audit.lock().expect("audit lock");
    for ((t, p), replicas) in &audit.replicas {
        let starts: BTreeMap<u64, u64> =
            replicas.iter().filter_map(|(n, r)| r.first().map(|(o, _)| (*n, *o))).collect();
        if starts.values().any(|s| *s > 0) {
            ctx.trace.push(now_ms(), "verifier", format!("{t}/{p} log start per node {starts:?}"));
        }
    }
    audit.markers = markers;
    audit.done = true;
    Ok(())
}

/// How long after the audit every member has to serve metadata it confirmed current.
const METADATA_CURRENT_BOUND: Duration = Duration::from_secs(30);

/// Liveness of the metadata on every node: each member the cluster lists, asked alone, serves
/// the cluster's metadata, which it does only once it confirmed its view current (a read index
/// from the metadata group, applied). A node whose metadata lags for good fails here even when
/// no write or read of the run needed it: one that refuses the Raft messages of a metadata
/// leader it does not know yet (the planted bug `unlisted-node-refused`), or one cut off from
/// the group.
async fn metadata_current(ctx: &Ctx, md: &eddy_ops::client::ClusterMetadata) {
    let deadline = now_ms() + METADATA_CURRENT_BOUND.as_millis() as u64;
    for (id, n) in md.nodes.iter().filter(|(_, n)| n.state != "removed") {
        loop {
            let Err(last) = ctx.try_connect_alone(&n.client_addr).await else { break };
            if now_ms() >= deadline {
                ctx.audit.lock().expect("audit lock").liveness.push(format!(
                    "n{id} did not serve metadata confirmed current within {METADATA_CURRENT_BOUND:?} \
                     of the audit: {last}"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The consumer group's name in the simulation.
pub const GROUP: &str = "sim-group";
/// Session timeout of the group's members (simulated time).
const GROUP_SESSION: Duration = Duration::from_secs(3);
/// After the audit, a member that received nothing for this long checks whether the group has
/// consumed everything.
const GROUP_IDLE_CHECK: Duration = Duration::from_secs(1);
/// How often members commit what they delivered.
const GROUP_COMMIT_EVERY: Duration = Duration::from_millis(500);
/// How long members may take to drain after the audit before the run gives up on them.
pub const GROUP_DRAIN_BOUND: Duration = Duration::from_secs(90);

/// Collects the partitions a member takes over, with their start offsets.
struct TakeoverLog(Arc<Mutex<Vec<(PartitionKey, u64)>>>);

impl eddy_ops::group::RebalanceListener for TakeoverLog {
    fn on_assigned(&mut self, partitions: &[(PartitionKey, u64)]) {
        self.0.lock().expect("takeover lock").extend(partitions.iter().cloned());
    }
}

/// Whether the group has committed past every partition's last audited record.
async fn group_drained(client: &Client, ctx: &Ctx) -> bool {
    let markers = ctx.audit.lock().expect("audit lock").markers.clone();
    let Ok(offsets) = client.fetch_group_offsets(GROUP, true).await else {
        return false;
    };
    let committed: BTreeMap<PartitionKey, u64> = offsets.into_iter().collect();
    markers.iter().all(|(k, m)| committed.get(k).is_some_and(|c| c > m))
}

/// One member of the simulation's consumer group, through its incarnations: it joins, polls
/// and commits after every batch; during the chaos it sometimes crashes (drops its session
/// without a commit or a leave) and joins again as a new member. After the audit it keeps
/// consuming until the group has committed past every partition's last record, then leaves.
pub async fn group_member(ctx: Ctx, i: u32) -> turmoil::Result {
    use eddy_ops::GroupConfig;
    use eddy_ops::GroupConsumer;

    use crate::history::GroupDelivery;
    use crate::history::GroupEvent;

    ctx.wait_ready().await;
    let client = ctx.connect().await;
    let mut rng = ctx.rng(4000 + u64::from(i));
    // The whole group uses one assignor, drawn from the run's seed.
    let assignor = if ctx.rng(4000).random_bool(0.5) { "cooperative-sticky" } else { "range" };
    let chaos_end = ctx.config.chaos_end.as_millis() as u64;
    let hard_end = chaos_end + (LIVENESS_BOUND + GROUP_DRAIN_BOUND).as_millis() as u64;
    let mut incarnation = 0;
    'incarnations: while now_ms() < hard_end {
        let member = format!("group-{i}.{incarnation}");
        incarnation += 1;
        let mut config = GroupConfig::new(GROUP, ctx.topics());
        config.session_timeout = GROUP_SESSION;
        config.assignor = assignor.into();
        config.replica = if rng.random_bool(0.5) { ReplicaChoice::Leader } else { ReplicaChoice::Follower };
        config.max_wait = Duration::from_millis(200);
        config.max_bytes = 64 << 10;
        let taken = Arc::new(Mutex::new(Vec::new()));
        let record_takeovers = |t0: u64| {
            for (partition, start) in taken.lock().expect("takeover lock").drain(..) {
                ctx.history.group_event(GroupEvent::TookOver {
                    member: member.clone(),
                    partition,
                    start,
                    invoke_ms: t0,
                    complete_ms: now_ms(),
                });
            }
        };
        let t0 = now_ms();
        let joined =
            GroupConsumer::join_with(client.clone(), config, Some(Box::new(TakeoverLog(taken.clone()))))
                .await;
        record_takeovers(t0);
        let Ok(mut consumer) = joined else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let crash_at =
            if rng.random_bool(0.7) { now_ms() + rng.random_range(3_000..20_000) } else { u64::MAX };
        let mut last_record = now_ms();
        let mut last_commit = 0;
        loop {
            let now = now_ms();
            if now >= crash_at && now < chaos_end {
                ctx.trace.push(now, "client", format!("{member} crashes"));
                drop(consumer);
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..2_000))).await;
                continue 'incarnations;
            }
            let audit_done = ctx.audit.lock().expect("audit lock").done;
            let idle = now.saturating_sub(last_record) >= GROUP_IDLE_CHECK.as_millis() as u64;
            if now >= hard_end || (audit_done && idle && group_drained(&client, &ctx).await) {
                let _ = consumer.close().await;
                ctx.trace.push(now_ms(), "client", format!("{member} leaves the group"));
                break 'incarnations;
            }
            if idle {
                last_record = now;
            }
            let t0 = now_ms();
            let batch = consumer.poll().await;
            record_takeovers(t0);
            let batch = batch.unwrap_or_default();
            if !batch.is_empty() {
                last_record = now_ms();
                // The application's processing time: batches, not single records, per poll.
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..150))).await;
            }
            for d in batch {
                ctx.history.delivered(GroupDelivery {
                    member: member.clone(),
                    topic: d.topic,
                    partition: d.partition,
                    offset: d.record.offset,
                    value: String::from_utf8_lossy(&d.record.value).into_owned(),
                    at_ms: last_record,
                });
            }
            // Commit at most every GROUP_COMMIT_EVERY, as applications with auto-commit do.
            if now_ms() < last_commit + GROUP_COMMIT_EVERY.as_millis() as u64 {
                continue;
            }
            let t0 = now_ms();
            last_commit = t0;
            if let Ok(offsets) = consumer.commit_sync().await {
                let t1 = now_ms();
                for (partition, offset) in offsets {
                    ctx.history.group_event(GroupEvent::Committed {
                        member: member.clone(),
                        partition,
                        offset,
                        invoke_ms: t0,
                        complete_ms: t1,
                    });
                }
            }
        }
    }
    Ok(())
}
