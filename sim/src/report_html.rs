//! The sweep's report.html: one self-contained page (inline CSS, hand-written SVG, no scripts,
//! no external resources) with the cost-against-p95-wait chart (Pareto front marked, default and
//! recommended policies highlighted), instance counts by type over time for the default and the
//! recommended policy, the recommendation and a table of every policy.
//!
//! Every chart element carries a class (`point`, `pareto`, `default`, `recommended`, `front`,
//! `series`) so that tests can find it in the rendered DOM. All text is HTML-escaped.

use std::fmt::Write as _;

use crate::sweep::{Outcome, PolicySummary, Series};

const W: f64 = 940.0;
const H: f64 = 440.0;
const ML: f64 = 70.0;
const MR: f64 = 200.0;
const MT: f64 = 20.0;
const MB: f64 = 50.0;

const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f77b4", "#8c564b",
];

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// "Nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 && out.len() < 50 {
        out.push(t);
        t += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    let v = if v.abs() < 1e-9 { 0.0 } else { v };
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

struct Axes {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Axes {
    fn new(xs: impl Iterator<Item = f64> + Clone, ys: impl Iterator<Item = f64> + Clone) -> Axes {
        let pad = |lo: f64, hi: f64, zero: bool| {
            let (lo, hi) = if lo.is_finite() && hi.is_finite() {
                (lo, hi)
            } else {
                (0.0, 1.0)
            };
            let span = (hi - lo).max(hi.abs() * 0.1).max(1e-6);
            let lo = if zero { 0f64.min(lo) } else { lo - span * 0.08 };
            (lo, hi + span * 0.08)
        };
        let (x0, x1) = pad(
            xs.clone().fold(f64::INFINITY, f64::min),
            xs.fold(f64::NEG_INFINITY, f64::max),
            false,
        );
        let (y0, y1) = pad(
            ys.clone().fold(f64::INFINITY, f64::min),
            ys.fold(f64::NEG_INFINITY, f64::max),
            false,
        );
        Axes { x0, x1, y0, y1 }
    }

    fn x(&self, v: f64) -> f64 {
        let x = ML + (v - self.x0) / (self.x1 - self.x0) * (W - ML - MR);
        x.clamp(ML, W - MR)
    }

    fn y(&self, v: f64) -> f64 {
        let y = H - MB - (v - self.y0) / (self.y1 - self.y0) * (H - MT - MB);
        y.clamp(MT, H - MB)
    }

    fn draw(&self, s: &mut String, xlabel: &str, ylabel: &str) {
        let _ = write!(
            s,
            r##"<g class="axes" stroke="#444" fill="#444" font-size="11"><line x1="{ML}" y1="{b}" x2="{r}" y2="{b}"/><line x1="{ML}" y1="{MT}" x2="{ML}" y2="{b}"/>"##,
            b = H - MB,
            r = W - MR
        );
        for t in ticks(self.x0, self.x1, 8) {
            let x = self.x(t);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{b}" x2="{x:.1}" y2="{b2}"/><text x="{x:.1}" y="{ty}" text-anchor="middle" stroke="none">{}</text>"##,
                fmt_tick(t),
                b = H - MB,
                b2 = H - MB + 5.0,
                ty = H - MB + 18.0
            );
        }
        for t in ticks(self.y0, self.y1, 6) {
            let y = self.y(t);
            let _ = write!(
                s,
                r##"<line x1="{a}" y1="{y:.1}" x2="{ML}" y2="{y:.1}"/><line x1="{ML}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end" stroke="none">{}</text>"##,
                fmt_tick(t),
                a = ML - 5.0,
                r = W - MR,
                tx = ML - 8.0,
                ty = y + 4.0
            );
        }
        let _ = write!(
            s,
            r##"<text x="{cx}" y="{by}" text-anchor="middle" stroke="none" font-size="12">{}</text><text transform="translate(16 {cy}) rotate(-90)" text-anchor="middle" stroke="none" font-size="12">{}</text></g>"##,
            esc(xlabel),
            esc(ylabel),
            cx = (ML + W - MR) / 2.0,
            by = H - 10.0,
            cy = (MT + H - MB) / 2.0
        );
    }
}

