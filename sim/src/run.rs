//! One simulated run: build the cluster and clients on turmoil, drive the simulation while the
//! nemesis injects faults, heal, let the verifier audit, then check the evidence.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use eddy_node::env::PlantedBugs;
use openraft::EntryPayload;
use openraft::async_runtime::WatchReceiver;
use serde::Serialize;

use crate::checker;
use crate::checker::Evidence;
use crate::checker::ReplicaLog;
use crate::checker::Violation;
use crate::cluster::Cluster;
use crate::cluster::NodeRefs;
use crate::cluster::epoch;
use crate::cluster::host_name;
use crate::history::History;
use crate::nemesis::BASE_MAX_LATENCY;
use crate::nemesis::Nemesis;
use crate::observer::Observer;
use crate::profile::FaultClass;
use crate::profile::Profile;
use crate::trace::Trace;
use crate::trace::TraceEvent;
use crate::workload;
use crate::workload::Audit;
use crate::workload::Ctx;
use crate::workload::WorkloadConfig;

/// Bugs that can be planted to show that the checker catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Bug {
    /// The disk acknowledges `fdatasync` without making anything durable, so the log
    /// acknowledges appends that a power loss then erases.
    AckBeforeFsync,
    /// A follower serves records past its commit point.
    FollowerReadsUncommitted,
}

