//! One simulated run: build the cluster and clients on turmoil, drive the simulation while the
//! nemesis injects faults, heal, let the verifier audit, then check the evidence.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eddy_node::env::PlantedBugs;
use eddy_node::meta::state::NodeState;
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
use crate::workload::Ctx;
use crate::workload::WorkloadConfig;

/// How often each node's state store makes its writes durable, like sled's background flush
/// (`flush_every_ms` in production).
const STATE_FLUSH_MS: u64 = 1000;

/// Bugs that can be planted to show that the checker catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Bug {
    /// The disk acknowledges `fdatasync` without making anything durable, so the log
    /// acknowledges appends that a power loss then erases.
    AckBeforeFsync,
    /// A follower serves records past its commit point.
    FollowerReadsUncommitted,
    /// A node accepts a bearer token on its user name alone, without checking its secret.
    TokensUnchecked,
    /// A log append that meets a full disk is reported done although nothing was written.
    DiskFullIgnored,
    /// A failed `fdatasync` of the log is taken for a good one (the node neither stops nor
    /// fails the writes), so entries are acknowledged that the disk dropped.
    FsyncFailureIgnored,
    /// A node that a move brings a partition back to, among the partition's initial replicas,
    /// founds the group again on its pristine replica: a second, empty group under the same id
    /// (the fix of simulator seed 88 undone; found by the `move` class).
    ReturningReplicaRefounds,
    /// Log frames' checksums are not checked, so a byte the disk corrupted is read, and served,
    /// as data (found by the `disk-corrupt` class).
    CorruptRecordServed,
    /// A node refuses for good the Raft messages of a node its metadata does not list yet: the
    /// vouching of simulator seed 40 (with `--retention`) undone (found by the `join` class).
    UnlistedNodeRefused,
    /// A joining node takes an error that is not the cluster's refusal (its first `join` node
    /// unreachable, a leader change) for a refusal, and stops trying: it never joins (found by
    /// the `join` class, through the check that every node started with `join` is a member
    /// after the heal).
    JoinGivesUp,
    /// A partition that was moving when a decommission of one of its nodes began is never
    /// planned away once that move completes, so the decommission never finishes (the
    /// controller's half of the fix of simulator seed 43 undone; found by the `decommission`
    /// class).
    DecommissionForgetsMoving,
    /// Time-based retention reads the wall clock as it is, so a node whose clock jumps forward
    /// purges events younger than `retention.ms` (found by the `clock-jump` class).
    RetentionTrustsWallClock,
    /// Time-based retention reads the node's own steady clock without checking it against its
    /// peers', so a process that started on a clock already ahead purges events younger than
    /// `retention.ms` (simulator seed 485; found by the `clock-jump` class).
    RetentionIgnoresPeers,
    /// A node answers clients' questions about the cluster from its own view however stale:
    /// a removed node that still runs (the `linger` class) sends the audit to replicas that
    /// moved away (the jepsen runner's rounds 16, 23, 54 and 92).
    StaleMetadataServed,
    /// The state store's checksums are not checked, so a byte the disk corrupted in a
    /// partition's stored state is read back as state (found by the `state-corrupt` class).
    StateCorruptServed,
}

impl Bug {
    pub fn name(&self) -> &'static str {
        match self {
            Bug::AckBeforeFsync => "ack-before-fsync",
            Bug::FollowerReadsUncommitted => "follower-reads-uncommitted",
            Bug::TokensUnchecked => "tokens-unchecked",
            Bug::DiskFullIgnored => "disk-full-ignored",
            Bug::FsyncFailureIgnored => "fsync-failure-ignored",
            Bug::ReturningReplicaRefounds => "returning-replica-refounds",
            Bug::CorruptRecordServed => "corrupt-record-served",
            Bug::UnlistedNodeRefused => "unlisted-node-refused",
            Bug::RetentionTrustsWallClock => "retention-trusts-wall-clock",
            Bug::RetentionIgnoresPeers => "retention-ignores-peers",
            Bug::DecommissionForgetsMoving => "decommission-forgets-moving",
            Bug::JoinGivesUp => "join-gives-up",
            Bug::StaleMetadataServed => "stale-metadata-served",
            Bug::StateCorruptServed => "state-corrupt-served",
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
    pub producers: u32,
    pub consumers: u32,
    pub group_members: u32,
    pub retention: bool,
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
        if self.producers != 3 || self.consumers != 2 {
            c.push_str(&format!(" --producers {} --consumers {}", self.producers, self.consumers));
        }
        if self.group_members != 3 {
            c.push_str(&format!(" --group-members {}", self.group_members));
        }
        if self.retention {
            c.push_str(" --retention");
        }
        if let Some(f) = &self.faults {
            c.push_str(&format!(" --faults {}", f.iter().map(|f| f.name()).collect::<Vec<_>>().join(",")));
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
    /// Every fault, as (class, from, to) in simulated ms, for the reports' shading.
    pub fault_intervals: Vec<(&'static str, u64, u64)>,
    /// Acknowledged produces per second and their ack latency (see `report::Series`).
    #[serde(skip)]
    pub series: crate::report::Series,
    /// What the intruder's requests got (`workload::intruder`): refused, unavailable, passed,
    /// served.
    pub intruder: BTreeMap<&'static str, usize>,
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
    let mut log = ReplicaLog { committed, entries: BTreeMap::new() };
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
            log.entries.insert(e.log_id.index, (eddy_raft::log_term(&e.log_id), payload));
            next = e.log_id.index + 1;
        }
    }
    log
}

/// Everything replica `g` serves as committed, read in-process without waiting.
fn replica_view(g: &eddy_node::partition::PartitionHandle) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut offset = g.status().progress.log_start_offset;
    loop {
        let fetched = futures::executor::block_on(g.fetch(offset, 4 << 20, usize::MAX, Duration::ZERO));
        let Ok(f) = fetched else { break };
        if f.records.is_empty() {
            break;
        }
        for r in f.records {
            if r.offset != offset {
                // A gap: record nothing past it (the offsets invariant judges the audit).
                return out;
            }
            out.push((r.offset, String::from_utf8_lossy(&r.record.value).into_owned()));
            offset += 1;
        }
    }
    out
}

