//! Human reports of a run: a text timeline and verdict, and a self-contained HTML page with an
//! SVG timeline (`--report FILE`).

use std::fmt::Write;

use crate::checker::INVARIANTS;
use crate::run::RunReport;

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
        "  ({} leader changes{})",
        r.leader_changes,
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
    let lanes = ["fault", "crash", "restart", "heal", "leader", "admin", "violation"];
    let colors = ["#d9534f", "#8b0000", "#2e8b57", "#5cb85c", "#337ab7", "#f0ad4e", "#000000"];
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
         <p><code>{cmd}</code></p><h2>Timeline</h2>{svg}<h2>Invariants</h2><table>{inv}</table><h2>Events</h2><table>{rows}</table></body></html>",
        seed = r.seed,
        verdict = r.verdict.to_uppercase(),
        profile = esc(&r.profile),
        sim = r.sim_seconds,
        wall = r.wall_seconds,
        acked = r.acked_events,
        leaders = r.leader_changes,
        hash = r.trace_hash,
        cmd = esc(&r.command),
    )
}
