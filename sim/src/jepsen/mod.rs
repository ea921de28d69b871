//! `eddy-sim jepsen`: the simulator's workload and checker against real `eddy-node` processes.
//!
//! Each round starts a fresh cluster of release binaries, one node per network namespace
//! (`hosts`), with every node's data on a size-limited tmpfs of its own. The clients, the same
//! code as the simulator's (`crate::workload`), run in a namespace of their own and record the
//! same history; a nemesis (`nemesis`) chosen by the round's seed partitions, throttles, drops,
//! kills, pauses, restarts, fills disks and changes membership during the chaos, then heals.
//! The verifier audits every replica, and the simulator's invariants (`crate::checker`) judge
//! the round. Invariants that need a node's memory (its Raft log, leadership observations,
//! metadata state) cannot be observed from outside and are reported as such, never as held.

// Real processes, never inside a simulation: the runner's threads and clocks are the machine's.
#![allow(clippy::disallowed_methods)]

pub mod hosts;
pub mod nemesis;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use self::hosts::Hosts;
use self::nemesis::RealFault;
use self::nemesis::RealNemesis;
use crate::checker;
use crate::checker::Evidence;
use crate::checker::Violation;
use crate::report::Series;
use crate::workload;
use crate::workload::Ctx;
use crate::workload::WorkloadConfig;
use crate::workload::now_ms;

/// Invariants judged from a node's memory, which a real process does not show: not reported
/// as held. (The audit still compares every replica's served records, offset by offset.)
pub const NOT_OBSERVABLE: [&str; 4] =
    ["log-matching", "election-safety", "metadata-agreement", "intruders-refused"];
