//! Router evaluation on held-out labelled rows: the quality reached as a function of the share of
//! requests escalated, and the standard summaries of that curve (as in the RouteLLM paper):
//! - PGR(c), performance gap recovered = (quality(c) − quality_local) / (quality_upstream − quality_local);
//! - APGR, the area under PGR over c ∈ [0, 1] (random routing gives 0.5);
//! - CPT(x), the smallest share escalated that recovers x of the gap.

use serde::Serialize;

use crate::train::Labelled;

/// Quality and PGR after escalating the `k` rows the router trusts least, for k = 0..=n.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub name: String,
    /// (share escalated, quality) points, share from 0 to 1.
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub apgr: f64,
    pub cpt50: f64,
    pub cpt80: f64,
    /// Quality at the configured threshold, and the share it escalated.
    pub at_threshold: Option<(f64, f64)>,
}

pub fn mean(rows: &[Labelled], f: impl Fn(&Labelled) -> f32) -> f64 {
    rows.iter().map(|r| f(r) as f64).sum::<f64>() / rows.len().max(1) as f64
}

/// The curve of a router that escalates rows in the order given (first = escalated first).
pub fn curve_for_order(name: &str, rows: &[Labelled], order: &[usize]) -> Curve {
    let n = rows.len();
    let mut q: f64 = rows.iter().map(|r| r.local as f64).sum();
    let mut points = vec![(0.0, q / n.max(1) as f64)];
    for (k, &i) in order.iter().enumerate() {
        q += (rows[i].upstream - rows[i].local) as f64;
        points.push(((k + 1) as f64 / n as f64, q / n as f64));
    }
    Curve {
        name: name.to_string(),
        points,
    }
}

/// Escalate lowest score first (the score is P(local good enough)).
pub fn router_curve(rows: &[Labelled], scores: &[f32]) -> Curve {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    curve_for_order("router", rows, &order)
}

/// The oracle escalates exactly where upstream is better, biggest gain first.
pub fn oracle_curve(rows: &[Labelled]) -> Curve {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| {
        let ga = rows[a].upstream - rows[a].local;
        let gb = rows[b].upstream - rows[b].local;
        gb.total_cmp(&ga)
    });
    curve_for_order("oracle", rows, &order)
}

/// The random router's expected curve: a straight line.
pub fn random_curve(rows: &[Labelled]) -> Curve {
    let (ql, qu) = (mean(rows, |r| r.local), mean(rows, |r| r.upstream));
    let n = rows.len().max(1);
    Curve {
        name: "random".into(),
        points: (0..=n)
            .map(|k| {
                let c = k as f64 / n as f64;
                (c, ql + c * (qu - ql))
            })
            .collect(),
    }
}

pub fn summarize(c: &Curve, rows: &[Labelled], threshold_point: Option<(f64, f64)>) -> Summary {
    let (ql, qu) = (mean(rows, |r| r.local), mean(rows, |r| r.upstream));
    let gap = qu - ql;
    let pgr = |q: f64| {
        if gap.abs() < 1e-12 {
            f64::NAN
        } else {
            (q - ql) / gap
        }
    };
    let mut apgr = 0.0;
    for w in c.points.windows(2) {
        let (c0, q0) = w[0];
        let (c1, q1) = w[1];
        apgr += (c1 - c0) * (pgr(q0) + pgr(q1)) / 2.0;
    }
    let cpt = |x: f64| {
        c.points
            .iter()
            .find(|(_, q)| pgr(*q) >= x - 1e-12)
            .map_or(f64::NAN, |(c, _)| *c)
    };
    Summary {
        name: c.name.clone(),
        apgr,
        cpt50: cpt(0.5),
        cpt80: cpt(0.8),
        at_threshold: threshold_point,
    }
}

/// (share escalated, quality) when rows scoring below `threshold` are escalated.
pub fn at_threshold(rows: &[Labelled], scores: &[f32], threshold: f64) -> (f64, f64) {
    let n = rows.len().max(1) as f64;
    let mut esc = 0usize;
    let mut q = 0.0;
    for (r, s) in rows.iter().zip(scores) {
        if (*s as f64) < threshold {
            esc += 1;
            q += r.upstream as f64;
        } else {
            q += r.local as f64;
        }
    }
    (esc as f64 / n, q / n)
}