/// Nodes the `join` class started that, after the heal and the audit, neither the metadata group
/// (as the running node that applied the most sees it) counts as a member nor the node table
/// lists: a join that never completed. A decommissioned node that was switched off is left out.
fn unjoined(cluster: &Cluster, initial: u64) -> Vec<String> {
    let Some(refs) = cluster
        .nodes
        .keys()
        .filter_map(|id| cluster.refs(*id))
        .max_by_key(|r| r.meta.view().last_applied.map(|l| l.index))
    else {
        return Vec::new();
    };
    let view = refs.meta.view();
    let membership = refs.meta.raft().metrics().borrow_watched().membership_config.membership().clone();
    cluster
        .nodes
        .values()
        .filter(|s| s.id > initial && !s.retired)
        // A decommissioned node the `linger` class left running is out of the group by design.
        .filter(|s| view.state.nodes.get(&s.id).is_none_or(|n| n.state != NodeState::Removed))
        .filter(|s| !(membership.nodes().any(|(id, _)| *id == s.id) && view.state.nodes.contains_key(&s.id)))
        .map(|s| {
            format!(
                "n{} joined the cluster during the run but is not a member after healing (the \
                 metadata group's members: {:?})",
                s.id,
                membership.nodes().map(|(id, _)| *id).collect::<Vec<_>>()
            )
        })
        .collect()
}

fn collect_internals(cluster: &Cluster, e: &mut Evidence) {
    for id in cluster.nodes.keys() {
        let Some(NodeRefs { meta, replicas }) = cluster.refs(*id) else {
            continue;
        };
        let view = meta.view();
        e.metadata.insert(*id, (view.last_applied.map(|l| l.index), format!("{:?}", view.state)));
        for g in replicas.all() {
            e.replica_views
                .entry((g.topic().to_owned(), g.partition()))
                .or_default()
                .insert(*id, replica_view(&g));
            let committed = g.raft().metrics().borrow_watched().local_committed.map(|c| c.index);
            e.logs.entry(g.group()).or_default().insert(*id, replica_log(g.log_reader(), committed));
        }
    }
}

/// Makes a panic anywhere in the simulation (a node, a client, the driver) end the run as a
/// failure with the replay command, instead of an abort: turmoil shuts a host's runtime down on
/// an unhandled panic, and unwinding through the simulation cannot be resumed safely. The
/// default hook still prints the panic and its backtrace to stderr first.
pub fn report_panics(opts: &RunOptions, json: bool) {
    let seed = opts.seed;
    let command = opts.command();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let msg = info.to_string();
        if json {
            let v = serde_json::json!({
                "seed": seed,
                "verdict": "fail",
                "violations": [{
                    "invariant": crate::checker::no_panics::INVARIANT.name,
                    "source": crate::checker::no_panics::INVARIANT.source,
                    "count": 1,
                    "examples": [msg],
                }],
                "command": command,
            });
            println!("{v}");
        } else {
            println!("FAIL  no-panics: {msg}\nverdict: FAIL\nreplay: {command}");
        }
        std::process::exit(1);
    }));
}

