//! librdkafka's own test suite against a 3-node cluster: the test takes the librdkafka source
//! that the `rdkafka-sys` crate ships (fetched by cargo into its registry), builds its test
//! runner under `target/librdkafka/` (installing the Debian packages it needs, as root), and
//! runs the tests listed in `tests/librdkafka/tests.txt` (produce, consume, offsets, consumer
//! groups, admin), which also says why each test left out is left out.
//!
//! The cluster is what librdkafka's suite expects of a broker by default (its "default"
//! scenario): topics are created when a client asks for them, with 4 partitions and 3 replicas,
//! and every node has a rack (`RACK1`..`RACK3`, which its fetch-from-follower test needs).
//! Every listed test must pass; one that the runner skips or that fails fails this test.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use anyhow::ensure;
use eddy_tests::Cluster;

/// The `rdkafka-sys` release whose librdkafka is built (pinned, so a new release cannot change
/// the test), and librdkafka's version in it.
const RDKAFKA_SYS: &str = "4.10.0";
const LIBRDKAFKA: &str = "2.12.1";
/// Debian packages the build needs beyond a C compiler: the test runner's JSON checks and
/// librdkafka's zstd support.
const BUILD_PACKAGES: &[&str] = &["make", "g++", "zlib1g-dev", "libzstd-dev", "rapidjson-dev"];
/// librdkafka's configure: no TLS, SASL or HTTP (the listener is plaintext), and an
/// unoptimized build (it builds in a third of the time; the tests do not measure speed).
const CONFIGURE: &[&str] = &[
    "--no-download",
    "--disable-ssl",
    "--disable-gssapi",
    "--disable-curl",
    "--disable-lz4-ext",
    "--disable-optimization",
    "--disable-debug-symbols",
];
/// The whole run's bound; the runner's own per-test timeouts are shorter.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

fn target_dir() -> anyhow::Result<PathBuf> {
    Ok(eddy_tests::binary("eddy-node")
        .parent()
        .and_then(Path::parent)
        .context("target directory")?
        .to_path_buf())
}