/// Quality vs share escalated as a standalone SVG (no scripts, no external assets).
pub fn svg(title: &str, curves: &[Curve]) -> String {
    let (w, h, m) = (640.0, 420.0, 50.0);
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for c in curves {
        for &(_, q) in &c.points {
            lo = lo.min(q);
            hi = hi.max(q);
        }
    }
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        hi = lo + 1.0;
    }
    let x = |c: f64| m + c * (w - 2.0 * m);
    let y = |q: f64| h - m - (q - lo) / (hi - lo) * (h - 2.0 * m);
    let colors = ["#1f77b4", "#7f7f7f", "#2ca02c", "#d62728", "#9467bd"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">share escalated to upstream</text>\n\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">quality</text>\n",
        w / 2.0,
        xml_escape(title),
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    for i in 0..=4 {
        let c = i as f64 / 4.0;
        let q = lo + c * (hi - lo);
        out += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}%</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.3}</text>\n",
            x(c),
            h - m + 16.0,
            c * 100.0,
            m - 4.0,
            y(q) + 4.0,
            q
        );
    }
    for (i, c) in curves.iter().enumerate() {
        let color = colors[i % colors.len()];
        let pts: Vec<String> = c
            .points
            .iter()
            .map(|&(s, q)| format!("{:.1},{:.1}", x(s), y(q)))
            .collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{}</text>\n",
            pts.join(" "),
            w - m - 110.0,
            m + 16.0 * (i as f64 + 1.0),
            xml_escape(&c.name)
        );
    }
    out += "</svg>\n";
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    fn row(local: f32, upstream: f32) -> Labelled {
        Labelled {
            prompt: String::new(),
            local,
            upstream,
            group: String::new(),
        }
    }

    #[test]
    fn random_router_has_apgr_one_half_and_oracle_does_better() {
        let rows: Vec<Labelled> = (0..100)
            .map(|i| row((i % 3 == 0) as u8 as f32, (i % 3 != 1) as u8 as f32))
            .collect();
        let r = summarize(&random_curve(&rows), &rows, None);
        assert!((r.apgr - 0.5).abs() < 1e-9, "{}", r.apgr);
        assert!((r.cpt50 - 0.5).abs() < 0.011 && (r.cpt80 - 0.8).abs() < 0.011);
        // The oracle recovers the whole gap after escalating the 33 rows where upstream is better:
        // PGR ramps to 1 over c in [0, 0.33] and stays there, so APGR = 0.33 / 2 + 0.67.
        let o = summarize(&oracle_curve(&rows), &rows, None);
        assert!((o.apgr - 0.835).abs() < 1e-9, "{}", o.apgr);
        assert!((o.cpt80 - 0.27).abs() < 0.011, "{}", o.cpt80);
        // A router whose scores are the truth matches the oracle's CPT.
        let scores: Vec<f32> = rows.iter().map(|r| r.local - r.upstream).collect();
        let s = summarize(&router_curve(&rows, &scores), &rows, None);
        assert!(
            (s.cpt80 - o.cpt80).abs() < 0.011,
            "{} vs {}",
            s.cpt80,
            o.cpt80
        );
        // The inverted router is worse than random.
        let bad: Vec<f32> = scores.iter().map(|s| -s).collect();
        assert!(summarize(&router_curve(&rows, &bad), &rows, None).apgr < 0.5);
        let svg = svg("test", &[random_curve(&rows), oracle_curve(&rows)]);
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    }

    #[test]
    fn threshold_point_counts_escalations() {
        let rows = vec![row(1.0, 1.0), row(0.0, 1.0), row(0.0, 0.0), row(1.0, 0.0)];
        let (share, q) = at_threshold(&rows, &[0.9, 0.1, 0.2, 0.8], 0.5);
        assert_eq!(share, 0.5);
        assert_eq!(q, 0.75);
    }
}