impl Bug {
    pub fn name(&self) -> &'static str {
        match self {
            Bug::AckBeforeFsync => "ack-before-fsync",
            Bug::FollowerReadsUncommitted => "follower-reads-uncommitted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub seed: u64,
    pub nodes: u64,
    pub topics: u32,
    pub partitions: u32,
    pub duration: Duration,
    pub faults: Option<Vec<FaultClass>>,
    pub bug: Option<Bug>,
    pub events_per_sec: u32,
    /// Print progress to stderr while running.
    pub progress: bool,
}

impl RunOptions {
    /// The command that replays this run exactly.
    pub fn command(&self) -> String {
        let mut c = format!(
            "eddy-sim run --seed {} --nodes {} --topics {} --partitions {} --duration {}s --rate {}",
            self.seed,
            self.nodes,
            self.topics,
            self.partitions,
            self.duration.as_secs(),
            self.events_per_sec
        );
        if let Some(f) = &self.faults {
            c.push_str(&format!(
                " --faults {}",
                f.iter().map(|f| f.name()).collect::<Vec<_>>().join(",")
            ));
        }
        if let Some(b) = self.bug {
            c.push_str(&format!(" --inject-bug {}", b.name()));
        }
        c
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub seed: u64,
    /// "pass" or "fail".
    pub verdict: &'static str,
    pub violations: Vec<Violation>,
    pub held: Vec<&'static str>,
    pub sim_seconds: f64,
    pub wall_seconds: f64,
    pub acked_events: usize,
    pub outcomes: BTreeMap<&'static str, usize>,
    /// The fault profile of the seed.
    pub faults: Vec<&'static str>,
    pub profile: String,
    /// How many faults of each class were injected.
    pub injected: BTreeMap<String, u32>,
    pub leader_changes: usize,
    pub trace_hash: String,
    pub command: String,
    #[serde(skip)]
    pub trace: Vec<TraceEvent>,
}

fn fnv(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Reads a replica's Raft log for the checker.
fn replica_log(reader: &eddy_raft::log::LogReader, committed: Option<u64>) -> ReplicaLog {
    let mut log = ReplicaLog {
        committed,
        entries: BTreeMap::new(),
    };
    let (Some(first), Some(last)) = (reader.first_index(), reader.last_log_id()) else {
        return log;
    };
    let mut next = first;
    while next <= last.index {
        let Ok(entries) = reader.read(next, last.index + 1, 4 << 20) else {
            break;
        };
        if entries.is_empty() {
            break;
        }
        for e in &entries {
            let payload = match &e.payload {
                EntryPayload::Blank => 0,
                EntryPayload::Normal(p) => fnv(&p.0),
                EntryPayload::Membership(m) => fnv(format!("{m:?}").as_bytes()),
            };
            log.entries
                .insert(e.log_id.index, (eddy_raft::log_term(&e.log_id), payload));
            next = e.log_id.index + 1;
        }
    }
    log
}

fn collect_internals(cluster: &Cluster, e: &mut Evidence) {
    for id in cluster.nodes.keys() {
        let Some(NodeRefs { meta, groups }) = cluster.refs(*id) else {
            continue;
        };
        let view = meta.view();
        e.metadata.insert(
            *id,
            (view.last_applied.map(|l| l.index), format!("{:?}", view.state)),
        );
        for g in groups.all() {
            let committed = g
                .raft()
                .metrics()
                .borrow_watched()
                .local_committed
                .map(|c| c.index);
            e.logs
                .entry(g.group())
                .or_default()
                .insert(*id, replica_log(g.log_reader(), committed));
        }
    }
}

/// Runs one seed to completion.
pub fn run(opts: &RunOptions) -> anyhow::Result<RunReport> {
    #[allow(clippy::disallowed_methods)] // Wall time of the run, for the report only.
    let wall = std::time::Instant::now();
    let profile = Profile::draw(opts.seed, opts.faults.as_deref());
    let trace = Trace::default();
    let history = History::default();
    trace.push(0, "profile", profile.describe());

    let mut sim = turmoil::Builder::new()
        .rng_seed(opts.seed)
        .epoch(epoch())
        .simulation_duration(opts.duration + Duration::from_secs(600))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(BASE_MAX_LATENCY)
        // turmoil does not free the ports of failed connection attempts; use them all.
        .ephemeral_ports(1024..=65535)
        .build();
    let bugs = PlantedBugs {
        follower_reads_uncommitted: opts.bug == Some(Bug::FollowerReadsUncommitted),
    };
    let mut cluster = Cluster::new(opts.nodes, opts.seed, bugs, opts.bug == Some(Bug::AckBeforeFsync));
    cluster.register(&mut sim);

    let config = WorkloadConfig {
        topics: opts.topics,
        partitions: opts.partitions,
        producers: 3,
        consumers: 2,
        events_per_sec: opts.events_per_sec,
        chaos_end: opts.duration,
    };
    let audit = Arc::new(Mutex::new(Audit::default()));
    let ctx = Ctx {
        brokers: cluster.brokers(),
        config: config.clone(),
        seed: opts.seed,
        history: history.clone(),
        trace: trace.clone(),
        ready: Arc::new(AtomicBool::new(false)),
        producers_done: Arc::new(AtomicUsize::new(0)),
        audit: audit.clone(),
        nodes: cluster.nodes.keys().copied().collect(),
    };
    let mut clients: Vec<String> = vec!["setup".into(), "admin".into(), "verifier".into()];
    sim.client("setup", workload::setup(ctx.clone()));
    for i in 0..config.producers {
        clients.push(format!("producer-{i}"));
        sim.client(format!("producer-{i}"), workload::producer(ctx.clone(), i));
    }
    for i in 0..config.consumers {
        clients.push(format!("consumer-{i}"));
        sim.client(format!("consumer-{i}"), workload::consumer(ctx.clone(), i));
    }
    sim.client("admin", workload::admin(ctx.clone()));
    sim.client("verifier", workload::verifier(ctx.clone()));

    let mut hosts: Vec<String> = cluster.nodes.keys().map(|id| host_name(*id)).collect();
    hosts.extend(clients);
    let mut nemesis = Nemesis::new(profile.clone(), opts.seed, hosts);
    let mut observer = Observer::default();
    let chaos_end = opts.duration.as_millis() as u64;
    let mut healed = false;
    let mut failure: Option<String> = None;
    loop {
        let done = match sim.step() {
            Ok(d) => d,
            Err(e) => {
                failure = Some(format!("the simulation stopped: {e}"));
                break;
            }
        };
        let now = sim.elapsed().as_millis() as u64;
        if !healed {
            if now >= chaos_end {
                nemesis.heal_all(now, &mut sim, &mut cluster, &trace);
                healed = true;
            } else {
                nemesis.tick(now, &mut sim, &mut cluster, &trace);
            }
        }
        if now % 10 == 0 {
            observer.observe(now, &cluster, &trace);
        }
        if opts.progress && now % 5_000 == 0 && now > 0 {
            eprintln!(
                "  [{:>6.1}s simulated, {:>5.1}s wall] {} acknowledged, {} down",
                now as f64 / 1000.0,
                wall.elapsed().as_secs_f64(),
                history.acked(),
                cluster.down().len()
            );
        }
        if done {
            break;
        }
    }
    let sim_seconds = sim.elapsed().as_secs_f64();

    let (produces, fetches) = history.snapshot();
    let mut evidence = Evidence {
        produces,
        fetches,
        audit: audit.lock().expect("audit lock").clone(),
        leaders: observer.leaders.clone(),
        ..Default::default()
    };
    if let Some(f) = failure {
        evidence.audit.liveness.push(f);
    }
    collect_internals(&cluster, &mut evidence);
    let (held, violations) = checker::check_all(&evidence);
    for v in &violations {
        trace.push(
            sim.elapsed().as_millis() as u64,
            "violation",
            format!(
                "{}: {}",
                v.invariant,
                v.examples.first().cloned().unwrap_or_default()
            ),
        );
    }
    let history_hash = {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for p in &evidence.produces {
            h.update(format!("{p:?}").as_bytes());
        }
        for f in &evidence.fetches {
            h.update(format!("{f:?}").as_bytes());
        }
        h.digest()
    };
    trace.push(
        sim.elapsed().as_millis() as u64,
        "history",
        format!("{history_hash:016x}"),
    );
    let events = trace.events();
    let leader_changes = events.iter().filter(|e| e.kind == "leader").count();
    Ok(RunReport {
        seed: opts.seed,
        verdict: if violations.is_empty() { "pass" } else { "fail" },
        violations,
        held,
        sim_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        acked_events: history.acked(),
        outcomes: history.counts(),
        faults: profile.classes.keys().map(FaultClass::name).collect(),
        profile: profile.describe(),
        injected: nemesis
            .injected
            .iter()
            .map(|(c, n)| (c.name().to_owned(), *n))
            .collect(),
        leader_changes,
        trace_hash: format!("{:016x}", trace.hash()),
        command: opts.command(),
        trace: events,
    })
}
