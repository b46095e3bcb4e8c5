//! `porteiro report`: the KPIs of a period from the request log, as Markdown and as one
//! self-contained HTML file (inline CSS and SVG charts, no scripts, no external assets).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::kpi::{self, Kpis, TierKpis};
use crate::RequestRecord;

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.1}"))
}

fn usd(v: f64) -> String {
    if v.abs() < 0.01 {
        format!("${v:.6}")
    } else {
        format!("${v:.4}")
    }
}

const TIER_HEADERS: [&str; 11] = [
    "tier",
    "requests",
    "errors",
    "tokens in",
    "tokens out",
    "cost",
    "P50 ms",
    "P95 ms",
    "P99 ms",
    "TTFT P50 ms",
    "TTFT P95 ms",
];

/// One tier's row of the tier table, as text cells in `TIER_HEADERS` order.
fn tier_cells(t: &TierKpis) -> [String; 11] {
    [
        t.tier.clone(),
        t.requests.to_string(),
        t.errors.to_string(),
        t.prompt_tokens.to_string(),
        t.completion_tokens.to_string(),
        usd(t.cost_usd),
        ms(t.latency_p50_ms),
        ms(t.latency_p95_ms),
        ms(t.latency_p99_ms),
        ms(t.ttft_p50_ms),
        ms(t.ttft_p95_ms),
    ]
}

/// A title line for the period covered.
pub fn period(records: &[RequestRecord], label: &str) -> String {
    match (records.first(), records.last()) {
        (Some(a), Some(b)) => format!(
            "{label}: {} requests from {} to {} (Unix ms)",
            records.len(),
            a.ts_ms,
            b.ts_ms
        ),
        _ => format!("{label}: no requests"),
    }
}

pub fn markdown(records: &[RequestRecord], label: &str) -> String {
    let k = kpi::compute(records);
    let mut s = String::new();
    let _ = writeln!(s, "# Porteiro report\n\n{}\n", period(records, label));
    let _ = writeln!(s, "| KPI | value |\n|---|---|");
    let _ = writeln!(s, "| requests | {} |", k.requests);
    let _ = writeln!(s, "| errors | {} |", k.errors);
    let _ = writeln!(
        s,
        "| hit ratio (served locally) | {:.1}% |",
        k.hit_ratio * 100.0
    );
    let _ = writeln!(s, "| cost | {} |", usd(k.cost_usd));
    let _ = writeln!(s, "| cost per 1000 requests | {} |", usd(k.cpm_usd));
    let _ = writeln!(s, "| all-upstream baseline | {} |", usd(k.baseline_usd));
    let _ = writeln!(
        s,
        "| savings | {} ({:.1}%) |",
        usd(k.savings_usd),
        if k.baseline_usd > 0.0 {
            k.savings_usd / k.baseline_usd * 100.0
        } else {
            0.0
        }
    );
    let _ = writeln!(
        s,
        "\n| {} |\n|{}",
        TIER_HEADERS.join(" | "),
        "---|".repeat(TIER_HEADERS.len())
    );
    for t in &k.tiers {
        let _ = writeln!(s, "| {} |", tier_cells(t).join(" | "));
    }
    s
}

const COLORS: [&str; 6] = [
    "#2a9d8f", "#e76f51", "#264653", "#e9c46a", "#8ab17d", "#6d597a",
];

