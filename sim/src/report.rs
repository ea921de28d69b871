//! Human reports of a run: a text timeline and verdict, and a self-contained HTML page with an
//! SVG timeline (`--report FILE`).

use std::fmt::Write;

use crate::checker::INVARIANTS;
use crate::history::Outcome;
use crate::history::ProduceOp;
use crate::run::RunReport;

/// Acknowledged produces over time, as Jepsen draws them: per second of the run, how many
/// completed with an acknowledgement, and the median and 99th percentile of their latency
/// (invoke to acknowledgement). Built from a client history, so the simulator and a
/// real-process run draw it the same way.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// (second, acknowledged, p50 ms, p99 ms), every second from 0 to the last completion.
    pub seconds: Vec<(u64, usize, u64, u64)>,
}

impl Series {
    pub fn of(produces: &[ProduceOp]) -> Self {
        let mut by_second: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        for p in produces {
            if let (Outcome::Ok { .. }, Some(done)) = (&p.outcome, p.complete_ms) {
                by_second.entry(done / 1000).or_default().push(done.saturating_sub(p.invoke_ms));
            }
        }
        let last = by_second.keys().next_back().copied().unwrap_or(0);
        let seconds = (0..=last)
            .map(|s| match by_second.get_mut(&s) {
                Some(l) => {
                    l.sort_unstable();
                    let q = |f: f64| l[((l.len() - 1) as f64 * f).round() as usize];
                    (s, l.len(), q(0.5), q(0.99))
                }
                None => (s, 0, 0, 0),
            })
            .collect();
        Self { seconds }
    }
}

/// Two charts over the run, faults shaded behind them: acknowledged events per second, and ack
/// latency (p50 and p99, log scale). `faults` are (class, from ms, to ms).
pub fn charts_svg(series: &Series, faults: &[(&str, u64, u64)], end_ms: u64) -> String {
    let (width, height, left, right) = (1200.0, 170.0, 60.0, 20.0);
    let end_ms = end_ms.max(1);
    let x = |ms: u64| left + (ms as f64 / end_ms as f64) * (width - left - right);
    let classes: Vec<&str> = {
        let mut c: Vec<&str> = faults.iter().map(|f| f.0).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let palette =
        ["#d9534f", "#f0ad4e", "#5bc0de", "#9b59b6", "#8b4513", "#2e8b57", "#e83e8c", "#6c757d", "#17a2b8"];
    let color = |class: &str| palette[classes.iter().position(|c| *c == class).unwrap_or(0) % palette.len()];
    let mut out = String::new();
    let chart = |out: &mut String, title: &str, lines: &[(&str, Vec<(u64, f64)>)], log: bool| {
        let top = 20.0;
        let bottom = height - 25.0;
        let max = lines.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1)).fold(1.0f64, f64::max);
        let scale = |v: f64| {
            let f = if log { (1.0 + v).ln() / (1.0 + max).ln() } else { v / max };
            bottom - f * (bottom - top)
        };
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="11">"#
        );
        for (class, from, to) in faults {
            let _ = write!(
                out,
                r#"<rect x="{:.1}" y="{top}" width="{:.1}" height="{:.1}" fill="{}" opacity="0.18"><title>{class} {:.1}s to {:.1}s</title></rect>"#,
                x(*from),
                (x(*to) - x(*from)).max(1.0),
                bottom - top,
                color(class),
                *from as f64 / 1000.0,
                *to as f64 / 1000.0
            );
        }
        let _ = write!(
            out,
            r##"<text x="2" y="12">{title} (max {max:.0}{})</text><line x1="{left}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#999"/>"##,
            if log { ", log scale" } else { "" },
            width - right
        );
        for (i, (name, pts)) in lines.iter().enumerate() {
            let stroke = ["#337ab7", "#d9534f"][i % 2];
            let points: Vec<String> =
                pts.iter().map(|(ms, v)| format!("{:.1},{:.1}", x(*ms), scale(*v))).collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{stroke}" stroke-width="1.5" points="{}"/><text x="{}" y="12" fill="{stroke}">{name}</text>"#,
                points.join(" "),
                width - 200.0 + 90.0 * i as f64
            );
        }
        for s in (0..=end_ms / 1000).step_by(((end_ms / 1000) / 10).max(1) as usize) {
            let _ = write!(out, r#"<text x="{:.1}" y="{}">{s}s</text>"#, x(s * 1000), height - 5.0);
        }
        out.push_str("</svg>");
    };
    let at = |s: u64| s * 1000 + 500;
    let acked: Vec<(u64, f64)> = series.seconds.iter().map(|(s, n, ..)| (at(*s), *n as f64)).collect();
    chart(&mut out, "acknowledged events per second", &[("acked/s", acked)], false);
    out.push_str("<br>");
    let busy = series.seconds.iter().filter(|(_, n, ..)| *n > 0);
    let p50: Vec<(u64, f64)> = busy.clone().map(|(s, _, p, _)| (at(*s), *p as f64)).collect();
    let p99: Vec<(u64, f64)> = busy.map(|(s, _, _, p)| (at(*s), *p as f64)).collect();
    chart(&mut out, "ack latency, ms", &[("p50", p50), ("p99", p99)], true);
    let legend: Vec<String> = classes
        .iter()
        .map(|c| {
            format!(r#"<span style="background:{};opacity:0.5">&nbsp;&nbsp;&nbsp;</span> {c}"#, color(c))
        })
        .collect();
    let _ = write!(out, "<p>faults: {}</p>", legend.join(" &nbsp; "));
    out
}

/// Event kinds shown in the text timeline (leader changes are summarised unless verbose).
const TIMELINE_KINDS: [&str; 9] =
    ["profile", "setup", "fault", "crash", "restart", "heal", "admin", "verifier", "violation"];