fn knobs_text(p: &PolicySummary) -> String {
    p.knobs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cost-against-p95-wait chart.
pub fn pareto_svg(o: &Outcome) -> String {
    let mut s = String::new();
    let ps = &o.policies;
    // The axes cover the feasible policies and their runs (and the default); infeasible ones
    // far off (stalled queues) are drawn clamped to the plot's edge.
    let shown = |policy: usize| policy == 0 || ps.get(policy).is_some_and(|p| p.feasible);
    let axes = Axes::new(
        ps.iter()
            .filter(|p| shown(p.policy))
            .map(|p| p.mean_wait_p95_s)
            .chain(
                o.rows
                    .iter()
                    .filter(|r| shown(r.policy))
                    .map(|r| r.wait_p95_s),
            ),
        ps.iter()
            .filter(|p| shown(p.policy))
            .map(|p| p.mean_cost_usd)
            .chain(
                o.rows
                    .iter()
                    .filter(|r| shown(r.policy))
                    .map(|r| r.cost_usd),
            ),
    );
    let _ = write!(
        s,
        r##"<svg id="pareto" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="Cost against p95 wait">"##
    );
    axes.draw(
        &mut s,
        "p95 wait to start, seconds (mean over seeds)",
        "cost, dollars (mean over seeds)",
    );
    for r in &o.rows {
        let _ = write!(
            s,
            r##"<circle class="run" cx="{:.1}" cy="{:.1}" r="2" fill="#999" fill-opacity="0.35"><title>{} seed {}: ${:.2}, p95 {:.0}s</title></circle>"##,
            axes.x(r.wait_p95_s),
            axes.y(r.cost_usd),
            esc(&r.label),
            r.seed,
            r.cost_usd,
            r.wait_p95_s
        );
    }
    let mut front: Vec<&PolicySummary> = ps.iter().filter(|p| p.pareto).collect();
    front.sort_by(|a, b| {
        a.mean_wait_p95_s
            .total_cmp(&b.mean_wait_p95_s)
            .then(b.mean_cost_usd.total_cmp(&a.mean_cost_usd))
    });
    if front.len() > 1 {
        let pts: Vec<String> = front
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    axes.x(p.mean_wait_p95_s),
                    axes.y(p.mean_cost_usd)
                )
            })
            .collect();
        let _ = write!(
            s,
            r##"<polyline class="front" points="{}" fill="none" stroke="#e15759" stroke-width="1.5" stroke-dasharray="5 3"/>"##,
            pts.join(" ")
        );
    }
    let rec = o.recommendation.policy;
    // Ordinary points first, then the front, then the highlighted ones on top.
    let rank = |p: &PolicySummary| {
        if p.policy == 0 || Some(p.policy) == rec {
            2
        } else if p.pareto {
            1
        } else {
            0
        }
    };
    let mut order: Vec<&PolicySummary> = ps.iter().collect();
    order.sort_by_key(|p| (rank(p), p.policy));
    for p in order {
        let mut class = String::from("point");
        let (mut fill, mut stroke, mut r) = ("#4e79a7", "none", 4.0);
        if !p.feasible {
            class.push_str(" infeasible");
            fill = "#bbb";
        }
        if p.pareto {
            class.push_str(" pareto");
            fill = "#e15759";
        }
        if Some(p.policy) == rec {
            class.push_str(" recommended");
            fill = "#59a14f";
            stroke = "#1b5e20";
            r = 7.0;
        }
        if p.policy == 0 {
            class.push_str(" default");
            fill = "#f28e2b";
            stroke = "#000";
            r = 7.0;
        }
        let _ = write!(
            s,
            r##"<circle class="{class}" data-policy="{}" cx="{:.1}" cy="{:.1}" r="{r}" fill="{fill}" stroke="{stroke}" stroke-width="1.5"><title>{}: ${:.2}, p95 {:.0}s{}; {}</title></circle>"##,
            esc(&p.label),
            axes.x(p.mean_wait_p95_s),
            axes.y(p.mean_cost_usd),
            esc(&p.label),
            p.mean_cost_usd,
            p.mean_wait_p95_s,
            if p.feasible { "" } else { " (infeasible)" },
            esc(&knobs_text(p))
        );
    }
    // Legend.
    let items = [
        ("#4e79a7", "#4e79a7", "policy (mean over seeds)"),
        ("#e15759", "#e15759", "Pareto front"),
        ("#f28e2b", "#000", "default policy"),
        ("#59a14f", "#1b5e20", "recommended policy"),
        ("#bbb", "#bbb", "infeasible"),
        ("#999", "#999", "single run"),
    ];
    let _ = write!(s, r##"<g class="legend" font-size="11">"##);
    for (i, (fill, stroke, label)) in items.iter().enumerate() {
        let y = MT + 8.0 + i as f64 * 16.0;
        let x = W - MR + 20.0;
        let _ = write!(
            s,
            r##"<circle cx="{x}" cy="{y}" r="5" fill="{fill}" stroke="{stroke}"/><text x="{tx}" y="{ty}">{label}</text>"##,
            tx = x + 10.0,
            ty = y + 4.0
        );
    }
    s.push_str("</g></svg>");
    s
}