/// The network of the runner's namespaces.
const SUBNET: &str = "10.89.0";
/// A round that has not finished this long after its chaos ends is stopped and fails.
const ROUND_GRACE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct JepsenOptions {
    pub rounds: u32,
    pub seed: u64,
    pub nodes: u64,
    pub duration: Duration,
    pub faults: Option<Vec<RealFault>>,
    pub topics: u32,
    pub partitions: u32,
    pub events_per_sec: u32,
    pub producers: u32,
    pub consumers: u32,
    pub group_members: u32,
    /// Each node's disk (a tmpfs), bytes.
    pub disk_bytes: u64,
    pub node_binary: PathBuf,
    /// Where rounds keep their configs and logs; failed rounds' are kept.
    pub work_dir: PathBuf,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub seed: u64,
    pub verdict: &'static str,
    pub violations: Vec<Violation>,
    pub held: Vec<&'static str>,
    pub acked_events: usize,
    pub outcomes: BTreeMap<&'static str, usize>,
    pub profile: String,
    pub injected: BTreeMap<&'static str, u32>,
    pub fault_intervals: Vec<(&'static str, u64, u64)>,
    /// Acknowledged events per second while some fault was active, and while none was.
    pub acked_per_sec_during_faults: f64,
    pub acked_per_sec_without_faults: f64,
    /// Faults the nemesis could not inject or undo, with why.
    pub nemesis_errors: Vec<String>,
    pub wall_seconds: f64,
    /// When the chaos ended (ms since the round started).
    pub chaos_ms: u64,
    /// Where the round's configs and node logs are (kept when it failed).
    pub dir: String,
    #[serde(skip)]
    pub series: Series,
    #[serde(skip)]
    pub trace: Vec<crate::trace::TraceEvent>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JepsenReport {
    pub rounds: usize,
    pub verdict: &'static str,
    /// Every violation, with its round.
    pub violations: Vec<serde_json::Value>,
    pub acked_events: usize,
    /// Faults injected over all rounds, by class.
    pub faults: BTreeMap<&'static str, u32>,
    pub not_observable: Vec<&'static str>,
    pub acked_per_sec_during_faults: f64,
    pub acked_per_sec_without_faults: f64,
    pub wall_seconds: f64,
    pub round_reports: Vec<RoundReport>,
}

/// Runs every round; stops early only when a round cannot be set up.
pub fn run(opts: &JepsenOptions) -> anyhow::Result<JepsenReport> {
    let wall = std::time::Instant::now();
    anyhow::ensure!(
        opts.node_binary.is_file(),
        "{} is not a file: build it with `cargo build --release -p eddy-node` or pass --node-binary",
        opts.node_binary.display()
    );
    let mut rounds = Vec::new();
    for round in 0..opts.rounds {
        let r = run_round(opts, round)?;
        if opts.progress {
            eprintln!(
                "round {round} (seed {}): {} — {} acknowledged; faults {:?}{}",
                r.seed,
                r.verdict.to_uppercase(),
                r.acked_events,
                r.injected,
                if r.verdict == "pass" { String::new() } else { format!("; logs in {}", r.dir) }
            );
        }
        rounds.push(r);
    }
    // Left only when a round failed and kept its directory.
    let _ = std::fs::remove_dir(&opts.work_dir);
    let mut faults = BTreeMap::new();
    let mut violations = Vec::new();
    for r in &rounds {
        for (c, n) in &r.injected {
            *faults.entry(*c).or_default() += n;
        }
        for v in &r.violations {
            violations.push(serde_json::json!({"round": r.round, "seed": r.seed, "violation": v}));
        }
    }
    let (during, without) = rates(&rounds);
    Ok(JepsenReport {
        rounds: rounds.len(),
        verdict: if violations.is_empty() { "pass" } else { "fail" },
        violations,
        acked_events: rounds.iter().map(|r| r.acked_events).sum(),
        faults,
        not_observable: NOT_OBSERVABLE.to_vec(),
        acked_per_sec_during_faults: during,
        acked_per_sec_without_faults: without,
        wall_seconds: wall.elapsed().as_secs_f64(),
        round_reports: rounds,
    })
}

/// Acknowledged events per second inside and outside fault intervals during the chaos, over
/// `rounds` (a second counts as faulted when any fault overlaps it; seconds before the first
/// acknowledgement, and after the chaos, are left out).
fn rates(rounds: &[RoundReport]) -> (f64, f64) {
    let (mut fs, mut fe, mut qs, mut qe) = (0u64, 0usize, 0u64, 0usize);
    for r in rounds {
        let first = r.series.seconds.iter().position(|s| s.1 > 0).unwrap_or(usize::MAX);
        let chaos = r.series.seconds.iter().skip(first).filter(|s| (s.0 + 1) * 1000 <= r.chaos_ms);
        for (s, n, ..) in chaos {
            let (from, to) = (s * 1000, s * 1000 + 1000);
            if r.fault_intervals.iter().any(|(_, a, b)| *a < to && *b > from) {
                fs += 1;
                fe += n;
            } else {
                qs += 1;
                qe += n;
            }
        }
    }
    let per = |e: usize, s: u64| if s == 0 { 0.0 } else { e as f64 / s as f64 };
    (per(fe, fs), per(qe, qs))
}

fn topics(config: &WorkloadConfig) -> Vec<String> {
    (0..config.topics).map(|i| format!("t{i}")).collect()
}

fn run_round(opts: &JepsenOptions, round: u32) -> anyhow::Result<RoundReport> {
    let wall = std::time::Instant::now();
    let seed = opts.seed.wrapping_add(u64::from(round));
    let dir = opts.work_dir.join(format!("round-{round}-seed-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // The node hosts: the initial members and one free host for joins; then the client's.
    let net = eddy_tests::netns::Net::new(opts.nodes + 2, SUBNET)?;
    let mut hosts = Hosts::start(net, opts.nodes, &opts.node_binary, &dir, opts.disk_bytes)?;
    workload::start_real_clock();
    let config = WorkloadConfig {
        topics: opts.topics,
        partitions: opts.partitions,
        producers: opts.producers,
        consumers: opts.consumers,
        group_members: opts.group_members,
        retention: false,
        time_retention: false,
        events_per_sec: opts.events_per_sec,
        chaos_end: opts.duration,
    };
    let ctx = Ctx::new(hosts.brokers(), config.clone(), seed, (1..=opts.nodes).collect(), None);
    let (trace, history, audit) = (ctx.trace.clone(), ctx.history.clone(), ctx.audit.clone());
    let allowed = opts.faults.clone().unwrap_or_else(|| RealFault::ALL.to_vec());
    let mut nemesis = RealNemesis::new(seed, &allowed, trace.clone());
    let profile = nemesis.describe();
    trace.push(0, "profile", profile.clone());

    let client_host = hosts.client_host();
    let deadline = opts.duration + ROUND_GRACE;
    // The clients, on a runtime of their own in the client's namespace.
    let clients = {
        let ctx = ctx.clone();
        let ns = hosts.net.ns_path(client_host);
        std::thread::spawn(move || -> anyhow::Result<bool> {
            hosts::enter_path(&ns)?;
            // One thread for every client, as the simulator's client hosts are each one task
            // set (the group members' futures are not `Send`).
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let c = ctx.clone();
                let admin = async move {
                    let _ = workload::setup(c.clone()).await;
                    let _ = workload::admin(c.clone()).await;
                    let _ = workload::verifier(c).await;
                };
                let producers = futures::future::join_all(
                    (0..ctx.config.producers).map(|i| drop_result(workload::producer(ctx.clone(), i))),
                );
                let consumers = futures::future::join_all(
                    (0..ctx.config.consumers).map(|i| drop_result(workload::consumer(ctx.clone(), i))),
                );
                let group = futures::future::join_all(
                    (0..ctx.config.group_members)
                        .map(|i| drop_result(workload::group_member(ctx.clone(), i))),
                );
                let all = async { futures::join!(admin, producers, consumers, group) };
                Ok(tokio::time::timeout(deadline, all).await.is_ok())
            })
        })
    };
    // The nemesis, in the client's namespace too (it asks the cluster for leaders).
    let chaos_end = opts.duration.as_millis() as u64;
    let held_down = 1 + seed % opts.nodes;
    let nemesis_thread = {
        let ctx = ctx.clone();
        let ns = hosts.net.ns_path(client_host);
        let topics = topics(&config);
        let progress = opts.progress;
        std::thread::spawn(move || -> anyhow::Result<(Hosts, RealNemesis)> {
            hosts::enter_path(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                // Ctrl-C or SIGTERM: remove the round's processes, namespaces and mounts, then exit.
                let stop = Arc::new(AtomicBool::new(false));
                {
                    use tokio::signal::unix::SignalKind;
                    use tokio::signal::unix::signal;
                    let (mut int, mut term) =
                        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = int.recv() => {}
                            _ = term.recv() => {}
                        }
                        stop.store(true, Ordering::SeqCst);
                    });
                }
                let client = ctx.connect().await;
                while now_ms() < chaos_end {
                    if stop.load(Ordering::SeqCst) {
                        abandon(hosts);
                    }
                    nemesis.tick(now_ms(), &mut hosts, &client, &topics).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if progress && now_ms() % 5_000 < 100 {
                        eprintln!("  [{:>5.1}s] {} acknowledged", now_ms() as f64 / 1e3, ctx.history.acked());
                    }
                }
                nemesis.heal_all(&mut hosts, &client).await;
                // One node stays down while the workload writes its last events and comes back
                // into the quiet cluster before the audit, as in the simulator.
                let held = hosts.node(held_down).is_some().then_some(held_down);
                if let Some(n) = held {
                    hosts.stop(n, false);
                    ctx.trace.push(
                        now_ms(),
                        "crash",
                        format!("n{n} (process only; back once the workload stops)"),
                    );
                }
                let give_up = tokio::time::Instant::now() + deadline;
                while ctx.quiet_restart.load(Ordering::SeqCst) != workload::QUIET_RESTART_ASKED
                    && tokio::time::Instant::now() < give_up
                {
                    if stop.load(Ordering::SeqCst) {
                        abandon(hosts);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Some(n) = held {
                    hosts.start_node(n)?;
                    ctx.trace.push(now_ms(), "restart", format!("n{n} (the workload has stopped writing)"));
                }
                ctx.quiet_restart.store(workload::QUIET_RESTART_DONE, Ordering::SeqCst);
                Ok((hosts, nemesis))
            })
        })
    };
    let (mut hosts, nemesis) =
        nemesis_thread.join().map_err(|_| anyhow::anyhow!("the nemesis panicked"))??;
    let finished = clients.join().map_err(|_| anyhow::anyhow!("a client panicked"))??;
    hosts.reap();
    let unexpected = hosts.unexpected_exits.clone();
    hosts.shutdown();

    let (produces, fetches) = history.snapshot();
    let (deliveries, group_events) = history.group_snapshot();
    let mut evidence = Evidence {
        produces,
        fetches,
        group_members: opts.group_members,
        deliveries,
        group_events,
        audit: audit.lock().expect("audit lock").clone(),
        ..Default::default()
    };
    if !finished {
        evidence
            .audit
            .liveness
            .push(format!("the round's clients did not finish within {ROUND_GRACE:?} of the heal"));
    }
    let (held, mut violations) = checker::check_all(&evidence);
    let held = held.into_iter().filter(|h| !NOT_OBSERVABLE.contains(h)).collect();
    let panics = panics(&hosts, &unexpected);
    if !panics.is_empty() {
        let inv = checker::no_panics::INVARIANT;
        violations.push(Violation {
            invariant: inv.name,
            source: inv.source,
            count: panics.len(),
            examples: panics,
        });
    }
    let verdict = if violations.is_empty() { "pass" } else { "fail" };
    let series = Series::of(&evidence.produces);
    let fault_intervals: Vec<(&'static str, u64, u64)> =
        nemesis.intervals.iter().map(|(c, a, b)| (c.name(), *a, *b)).collect();
    let mut report = RoundReport {
        round,
        seed,
        verdict,
        violations,
        held,
        acked_events: history.acked(),
        outcomes: history.counts(),
        profile,
        injected: nemesis.injected.iter().map(|(c, n)| (c.name(), *n)).collect(),
        fault_intervals,
        acked_per_sec_during_faults: 0.0,
        acked_per_sec_without_faults: 0.0,
        nemesis_errors: nemesis.errors.clone(),
        wall_seconds: wall.elapsed().as_secs_f64(),
        chaos_ms: chaos_end,
        dir: dir.display().to_string(),
        series,
        trace: trace.events(),
    };
    (report.acked_per_sec_during_faults, report.acked_per_sec_without_faults) =
        rates(std::slice::from_ref(&report));
    drop(hosts);
    if verdict == "pass" {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

/// Interrupted: stops the round's nodes and removes its filters, mounts and namespaces (by
/// dropping `hosts`), then exits with 130, as a shell expects after Ctrl-C.
fn abandon(hosts: Hosts) -> ! {
    let dir = hosts.dir().to_owned();
    drop(hosts);
    eprintln!(
        "interrupted: the round's nodes, namespaces and mounts are removed; configs and logs are in {}",
        dir.display()
    );
    std::process::exit(130)
}

async fn drop_result(f: impl std::future::Future<Output = turmoil::Result>) {
    let _ = f.await;
}

/// Panics in the nodes' logs, and nodes that exited although nobody stopped them.
fn panics(hosts: &Hosts, unexpected: &[(u64, String)]) -> Vec<String> {
    let mut out: Vec<String> =
        unexpected.iter().map(|(id, status)| format!("node {id} exited on its own: {status}")).collect();
    for id in hosts.placement.keys() {
        let log = std::fs::read_to_string(hosts.log_path(*id)).unwrap_or_default();
        out.extend(log.lines().filter(|l| l.contains("panicked at")).map(|l| format!("node {id}: {l}")));
    }
    out
}

/// The runner's table: one line per round, then the totals.
pub fn text(r: &JepsenReport) -> String {
    let mut out = String::new();
    for round in &r.round_reports {
        let _ = writeln!(
            out,
            "round {:>3} seed {:>6}: {}  {:>6} acknowledged  faults {}",
            round.round,
            round.seed,
            round.verdict.to_uppercase(),
            round.acked_events,
            round.injected.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
        );
        for v in &round.violations {
            let _ = writeln!(out, "    FAIL {}: {} problem(s)", v.invariant, v.count);
            for e in &v.examples {
                let _ = writeln!(out, "      - {e}");
            }
        }
        for e in &round.nemesis_errors {
            let _ = writeln!(out, "    nemesis: {e}");
        }
        if round.verdict != "pass" {
            let _ = writeln!(out, "    configs and node logs: {}", round.dir);
        }
    }
    let _ = writeln!(
        out,
        "faults injected: {}",
        r.faults.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        out,
        "acknowledged events: {} ({:.0}/s while faults were active, {:.0}/s while none was)",
        r.acked_events, r.acked_per_sec_during_faults, r.acked_per_sec_without_faults
    );
    let _ = writeln!(out, "not observable from outside a process: {}", r.not_observable.join(", "));
    let _ = writeln!(
        out,
        "verdict: {}  ({} rounds, {} violations, {:.0} s)",
        r.verdict.to_uppercase(),
        r.rounds,
        r.violations.len(),
        r.wall_seconds
    );
    out
}

/// The HTML report: the totals, then per round its verdict, fault timeline, and throughput and
/// latency over time with the faults shaded behind them.
pub fn html(r: &JepsenReport) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>eddy-sim jepsen: {}</h1><p>{} rounds; {} events acknowledged ({:.0}/s while faults were active, \
         {:.0}/s while none was); faults: {}</p><p>Not observable from outside a process: {}</p>",
        r.verdict.to_uppercase(),
        r.rounds,
        r.acked_events,
        r.acked_per_sec_during_faults,
        r.acked_per_sec_without_faults,
        esc(&r.faults.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")),
        r.not_observable.join(", ")
    );
    for round in &r.round_reports {
        let end = round.trace.last().map_or(1, |e| e.at_ms.max(1));
        let _ = write!(
            body,
            "<h2>Round {} (seed {}): {}</h2><p>{}</p><p>{} acknowledged; outcomes {}</p>",
            round.round,
            round.seed,
            round.verdict.to_uppercase(),
            esc(&round.profile),
            round.acked_events,
            esc(&format!("{:?}", round.outcomes))
        );
        for v in &round.violations {
            let _ = write!(
                body,
                "<p style='color:#c00'><b>{}</b>: {}</p>",
                v.invariant,
                esc(&v.examples.join("; "))
            );
        }
        body.push_str(&crate::report::charts_svg(&round.series, &round.fault_intervals, end));
        body.push_str("<details><summary>timeline</summary><table>");
        for e in round.trace.iter().filter(|e| e.kind != "leader") {
            let _ = write!(
                body,
                "<tr><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
                e.at_ms as f64 / 1e3,
                e.kind,
                esc(&e.detail)
            );
        }
        body.push_str("</table></details>");
    }
    format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>eddy-sim jepsen</title>\
         <style>body{{font-family:sans-serif;margin:20px}}td{{padding:2px 8px}}</style></head><body>{body}</body></html>"
    )
}