fn secs(ms: u64) -> String {
    format!("{:>8.3}s", ms as f64 / 1000.0)
}

pub fn text(r: &RunReport, verbose: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "seed {}: {}", r.seed, r.profile);
    let _ = writeln!(out, "timeline:");
    for e in &r.trace {
        if verbose || TIMELINE_KINDS.contains(&e.kind) {
            let _ = writeln!(out, "  {} {:<9} {}", secs(e.at_ms), e.kind, e.detail);
        }
    }
    let _ = writeln!(
        out,
        "  ({} leader changes (one per group and term), {} stale leaders{})",
        r.leader_changes,
        r.trace.iter().filter(|e| e.kind == "stale-leader").count(),
        if verbose { "" } else { "; --verbose shows them" }
    );
    let _ = writeln!(out, "invariants:");
    for inv in &INVARIANTS {
        match r.violations.iter().find(|v| v.invariant == inv.name) {
            None => {
                let _ = writeln!(out, "  ok    {:<34} ({})", inv.name, inv.source);
            }
            Some(v) => {
                let _ = writeln!(out, "  FAIL  {:<34} ({}): {} problem(s)", inv.name, inv.source, v.count);
                for ex in &v.examples {
                    let _ = writeln!(out, "          - {ex}");
                }
            }
        }
    }
    let ratio = if r.wall_seconds > 0.0 { r.sim_seconds / r.wall_seconds } else { 0.0 };
    let _ = writeln!(
        out,
        "outcomes: {}",
        r.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    );
    if !r.intruder.is_empty() {
        let _ = writeln!(
            out,
            "intruder requests: {}",
            r.intruder.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        );
    }
    let _ = writeln!(
        out,
        "verdict: {}  ({:.1} simulated s in {:.1} wall s = {:.1}x; {} events acknowledged; trace {})",
        r.verdict.to_uppercase(),
        r.sim_seconds,
        r.wall_seconds,
        ratio,
        r.acked_events,
        r.trace_hash
    );
    let _ = writeln!(out, "replay: {}", r.command);
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A self-contained HTML page: verdict, an SVG timeline (faults, crashes, leader changes,
/// findings), and the event list.
pub fn html(r: &RunReport) -> String {
    let end_ms = r.trace.last().map_or(1, |e| e.at_ms.max(1));
    let width = 1200.0;
    let x = |ms: u64| 60.0 + (ms as f64 / end_ms as f64) * (width - 80.0);
    let lanes = ["fault", "crash", "restart", "heal", "leader", "stale-leader", "admin", "violation"];
    let colors = ["#d9534f", "#8b0000", "#2e8b57", "#5cb85c", "#337ab7", "#999999", "#f0ad4e", "#000000"];
    let mut svg = String::new();
    let h = 30.0 * lanes.len() as f64 + 40.0;
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-family="monospace" font-size="11">"#
    );
    for (i, lane) in lanes.iter().enumerate() {
        let y = 20.0 + 30.0 * i as f64;
        let _ = write!(
            svg,
            r##"<text x="2" y="{}">{lane}</text><line x1="60" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            y + 4.0,
            width - 20.0
        );
        for e in r.trace.iter().filter(|e| e.kind == *lane) {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{y}" r="3" fill="{}"><title>{:.3}s {}</title></circle>"#,
                x(e.at_ms),
                colors[i],
                e.at_ms as f64 / 1000.0,
                esc(&e.detail)
            );
        }
    }
    for s in (0..=end_ms / 1000).step_by(((end_ms / 1000) / 10).max(1) as usize) {
        let _ = write!(svg, r#"<text x="{:.1}" y="{}">{s}s</text>"#, x(s * 1000), h - 5.0);
    }
    svg.push_str("</svg>");
    let mut rows = String::new();
    for e in &r.trace {
        let _ = write!(
            rows,
            "<tr><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            e.at_ms as f64 / 1000.0,
            e.kind,
            esc(&e.detail)
        );
    }
    let mut inv = String::new();
    for i in &INVARIANTS {
        let v = r.violations.iter().find(|v| v.invariant == i.name);
        let status = if v.is_some() { "<b style='color:#c00'>FAIL</b>" } else { "ok" };
        let ex = v
            .map(|v| v.examples.iter().map(|e| format!("<br><small>{}</small>", esc(e))).collect::<String>())
            .unwrap_or_default();
        let _ = write!(inv, "<tr><td>{status}</td><td>{}</td><td>{}{ex}</td></tr>", i.name, esc(i.source));
    }
    format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>eddy-sim seed {seed}</title>\
         <style>body{{font-family:sans-serif;margin:20px}}td{{padding:2px 8px;vertical-align:top}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f6f6f6}}</style></head><body>\
         <h1>eddy-sim seed {seed}: {verdict}</h1><p>{profile}</p>\
         <p>{sim:.1} simulated s in {wall:.1} wall s; {acked} events acknowledged; {leaders} leader changes; trace {hash}</p>\
         <p><code>{cmd}</code></p><h2>Timeline</h2>{svg}<h2>Throughput and latency</h2>{charts}<h2>Invariants</h2><table>{inv}</table><h2>Events</h2><table>{rows}</table></body></html>",
        seed = r.seed,
        verdict = r.verdict.to_uppercase(),
        profile = esc(&r.profile),
        sim = r.sim_seconds,
        wall = r.wall_seconds,
        acked = r.acked_events,
        leaders = r.leader_changes,
        hash = r.trace_hash,
        cmd = esc(&r.command),
        charts = charts_svg(&r.series, &r.fault_intervals, end_ms),
    )
}