/// Runs one seed to completion.
pub fn run(opts: &RunOptions) -> anyhow::Result<RunReport> {
    let wall = crate::clock::wall_now();
    // From here on the process's clocks read simulated time (see `crate::clock`); turmoil
    // creates the hosts' runtimes below, so their clocks start from it too.
    let _clock = crate::clock::Simulated::start();
    let profile = Profile::draw(opts.seed, opts.faults.as_deref());
    let trace = Trace::default();
    let history = History::default();
    trace.push(0, "profile", profile.describe());

    let mut sim = turmoil::Builder::new()
        .rng_seed(opts.seed)
        .epoch(epoch())
        .simulation_duration(opts.duration + Duration::from_secs(600))
        .tick_duration(Duration::from_millis(5))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(BASE_MAX_LATENCY)
        // turmoil does not free the ports of failed connection attempts; use them all.
        .ephemeral_ports(1024..=65535)
        .build();
    let bugs = PlantedBugs {
        follower_reads_uncommitted: opts.bug == Some(Bug::FollowerReadsUncommitted),
        tokens_unchecked: opts.bug == Some(Bug::TokensUnchecked),
        disk_full_ignored: opts.bug == Some(Bug::DiskFullIgnored),
        fsync_failure_ignored: opts.bug == Some(Bug::FsyncFailureIgnored),
        returning_replica_refounds: opts.bug == Some(Bug::ReturningReplicaRefounds),
        corrupt_record_served: opts.bug == Some(Bug::CorruptRecordServed),
        unlisted_node_refused: opts.bug == Some(Bug::UnlistedNodeRefused),
        retention_trusts_wall_clock: opts.bug == Some(Bug::RetentionTrustsWallClock),
        retention_ignores_peers: opts.bug == Some(Bug::RetentionIgnoresPeers),
        stale_metadata_served: opts.bug == Some(Bug::StaleMetadataServed),
        decommission_forgets_moving: opts.bug == Some(Bug::DecommissionForgetsMoving),
        join_gives_up: opts.bug == Some(Bug::JoinGivesUp),
        state_corrupt_served: opts.bug == Some(Bug::StateCorruptServed),
    };
    let mut cluster = Cluster::new(opts.nodes, opts.seed, bugs, opts.bug == Some(Bug::AckBeforeFsync));
    cluster.register(&mut sim);

    let config = WorkloadConfig {
        topics: opts.topics,
        partitions: opts.partitions,
        producers: opts.producers,
        consumers: opts.consumers,
        group_members: opts.group_members,
        retention: opts.retention,
        time_retention: profile.classes.contains_key(&FaultClass::ClockJump),
        events_per_sec: opts.events_per_sec,
        chaos_end: opts.duration,
    };
    let mut ctx = Ctx::new(
        cluster.brokers(),
        config.clone(),
        opts.seed,
        cluster.nodes.keys().copied().collect(),
        Some(cluster.security.clone()),
    );
    (ctx.trace, ctx.history) = (trace.clone(), history.clone());
    let audit = ctx.audit.clone();
    // Three client machines: one runs setup, admin actions and the final verification in turn;
    // one runs every producer; one every consumer. (Fewer hosts make the simulation faster;
    // each client still has its own connections.)
    let mut clients: Vec<String> =
        vec!["admin".into(), "producers".into(), "consumers".into(), "group".into()];
    // The operator's host exists only when the profile moves, decommissions or damages disks
    // (whose damaged replicas the operator moves away), so that the runs of the profiles
    // without them stay as they were.
    let operates = profile.classes.contains_key(&FaultClass::Move)
        || profile.classes.contains_key(&FaultClass::Decommission)
        || profile.classes.contains_key(&FaultClass::DiskCorrupt)
        || profile.classes.contains_key(&FaultClass::StateCorrupt)
        || profile.classes.contains_key(&FaultClass::MoveBack);
    if operates {
        clients.push("operator".into());
    }
    let c = ctx.clone();
    sim.client("admin", async move {
        workload::setup(c.clone()).await?;
        let (admin, intruder) = futures::join!(workload::admin(c.clone()), workload::intruder(c.clone()));
        admin?;
        intruder?;
        workload::verifier(c).await
    });
    let c = ctx.clone();
    sim.client("producers", async move {
        for r in
            futures::future::join_all((0..c.config.producers).map(|i| workload::producer(c.clone(), i))).await
        {
            r?;
        }
        Ok(())
    });
    let c = ctx.clone();
    sim.client("consumers", async move {
        for r in
            futures::future::join_all((0..c.config.consumers).map(|i| workload::consumer(c.clone(), i))).await
        {
            r?;
        }
        Ok(())
    });
    let c = ctx.clone();
    sim.client("group", async move {
        for r in futures::future::join_all(
            (0..c.config.group_members).map(|i| workload::group_member(c.clone(), i)),
        )
        .await
        {
            r?;
        }
        Ok(())
    });

    let mut hosts: Vec<String> = cluster.nodes.keys().map(|id| host_name(*id)).collect();
    hosts.extend(clients);
    let held_down = ctx.nodes[(opts.seed % ctx.nodes.len() as u64) as usize];
    let mut nemesis = Nemesis::new(profile.clone(), opts.seed, hosts, held_down);
    if operates {
        let (c, queue) = (ctx.clone(), nemesis.admin.clone());
        sim.client("operator", workload::operator(c, queue));
    }
    let mut observer = Observer::default();
    let chaos_end = opts.duration.as_millis() as u64;
    let mut healed = false;
    let mut failure: Option<String> = None;
    loop {
        crate::clock::set(sim.elapsed());
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
                // One node stays down while the workload writes its last events, and comes back
                // into the quiet cluster before the audit (see `workload::verifier`).
                cluster.crash(&mut sim, held_down, None, false);
                trace.push(
                    now,
                    "crash",
                    format!("n{held_down} (process only; back once the workload stops)"),
                );
            } else {
                nemesis.tick(now, &mut sim, &mut cluster, &trace);
            }
        } else {
            // Only repairs the operator still waits to decide on (nothing is injected).
            nemesis.tick(now, &mut sim, &mut cluster, &trace);
        }
        ctx.admin_pending.store(nemesis.admin_pending(), Ordering::SeqCst);
        if ctx.quiet_restart.load(Ordering::SeqCst) == workload::QUIET_RESTART_ASKED {
            cluster.restart(&mut sim, held_down);
            trace.push(now, "restart", format!("n{held_down} (the workload has stopped writing)"));
            ctx.quiet_restart.store(workload::QUIET_RESTART_DONE, Ordering::SeqCst);
        }
        if now.is_multiple_of(20) {
            observer.observe(now, &cluster, &trace);
        }
        if now.is_multiple_of(100) {
            nemesis.retire_removed(now, &mut sim, &mut cluster, &trace);
        }
        if now.is_multiple_of(STATE_FLUSH_MS) {
            cluster.flush_state_stores();
        }
        if opts.progress && now.is_multiple_of(5_000) && now > 0 {
            eprintln!(
                "  [{:>6.1}s simulated, {:>5.1}s wall] {} acknowledged, {} down",
                now as f64 / 1000.0,
                crate::clock::wall_elapsed(wall).as_secs_f64(),
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
    let (deliveries, group_events) = history.group_snapshot();
    let mut evidence = Evidence {
        produces,
        fetches,
        group_members: opts.group_members,
        retention_topics: if opts.retention { ["t0".to_owned()].into() } else { Default::default() },
        deliveries,
        group_events,
        audit: audit.lock().expect("audit lock").clone(),
        leaders: observer.leaders.clone(),
        ..Default::default()
    };
    if let Some(f) = failure {
        evidence.audit.liveness.push(f);
    }
    evidence.audit.liveness.extend(unjoined(&cluster, opts.nodes));
    collect_internals(&cluster, &mut evidence);
    let (held, violations) = checker::check_all(&evidence);
    for v in &violations {
        trace.push(
            sim.elapsed().as_millis() as u64,
            "violation",
            format!("{}: {}", v.invariant, v.examples.first().cloned().unwrap_or_default()),
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
        for d in &evidence.deliveries {
            h.update(format!("{d:?}").as_bytes());
        }
        for g in &evidence.group_events {
            h.update(format!("{g:?}").as_bytes());
        }
        h.digest()
    };
    trace.push(sim.elapsed().as_millis() as u64, "history", format!("{history_hash:016x}"));
    let events = trace.events();
    let leader_changes = events.iter().filter(|e| e.kind == "leader").count();
    let mut intruder = BTreeMap::new();
    for p in &evidence.audit.probes {
        *intruder.entry(p.outcome.kind()).or_insert(0) += 1;
    }
    Ok(RunReport {
        seed: opts.seed,
        verdict: if violations.is_empty() { "pass" } else { "fail" },
        violations,
        held,
        sim_seconds,
        wall_seconds: crate::clock::wall_elapsed(wall).as_secs_f64(),
        acked_events: history.acked(),
        outcomes: history.counts(),
        faults: profile.classes.keys().map(FaultClass::name).collect(),
        profile: profile.describe(),
        injected: nemesis.injected.iter().map(|(c, n)| (c.name().to_owned(), *n)).collect(),
        leader_changes,
        fault_intervals: nemesis.intervals.iter().map(|(c, a, b)| (c.name(), *a, *b)).collect(),
        series: crate::report::Series::of(&evidence.produces),
        intruder,
        trace_hash: format!("{:016x}", trace.hash()),
        command: opts.command(),
        trace: events,
    })
}