/// A stacked-area chart of instance counts by type over time.
pub fn instances_svg(id: &str, series: &Series) -> String {
    let (names, samples) = series.sampled(400);
    let totals: Vec<i64> = samples.iter().map(|(_, c)| c.iter().sum()).collect();
    let hours = |t: u64| t as f64 / 3_600_000.0;
    let axes = Axes {
        x0: 0.0,
        x1: hours(series.end_ms).max(1e-3),
        y0: 0.0,
        y1: (totals.iter().copied().max().unwrap_or(0) as f64 * 1.1).max(1.0),
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg id="{}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="Instances by type over time">"##,
        esc(id)
    );
    axes.draw(&mut s, "simulated time, hours", "instances alive");
    let mut below = vec![0i64; samples.len()];
    for (k, name) in names.iter().enumerate() {
        let top: Vec<i64> = samples
            .iter()
            .zip(&below)
            .map(|((_, c), b)| b + c[k])
            .collect();
        let mut d = String::new();
        for (i, ((t, _), v)) in samples.iter().zip(&top).enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if i == 0 { "M" } else { "L" },
                axes.x(hours(*t)),
                axes.y(*v as f64)
            );
        }
        for ((t, _), v) in samples.iter().zip(&below).rev() {
            let _ = write!(d, "L{:.1},{:.1} ", axes.x(hours(*t)), axes.y(*v as f64));
        }
        d.push('Z');
        let peak = samples.iter().map(|(_, c)| c[k]).max().unwrap_or(0);
        let _ = write!(
            s,
            r##"<path class="series" data-type="{n}" d="{d}" fill="{c}" fill-opacity="0.8" stroke="{c}"><title>{n}: peak {peak}</title></path>"##,
            n = esc(name),
            c = PALETTE[k % PALETTE.len()]
        );
        below = top;
    }
    let _ = write!(s, r##"<g class="legend" font-size="11">"##);
    for (k, name) in names.iter().enumerate() {
        let y = MT + 8.0 + k as f64 * 15.0;
        let x = W - MR + 20.0;
        let _ = write!(
            s,
            r##"<rect x="{x}" y="{ry}" width="10" height="10" fill="{c}"/><text x="{tx}" y="{ty}">{n}</text>"##,
            ry = y - 5.0,
            tx = x + 14.0,
            ty = y + 4.0,
            c = PALETTE[k % PALETTE.len()],
            n = esc(name)
        );
    }
    if names.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">no instances</text>"##,
            W / 2.0,
            H / 2.0
        );
    }
    s.push_str("</g></svg>");
    s
}

