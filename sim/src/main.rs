//! `eddy-sim`: run one seed (`run`) or explore many (`swarm`). See the README's simulator section.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;
use eddy_sim::profile::FaultClass;
use eddy_sim::report;
use eddy_sim::run::Bug;
use eddy_sim::run::RunOptions;
use eddy_sim::trace::first_divergence;

mod swarm;

/// The allocator `eddy-node` runs on (see its `main.rs`), so the simulated nodes allocate as the
/// real ones do. It does not touch determinism: nothing in the node code depends on addresses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The C library's clock, replaced for the whole process: while a simulation runs it reads
/// simulated time, otherwise the kernel's (see `eddy_sim::clock`). Rust's `Instant::now` and
/// `SystemTime::now`, tokio and every C or Rust dependency linked into this binary call this
/// symbol, so none of them can see how fast the machine runs the simulation.
///
/// # Safety
/// As the C function: `tp` points to a writable `timespec`.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_gettime(clock: libc::clockid_t, tp: *mut libc::timespec) -> libc::c_int {
    match eddy_sim::clock::reading(clock) {
        Some((sec, nsec)) => {
            // SAFETY: the caller passes a valid `timespec`, as `clock_gettime` requires.
            unsafe {
                (*tp).tv_sec = sec;
                (*tp).tv_nsec = nsec;
            }
            0
        }
        // SAFETY: passed on from our caller.
        None => unsafe { eddy_sim::clock::kernel_clock(clock, tp) },
    }
}

/// Log timestamps in simulated time.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(d) => write!(w, "{:>10.3}s", d.as_secs_f64()),
            None => write!(w, "{:>11}", "-"),
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "eddy-sim", version, about = "Run Eddy under simulated network and disk failures")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 5)]
    nodes: u64,
    /// Topics the workload writes.
    #[arg(long, default_value_t = 3)]
    topics: u32,
    /// Partitions per topic (replication factor 3).
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Simulated duration of the chaos phase, e.g. 120s or 2m.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    duration: Duration,
    /// Fault classes to draw from (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<FaultClass>>,
    /// Plant a bug to show that the checker finds it.
    #[arg(long)]
    inject_bug: Option<Bug>,
    /// Events produced per simulated second.
    #[arg(long, default_value_t = 400)]
    rate: u32,
    /// Producer clients (idempotent, retrying).
    #[arg(long, default_value_t = 3)]
    producers: u32,
    /// Consumer clients (reading from leaders and followers).
    #[arg(long, default_value_t = 2)]
    consumers: u32,
    /// Members of the consumer group that consumes every topic (they crash and rejoin).
    #[arg(long, default_value_t = 3)]
    group_members: u32,
    /// Give topic t0 size-based retention with small segments, so that replicas purge their
    /// logs and lagging followers install snapshots during the chaos.
    #[arg(long)]
    retention: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulate one seed; exit 0 if every invariant held, 1 if one broke.
    Run {
        #[arg(long)]
        seed: u64,
        #[command(flatten)]
        common: Common,
        /// Write the full trace (JSON lines) to this file.
        #[arg(long)]
        trace: Option<std::path::PathBuf>,
        /// Write a self-contained HTML report to this file.
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        /// Replay the seed in a new process and compare the trace hashes.
        #[arg(long)]
        check_determinism: bool,
        /// Show every event of the timeline (leader changes included).
        #[arg(long)]
        verbose: bool,
    },
    /// Simulate many seeds, each in its own process.
    Swarm {
        /// Seeds as A..B (inclusive).
        #[arg(long, value_parser = parse_range)]
        seeds: (u64, u64),
        /// Seeds run at once (default: the number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
        #[command(flatten)]
        common: Common,
        /// Run every seed even after a failure.
        #[arg(long)]
        keep_going: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Run the simulator's workload and checker against real `eddy-node` processes, each in a
    /// network namespace of its own, under real faults (packet filters, throttled links,
    /// SIGKILL, SIGSTOP, restarts, full disks, moves, joins, decommissions). Needs root.
    /// Exit 0 only when every invariant held in every round.
    Jepsen {
        /// Rounds, each a fresh cluster; round i uses seed S + i.
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 5)]
        nodes: u64,
        /// Duration of each round's chaos phase (real time).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: Duration,
        /// Fault classes to draw from (comma-separated); default all.
        #[arg(long, value_delimiter = ',')]
        faults: Option<Vec<eddy_sim::jepsen::nemesis::RealFault>>,
        #[arg(long, default_value_t = 3)]
        topics: u32,
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// Events produced per second, over all producers.
        #[arg(long, default_value_t = 300)]
        rate: u32,
        /// Each node's disk (a tmpfs), MiB.
        #[arg(long, default_value_t = 256)]
        disk_mb: u64,
        /// The node binary (default: `eddy-node` beside this executable).
        #[arg(long)]
        node_binary: Option<std::path::PathBuf>,
        /// Where rounds keep configs and node logs (a failed round's are kept).
        #[arg(long)]
        work_dir: Option<std::path::PathBuf>,
        /// Write a self-contained HTML report to this file.
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 30s or 2m"))?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(60 * n)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!("{s:?}: unknown unit {unit:?}")),
    }
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("{s:?}: expected A..B"))?;
    let (a, b): (u64, u64) = (
        a.parse().map_err(|_| format!("{a:?} is not a seed"))?,
        b.parse().map_err(|_| format!("{b:?} is not a seed"))?,
    );
    if a > b {
        return Err(format!("{s:?}: the range is empty"));
    }
    Ok((a, b))
}