/// Runs `cmd` to completion, failing with its output's tail if it fails.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("start {what}"))?;
    if !out.status.success() {
        let tail = |b: &[u8]| {
            let s = String::from_utf8_lossy(b);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        bail!("{what} failed ({}):\n{}\n{}", out.status, tail(&out.stdout), tail(&out.stderr));
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The librdkafka source in the `rdkafka-sys` crate, as cargo fetches it into its registry.
fn crate_source(dir: &Path) -> anyhow::Result<PathBuf> {
    let fetch = dir.join("fetch");
    std::fs::create_dir_all(fetch.join("src"))?;
    // An empty [workspace]: this manifest under target/ is no member of Eddy's workspace.
    std::fs::write(
        fetch.join("Cargo.toml"),
        format!(
            "[package]\nname = \"librdkafka-source\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
             [dependencies]\nrdkafka-sys = {{ version = \"={RDKAFKA_SYS}\", default-features = false }}\n\n[workspace]\n"
        ),
    )?;
    std::fs::write(fetch.join("src/lib.rs"), "")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(fetch.join("Cargo.toml"))
        .output()
        .context("run cargo metadata")?;
    ensure!(
        out.status.success(),
        "cargo metadata (to fetch rdkafka-sys {RDKAFKA_SYS}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "rdkafka-sys"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("rdkafka-sys is not in cargo metadata's packages")?;
    let src = Path::new(manifest).parent().context("rdkafka-sys directory")?.join("librdkafka");
    ensure!(src.join("tests/test.c").is_file(), "{} has no librdkafka test suite", src.display());
    Ok(src)
}

/// librdkafka and its test runner, built once under `target/librdkafka/`; the runner's
/// directory.
fn test_runner() -> anyhow::Result<PathBuf> {
    let dir = target_dir()?.join("librdkafka");
    let build = dir.join(format!("librdkafka-{LIBRDKAFKA}"));
    let tests = build.join("tests");
    let marker = dir.join(format!("built-{LIBRDKAFKA}.txt"));
    let recipe = CONFIGURE.join(" ");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == recipe) && tests.join("test-runner").is_file() {
        return Ok(tests);
    }
    for p in BUILD_PACKAGES {
        if !installed(p) {
            eddy_tests::apt_install(p)?;
        }
    }
    let src = crate_source(&dir)?;
    // Built in a copy: the registry's sources are cargo's.
    let _ = std::fs::remove_dir_all(&build);
    run(Command::new("cp").arg("-r").arg(&src).arg(&build), "copy the librdkafka source")?;
    run(Command::new("./configure").args(CONFIGURE).current_dir(&build), "librdkafka ./configure")?;
    run(Command::new("make").args(["-j2", "libs"]).current_dir(&build), "make libs (librdkafka)")?;
    run(Command::new("make").args(["-j2", "test-runner"]).current_dir(&tests), "make test-runner")?;
    std::fs::write(&marker, recipe)?;
    Ok(tests)
}

/// What `tests/librdkafka/tests.txt` lists: the tests `cargo test` runs (`run NNNN ...`), those
/// that also run in a full run (`full NNNN ...`); the others (`skip NNNN why`) say why a test is
/// left out.
struct Listed {
    run: Vec<String>,
    full: Vec<String>,
}

fn listed() -> anyhow::Result<Listed> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("librdkafka/tests.txt");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let (mut run, mut full, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let mut words = line.split_whitespace();
        let kind = words.next().unwrap_or_default();
        let n = words.next().filter(|n| n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()));
        let (Some(n), true) = (n, words.next().is_some()) else {
            bail!("{}: `{line}` is not `run|full|skip NNNN description`", path.display());
        };
        ensure!(
            ![&run, &full, &skipped].iter().any(|l: &&Vec<String>| l.iter().any(|m| m == n)),
            "{}: test {n} is listed twice",
            path.display()
        );
        match kind {
            "run" => run.push(n.to_owned()),
            "full" => full.push(n.to_owned()),
            "skip" => skipped.push(n.to_owned()),
            _ => bail!("{}: `{line}` is not `run|full|skip NNNN description`", path.display()),
        }
    }
    ensure!(!run.is_empty(), "{}: no test to run", path.display());
    Ok(Listed { run, full })
}

/// The runner's report (`TEST_REPORT`): test name -> (state, seconds). States are librdkafka's:
/// DNS (did not start), SKIPPED, RUNNING, PASSED, FAILED.
fn report(path: &Path) -> anyhow::Result<BTreeMap<String, (String, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parse the test report {}", path.display()))?;
    let tests = v["tests"].as_object().context("the report has no tests")?;
    Ok(tests
        .iter()
        .map(|(name, t)| {
            let state = t["state"].as_str().unwrap_or("?").to_owned();
            (name.clone(), (state, t["duration"].as_f64().unwrap_or(0.0)))
        })
        .collect())
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn librdkafka_test_suite_passes_against_a_three_node_cluster() -> anyhow::Result<()> {
    let listed = listed()?;
    // EDDY_LIBRDKAFKA_FULL=1: the `full` tests too, and every test in its long form.
    let full = std::env::var_os("EDDY_LIBRDKAFKA_FULL").is_some_and(|v| v == "1");
    let tests: Vec<String> =
        if full { listed.run.iter().chain(&listed.full).cloned().collect() } else { listed.run.clone() };
    // The build takes both cores for minutes: not beside another test's cluster.
    let runner_dir = eddy_tests::alone(test_runner)?;
    let cluster = Cluster::start_racked(
        3,
        "auto_create_topics = true\ndefault_partitions = 4\ndefault_replication_factor = 3\n",
        Some("RACK"),
    )?;
    cluster.wait_for_kafka()?;
    std::fs::write(
        runner_dir.join("test.conf"),
        format!("metadata.broker.list={}\n", cluster.kafka_bootstrap()),
    )?;
    // Outside the cluster's directory, which goes when the test ends: kept for a failure.
    let log_path = target_dir()?.join("librdkafka/last-run.log");
    let report_path = target_dir()?.join("librdkafka/last-run.json");
    let _ = std::fs::remove_file(&report_path);
    let log = std::fs::File::create(&log_path)?;
    // -L: no local-only tests (they need no broker), -E: none that need its socket emulator,
    // -K: none marked as known issues, -p2: two at a time (each test has topics and groups of
    // its own; one at a time took 263 s of CI's budget), -Q: quick mode (fewer messages and
    // rounds; librdkafka's own CI runs it).
    let mut args = vec!["-L", "-E", "-K", "-p2"];
    if !full {
        args.push("-Q");
    }
    let mut child = Command::new(runner_dir.join("test-runner"))
        .args(&args)
        .env("TESTS", tests.join(","))
        .env("TEST_KAFKA_VERSION", "2.4.0.0")
        .env("TEST_REPORT", &report_path)
        .env("LD_LIBRARY_PATH", "../src:../src-cpp")
        .current_dir(&runner_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start librdkafka's test-runner")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            child.kill()?;
            child.wait()?;
            bail!("librdkafka's tests did not finish within {RUN_TIMEOUT:?}; log: {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&log_path)?;
    let results = report(&report_path)?;
    let mut problems = Vec::new();
    for n in &tests {
        let mine: Vec<_> = results.iter().filter(|(name, _)| name.starts_with(n.as_str())).collect();
        // A test that returns at once (quick mode skips some so) takes no time at all: it
        // checked nothing, so it does not count as passed.
        let passed = mine.iter().filter(|(_, (state, secs))| state == "PASSED" && *secs > 0.0).count();
        let failed = mine.iter().filter(|(_, (state, _))| state == "FAILED" || state == "RUNNING").count();
        if passed == 0 || failed > 0 {
            problems.push(format!("{n}: {mine:?}"));
        }
    }
    if !problems.is_empty() || !status.success() {
        let failures: Vec<String> = text
            .lines()
            .map(strip_ansi)
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0].starts_with("### "))
            .map(|w| format!("{}\n  {}", w[0], w[1]))
            .collect();
        bail!(
            "librdkafka's tests: {status}; not passed: {problems:#?}\nfailures:\n{}\n(log: {})",
            failures.join("\n"),
            log_path.display()
        );
    }
    eprintln!(
        "librdkafka {LIBRDKAFKA}: {} tests passed in {:.0?}",
        results.values().filter(|(state, _)| state == "PASSED").count(),
        started.elapsed()
    );
    Ok(())
}
