//! `eddy-sim swarm`: runs many seeds, each in its own `eddy-sim run` process (so a crash or a
//! hang in one seed cannot take the others down), a few at a time.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;
use std::process::Stdio;

use anyhow::Context;
use serde_json::Value;
use serde_json::json;
use tokio::task::JoinSet;

use crate::Common;

impl Common {
    /// The command-line arguments that reproduce these settings.
    pub(crate) fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--nodes".into(),
            self.nodes.to_string(),
            "--topics".into(),
            self.topics.to_string(),
            "--partitions".into(),
            self.partitions.to_string(),
            "--duration".into(),
            format!("{}ms", self.duration.as_millis()),
            "--rate".into(),
            self.rate.to_string(),
            "--producers".into(),
            self.producers.to_string(),
            "--consumers".into(),
            self.consumers.to_string(),
            "--group-members".into(),
            self.group_members.to_string(),
        ];
        if self.retention {
            a.push("--retention".into());
        }
        if let Some(f) = &self.faults {
            a.push("--faults".into());
            a.push(f.iter().map(|c| c.name()).collect::<Vec<_>>().join(","));
        }
        if let Some(b) = self.inject_bug {
            a.push("--inject-bug".into());
            a.push(b.name().into());
        }
        a
    }
}

struct SeedResult {
    seed: u64,
    report: Option<Value>,
    error: Option<String>,
}

impl SeedResult {
    fn failed(&self) -> bool {
        self.error.is_some() || self.report.as_ref().is_some_and(|r| r["verdict"] != "pass")
    }
}

async fn run_seed(exe: std::path::PathBuf, seed: u64, args: Vec<String>) -> SeedResult {
    let out = tokio::process::Command::new(exe)
        .arg("run")
        .arg("--seed")
        .arg(seed.to_string())
        .args(&args)
        .arg("--output")
        .arg("json")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Err(e) => SeedResult { seed, report: None, error: Some(format!("could not start: {e}")) },
        Ok(o) => match serde_json::from_slice::<Value>(&o.stdout) {
            Ok(v) => SeedResult { seed, report: Some(v), error: None },
            Err(_) => SeedResult {
                seed,
                report: None,
                error: Some(format!(
                    "exited with {} and no report: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
                )),
            },
        },
    }
}

pub fn run(
    seeds: (u64, u64),
    jobs: usize,
    common: &Common,
    keep_going: bool,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("find the eddy-sim executable")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let total = seeds.1 - seeds.0 + 1;
    let results = rt.block_on(async {
        let mut set = JoinSet::new();
        let mut next = seeds.0;
        let mut results: Vec<SeedResult> = Vec::new();
        let mut stop = false;
        loop {
            while !stop && next <= seeds.1 && set.len() < jobs.max(1) {
                set.spawn(run_seed(exe.clone(), next, common.args()));
                next += 1;
            }
            let Some(r) = set.join_next().await else { break };
            let r = r.unwrap_or_else(|e| SeedResult {
                seed: 0,
                report: None,
                error: Some(format!("task failed: {e}")),
            });
            let failures = results.iter().filter(|r| r.failed()).count() + usize::from(r.failed());
            eprint!("\r{}/{total} seeds done, {failures} failed   ", results.len() + 1);
            let _ = std::io::stderr().flush();
            if r.failed() && !keep_going {
                stop = true;
            }
            results.push(r);
        }
        eprintln!();
        results
    });
    let mut results = results;
    results.sort_by_key(|r| r.seed);
    let failed: Vec<&SeedResult> = results.iter().filter(|r| r.failed()).collect();
    let mut classes: BTreeMap<String, u32> = BTreeMap::new();
    let mut violated: BTreeSet<String> = BTreeSet::new();
    let (mut sim_s, mut wall_s, mut acked) = (0.0, 0.0, 0u64);
    for r in &results {
        if let Some(rep) = &r.report {
            for (c, n) in rep["injected"].as_object().into_iter().flatten() {
                *classes.entry(c.clone()).or_default() += n.as_u64().unwrap_or(0) as u32;
            }
            for v in rep["violations"].as_array().into_iter().flatten() {
                violated.insert(v["invariant"].as_str().unwrap_or("?").to_owned());
            }
            sim_s += rep["sim_seconds"].as_f64().unwrap_or(0.0);
            wall_s += rep["wall_seconds"].as_f64().unwrap_or(0.0);
            acked += rep["acked_events"].as_u64().unwrap_or(0);
        }
    }
    let command = |r: &SeedResult| -> String {
        r.report
            .as_ref()
            .and_then(|rep| rep["command"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("eddy-sim run --seed {} {}", r.seed, common.args().join(" ")))
    };
    if json_out {
        let first = failed.first().map(|r| json!({"seed": r.seed, "command": command(r)}));
        let v = json!({
            "seeds": results.len(),
            "failed": failed.len(),
            "first_failure": first,
            "failures": failed.iter().map(|r| json!({
                "seed": r.seed,
                "command": command(r),
                "violations": r.report.as_ref().map(|rep| rep["violations"].clone()),
                "error": r.error,
            })).collect::<Vec<_>>(),
            "fault_classes": classes,
            "acked_events": acked,
            "sim_seconds": sim_s,
            "wall_seconds": wall_s,
        });
        println!("{v}");
    } else {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::NOTHING);
        t.set_header(vec!["SEEDS", "FAILED", "ACKED EVENTS", "SIMULATED", "CPU"]);
        t.add_row(vec![
            results.len().to_string(),
            failed.len().to_string(),
            acked.to_string(),
            format!("{sim_s:.0} s"),
            format!("{wall_s:.0} s"),
        ]);
        println!("{t}");
        println!(
            "fault classes exercised: {}",
            classes.iter().map(|(c, n)| format!("{c} ({n})")).collect::<Vec<_>>().join(", ")
        );
        if !violated.is_empty() {
            println!("invariants violated: {}", violated.iter().cloned().collect::<Vec<_>>().join(", "));
        }
        for r in &failed {
            let what = r.error.clone().unwrap_or_else(|| {
                r.report
                    .as_ref()
                    .and_then(|rep| rep["violations"].as_array())
                    .map(|vs| {
                        vs.iter()
                            .map(|v| v["invariant"].as_str().unwrap_or("?").to_owned())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            });
            println!("FAILED seed {}: {what}\n  replay: {}", r.seed, command(r));
        }
    }
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