impl Common {
    fn options(&self, seed: u64) -> RunOptions {
        RunOptions {
            seed,
            nodes: self.nodes,
            topics: self.topics,
            partitions: self.partitions,
            duration: self.duration,
            faults: self.faults.clone(),
            bug: self.inject_bug,
            events_per_sec: self.rate,
            producers: self.producers,
            consumers: self.consumers,
            group_members: self.group_members,
            retention: self.retention,
            progress: false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDDY_SIM_LOG").unwrap_or_else(|_| "off".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_timer(SimTime)
        .init();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs `seed` again in a process of its own, as a replay does, and returns its trace hash and
/// trace. (A second run in this process is not a replay: it differed from the first for some
/// seeds while every replay in a new process was identical, probably through process-wide state
/// such as tokio's task numbering.)
fn replay(seed: u64, common: &Common) -> anyhow::Result<(String, Vec<serde_json::Value>)> {
    let exe = std::env::current_exe().context("find the eddy-sim executable")?;
    let trace = std::env::temp_dir().join(format!("eddy-sim-replay-{}-{seed}.jsonl", std::process::id()));
    let out = std::process::Command::new(exe)
        .args(["run", "--seed", &seed.to_string()])
        .args(common.args())
        .arg("--trace")
        .arg(&trace)
        .args(["--output", "json"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("start the replay")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("the replay exited with {} and no report", out.status))?;
    let hash = report["trace_hash"].as_str().context("the replay's report has no trace_hash")?.to_owned();
    let text = std::fs::read_to_string(&trace).context("read the replay's trace");
    let _ = std::fs::remove_file(&trace);
    let text = text?;
    let events =
        text.lines().filter(|l| !l.is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
    Ok((hash, events))
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { seed, common, trace, report: report_path, output, check_determinism, verbose } => {
            let mut opts = common.options(seed);
            opts.progress = output == Output::Table;
            eddy_sim::run::report_panics(&opts, output == Output::Json);
            let r = eddy_sim::run::run(&opts)?;
            let mut json = serde_json::to_value(&r)?;
            if check_determinism {
                let (again_hash, again_trace) = replay(seed, &common)?;
                let same = again_hash == r.trace_hash;
                json["deterministic"] = serde_json::Value::Bool(same);
                if !same {
                    let first: Vec<serde_json::Value> =
                        r.trace.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
                    let i = first_divergence(&first, &again_trace).unwrap_or(0);
                    eprintln!(
                        "NOT deterministic: traces {} and {again_hash} first differ at event {i}:\n  first:  {}\n  replay: {}",
                        r.trace_hash,
                        first.get(i).map_or("(none)".into(), |e| e.to_string()),
                        again_trace.get(i).map_or("(none)".into(), |e| e.to_string()),
                    );
                } else if output == Output::Table {
                    println!("deterministic: both runs produced trace {}", r.trace_hash);
                }
                if !same {
                    if output == Output::Json {
                        println!("{json}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            }
            if let Some(path) = trace {
                let lines: Vec<String> =
                    r.trace.iter().map(|e| serde_json::to_string(e).unwrap_or_default()).collect();
                std::fs::write(&path, lines.join("\n") + "\n")
                    .with_context(|| format!("write {}", path.display()))?;
            }
            if let Some(path) = report_path {
                std::fs::write(&path, report::html(&r))
                    .with_context(|| format!("write {}", path.display()))?;
            }
            match output {
                Output::Json => println!("{json}"),
                Output::Table => print!("{}", report::text(&r, verbose)),
            }
            Ok(if r.verdict == "pass" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Jepsen {
            rounds,
            seed,
            nodes,
            duration,
            faults,
            topics,
            partitions,
            rate,
            disk_mb,
            node_binary,
            work_dir,
            report: report_path,
            output,
        } => {
            let exe = std::env::current_exe().context("find the eddy-sim executable")?;
            let opts = eddy_sim::jepsen::JepsenOptions {
                rounds,
                seed,
                nodes,
                duration,
                faults,
                topics,
                partitions,
                events_per_sec: rate,
                producers: 3,
                consumers: 2,
                group_members: 3,
                disk_bytes: disk_mb << 20,
                node_binary: node_binary.unwrap_or_else(|| exe.with_file_name("eddy-node")),
                work_dir: work_dir.unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("eddy-jepsen-{}", std::process::id()))
                }),
                progress: output == Output::Table,
            };
            let r = eddy_sim::jepsen::run(&opts)?;
            if let Some(path) = report_path {
                std::fs::write(&path, eddy_sim::jepsen::html(&r))
                    .with_context(|| format!("write {}", path.display()))?;
            }
            match output {
                Output::Json => println!("{}", serde_json::to_string(&r)?),
                Output::Table => print!("{}", eddy_sim::jepsen::text(&r)),
            }
            Ok(if r.verdict == "pass" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Swarm { seeds, jobs, common, keep_going, output } => {
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            swarm::run(seeds, jobs, &common, keep_going, output == Output::Json)
        }
    }
}