/// Requests per time bucket, stacked by tier.
fn requests_chart(records: &[RequestRecord], tiers: &[String]) -> String {
    let (w, h, buckets) = (720.0, 220.0, 24usize);
    let (Some(a), Some(b)) = (records.first(), records.last()) else {
        return String::new();
    };
    let span = ((b.ts_ms - a.ts_ms) as f64).max(1.0);
    let mut counts = vec![BTreeMap::<&str, u32>::new(); buckets];
    for r in records {
        let i = (((r.ts_ms - a.ts_ms) as f64 / span) * (buckets as f64 - 1e-9)) as usize;
        *counts[i.min(buckets - 1)]
            .entry(r.tier.as_str())
            .or_default() += 1;
    }
    let max = counts
        .iter()
        .map(|c| c.values().sum::<u32>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let bw = w / buckets as f64;
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"requests over time by tier\">",
        h + 20.0
    );
    for (i, c) in counts.iter().enumerate() {
        let mut y = h;
        for (ti, t) in tiers.iter().enumerate() {
            let n = *c.get(t.as_str()).unwrap_or(&0) as f64;
            if n == 0.0 {
                continue;
            }
            let bh = n / max * (h - 10.0);
            y -= bh;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{t}: {n}</title></rect>",
                i as f64 * bw + 1.0,
                bw - 2.0,
                COLORS[ti % COLORS.len()]
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"0\" y=\"{}\" font-size=\"11\">peak {max} requests per {:.0} s bucket</text></svg>",
        h + 15.0,
        span / 1000.0 / buckets as f64
    );
    s
}

/// Cumulative cost against the all-upstream baseline.
fn cost_chart(records: &[RequestRecord]) -> String {
    let (w, h) = (720.0, 200.0);
    if records.is_empty() {
        return String::new();
    }
    let (mut c, mut b) = (0.0, 0.0);
    let mut pts: Vec<(f64, f64)> = Vec::with_capacity(records.len());
    for r in records {
        c += r.cost_usd;
        b += r.baseline_usd;
        pts.push((c, b));
    }
    let max = pts.last().map_or(1.0, |p| p.0.max(p.1)).max(1e-12);
    let n = (pts.len() as f64 - 1.0).max(1.0);
    let line = |f: &dyn Fn(&(f64, f64)) -> f64| {
        pts.iter()
            .enumerate()
            .map(|(i, p)| format!("{:.1},{:.1}", i as f64 / n * w, h - f(p) / max * (h - 10.0)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"cumulative cost\">\
         <polyline fill=\"none\" stroke=\"#e76f51\" stroke-width=\"2\" points=\"{}\"/>\
         <polyline fill=\"none\" stroke=\"#2a9d8f\" stroke-width=\"2\" points=\"{}\"/>\
         <text x=\"0\" y=\"{}\" font-size=\"11\">cumulative cost (green) vs all-upstream baseline (orange), max {}</text></svg>",
        h + 20.0,
        line(&|p| p.1),
        line(&|p| p.0),
        h + 15.0,
        usd(max)
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn html(records: &[RequestRecord], label: &str) -> String {
    let k: Kpis = kpi::compute(records);
    let tiers: Vec<String> = k.tiers.iter().map(|t| t.tier.clone()).collect();
    let md = markdown(records, label);
    let mut table = String::from("<table><tr>");
    for h in TIER_HEADERS {
        let _ = write!(table, "<th>{h}</th>");
    }
    table.push_str("</tr>");
    for (i, t) in k.tiers.iter().enumerate() {
        let cells = tier_cells(t);
        let _ = write!(
            table,
            "<tr><td><span class=\"dot\" style=\"background:{}\"></span>{}</td>",
            COLORS[i % COLORS.len()],
            esc(&cells[0])
        );
        for c in &cells[1..] {
            let _ = write!(table, "<td>{c}</td>");
        }
        table.push_str("</tr>");
    }
    table.push_str("</table>");
    let kpi = |name: &str, v: String| {
        format!("<div class=\"kpi\"><div class=\"v\">{v}</div><div class=\"n\">{name}</div></div>")
    };
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Porteiro report</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:960px}}\
         .kpis{{display:flex;gap:1em;flex-wrap:wrap}}.kpi{{border:1px solid #ddd;border-radius:8px;padding:.8em 1.2em}}\
         .kpi .v{{font-size:1.6em;font-weight:600}}.kpi .n{{color:#666;font-size:.85em}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border-bottom:1px solid #eee;padding:.3em .7em;text-align:right}}\
         td:first-child,th:first-child{{text-align:left}}.dot{{display:inline-block;width:.7em;height:.7em;border-radius:50%;margin-right:.4em}}\
         .chart{{width:100%;height:auto;border:1px solid #eee;margin:.5em 0}}</style></head><body>\
         <h1>Porteiro report</h1><p>{}</p><div class=\"kpis\">{}{}{}{}{}</div>\
         <h2>Tiers</h2>{table}<h2>Requests over time</h2>{}<h2>Cost</h2>{}\
         <details><summary>Markdown</summary><pre>{}</pre></details></body></html>",
        esc(&period(records, label)),
        kpi("requests", k.requests.to_string()),
        kpi("hit ratio", format!("{:.1}%", k.hit_ratio * 100.0)),
        kpi("cost per 1000 requests", usd(k.cpm_usd)),
        kpi("savings vs all-upstream", usd(k.savings_usd)),
        kpi("errors", k.errors.to_string()),
        requests_chart(records, &tiers),
        cost_chart(records),
        esc(&md)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn report_has_the_kpis_and_charts_and_no_scripts() {
        let recs: Vec<RequestRecord> = (0..50)
            .map(|i| RequestRecord {
                ts_ms: 1_000 * i,
                tier: if i % 3 == 0 {
                    "big".into()
                } else {
                    "local".into()
                },
                status: 200,
                latency_ms: 10.0 + i as f64,
                cost_usd: if i % 3 == 0 { 0.002 } else { 0.0001 },
                baseline_usd: 0.002,
                ..Default::default()
            })
            .collect();
        let md = markdown(&recs, "last 24h");
        assert!(md.contains("| requests | 50 |"), "{md}");
        assert!(
            md.contains("| hit ratio (served locally) | 66.0% |"),
            "{md}"
        );
        let h = html(&recs, "last 24h");
        assert!(h.contains("<svg") && h.contains("66.0%") && !h.contains("<script"));
        assert!(!h.contains("http://") && !h.contains("https://"));
        assert!(html(&[], "x").contains("no requests"));
    }
}