/// The whole page.
pub fn render(o: &Outcome) -> String {
    let mut s = String::new();
    let rec = &o.recommendation;
    let d = &o.policies[0];
    let _ = write!(
        s,
        r##"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sweep {name}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
td.k, th.k {{ text-align: left; }}
tr.default {{ background: #fde9d4; }} tr.recommended {{ background: #dcefd9; }}
tr.infeasible {{ color: #999; }}
.box {{ border: 1px solid #ccc; padding: 0.5em 1em; background: #fafafa; }}
</style></head><body>
<h1>Pricing-policy sweep: {name}</h1>
<p>{desc}</p>
<p>{np} policies × {ns} seeds = {nr} runs. Knobs: {knobs}.</p>
"##,
        name = esc(&o.name),
        desc = esc(&o.description),
        np = o.policies.len(),
        ns = o.seeds.len(),
        nr = o.rows.len(),
        knobs = esc(&o.knobs.join(", "))
    );
    let _ = write!(
        s,
        r##"<h2>Recommendation</h2><div class="box" id="recommendation"><p>Objective: {}.</p>"##,
        esc(&rec.objective)
    );
    match (rec.policy, &rec.saving) {
        (Some(i), Some(sv)) => {
            let p = &o.policies[i];
            let _ = write!(
                s,
                r##"<p><b>{}</b> costs ${:.2} on average against ${:.2} for the default policy: a saving of <b>{:.1}%</b> (per seed: mean {:.1}%, min {:.1}%, max {:.1}%, standard deviation {:.1} points), at a mean p95 wait of {:.0}s (default {:.0}s).</p><p>Knobs: {}</p>"##,
                esc(&p.label),
                p.mean_cost_usd,
                d.mean_cost_usd,
                sv.of_mean_cost_percent,
                sv.mean_percent,
                sv.min_percent,
                sv.max_percent,
                sv.stddev_percent,
                p.mean_wait_p95_s,
                d.mean_wait_p95_s,
                esc(&knobs_text(p))
            );
        }
        _ => {
            let _ = write!(
                s,
                r##"<p><b>No recommendation.</b> {}</p>"##,
                esc(rec.reason.as_deref().unwrap_or_default())
            );
        }
    }
    let _ = write!(
        s,
        r##"<p>Default policy: {}; mean cost ${:.2}, mean p95 wait {:.0}s.</p></div>"##,
        esc(&knobs_text(d)),
        d.mean_cost_usd,
        d.mean_wait_p95_s
    );
    s.push_str("<h2>Cost against p95 wait</h2><p>Each large dot is a policy (mean over seeds), each small grey dot one run. Red dots joined by the dashed line are the Pareto front: no other feasible policy is both cheaper and quicker. Lower left is better. Infeasible policies outside the range of the feasible ones are drawn on the chart's edge (hover for their values).</p>");
    s.push_str(&pareto_svg(o));
    s.push_str("<h2>Instances by type over time</h2>");
    let first = o.seeds.first().copied().unwrap_or(0);
    let _ = write!(
        s,
        "<h3>Default policy (seed {first})</h3>{}",
        instances_svg("instances-default", &o.default_series)
    );
    match &o.recommended_series {
        Some(series) => {
            let _ = write!(
                s,
                "<h3>Recommended policy (seed {first})</h3>{}",
                instances_svg("instances-recommended", series)
            );
        }
        None => s.push_str("<p>No recommended policy, so no second chart.</p>"),
    }
    s.push_str("<h2>All policies</h2><table id=\"policies\"><tr><th class=\"k\">policy</th>");
    for k in &o.knobs {
        let _ = write!(s, "<th class=\"k\">{}</th>", esc(k));
    }
    s.push_str("<th>mean cost $</th><th>mean p50 wait s</th><th>mean p95 wait s</th><th>worst p95 s</th><th>instance-hours</th><th>utilisation</th><th class=\"k\">notes</th></tr>\n");
    let mut order: Vec<&PolicySummary> = o.policies.iter().collect();
    order.sort_by(|a, b| {
        b.feasible
            .cmp(&a.feasible)
            .then(a.mean_cost_usd.total_cmp(&b.mean_cost_usd))
            .then(a.policy.cmp(&b.policy))
    });
    for p in order {
        let class = if p.policy == 0 {
            "default"
        } else if Some(p.policy) == rec.policy {
            "recommended"
        } else if !p.feasible {
            "infeasible"
        } else {
            ""
        };
        let _ = write!(
            s,
            "<tr class=\"{class}\"><td class=\"k\">{}</td>",
            esc(&p.label)
        );
        for k in &o.knobs {
            let _ = write!(
                s,
                "<td class=\"k\">{}</td>",
                esc(p.knobs.get(k).map_or("", String::as_str))
            );
        }
        let mut notes = Vec::new();
        if p.pareto {
            notes.push("Pareto".to_string());
        }
        if let Some(r) = &p.infeasible_reason {
            notes.push(format!("infeasible: {r}"));
        }
        let _ = writeln!(
            s,
            "<td>{:.2}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.1}</td><td>{:.1}%</td><td class=\"k\">{}</td></tr>",
            p.mean_cost_usd,
            p.mean_wait_p50_s,
            p.mean_wait_p95_s,
            p.worst_wait_p95_s,
            p.mean_instance_hours,
            p.mean_utilisation * 100.0,
            esc(&notes.join("; "))
        );
    }
    s.push_str("</table>\n<p>Costs price preemptible instance-hours at the sweep file's spot market prices; see docs/pricing.md for the method.</p>\n</body></html>\n");
    s
}
