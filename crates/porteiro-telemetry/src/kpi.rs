//! The KPIs, computed one way for the dashboard, `/metrics` and the report: hit ratio (share served
//! by the local tier), latency and TTFT quantiles per tier, tokens, cost per 1000 requests, and the
//! savings against sending everything to the baseline upstream.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{RequestRecord, LOCAL_TIER};

/// Nearest-rank quantile of sorted values (q in 0..=1); None when empty.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TierKpis {
    pub tier: String,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Kpis {
    pub requests: u64,
    pub errors: u64,
    pub local_requests: u64,
    /// Share of requests answered by the local tier.
    pub hit_ratio: f64,
    pub cost_usd: f64,
    pub baseline_usd: f64,
    pub savings_usd: f64,
    /// Cost per 1000 requests.
    pub cpm_usd: f64,
    pub baseline_cpm_usd: f64,
    pub tiers: Vec<TierKpis>,
}

/// Sums and quantiles over `records`.
pub fn compute<'a>(records: impl IntoIterator<Item = &'a RequestRecord>) -> Kpis {
    let mut by_tier: BTreeMap<String, (TierKpis, Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut k = Kpis::default();
    for r in records {
        k.requests += 1;
        k.errors += r.is_error() as u64;
        k.local_requests += (r.tier == LOCAL_TIER) as u64;
        k.cost_usd += r.cost_usd;
        k.baseline_usd += r.baseline_usd;
        let e = by_tier.entry(r.tier.clone()).or_insert_with(|| {
            (
                TierKpis {
                    tier: r.tier.clone(),
                    ..Default::default()
                },
                Vec::new(),
                Vec::new(),
            )
        });
        e.0.requests += 1;
        e.0.errors += r.is_error() as u64;
        e.0.prompt_tokens += r.prompt_tokens;
        e.0.completion_tokens += r.completion_tokens;
        e.0.cost_usd += r.cost_usd;
        if !r.is_error() {
            e.1.push(r.latency_ms);
            if let Some(t) = r.ttft_ms {
                e.2.push(t);
            }
        }
    }
    for (_, (mut t, mut lat, mut ttft)) in by_tier {
        lat.sort_by(f64::total_cmp);
        ttft.sort_by(f64::total_cmp);
        t.latency_p50_ms = quantile(&lat, 0.5);
        t.latency_p95_ms = quantile(&lat, 0.95);
        t.latency_p99_ms = quantile(&lat, 0.99);
        t.ttft_p50_ms = quantile(&ttft, 0.5);
        t.ttft_p95_ms = quantile(&ttft, 0.95);
        t.ttft_p99_ms = quantile(&ttft, 0.99);
        k.tiers.push(t);
    }
    if k.requests > 0 {
        k.hit_ratio = k.local_requests as f64 / k.requests as f64;
        k.cpm_usd = k.cost_usd / k.requests as f64 * 1000.0;
        k.baseline_cpm_usd = k.baseline_usd / k.requests as f64 * 1000.0;
    }
    k.savings_usd = k.baseline_usd - k.cost_usd;
    k
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn quantiles_hit_ratio_cpm_and_savings() {
        assert_eq!(quantile(&[], 0.5), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.95), Some(95.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
        let rec = |tier: &str, lat: f64, cost: f64, status: u16| RequestRecord {
            tier: tier.into(),
            latency_ms: lat,
            ttft_ms: Some(lat / 2.0),
            cost_usd: cost,
            baseline_usd: 0.01,
            status,
            ..Default::default()
        };
        let recs = vec![
            rec("local", 10.0, 0.0001, 200),
            rec("local", 30.0, 0.0001, 200),
            rec("local", 20.0, 0.0001, 200),
            rec("big", 100.0, 0.01, 200),
            rec("big", 900.0, 0.0, 502),
        ];
        let k = compute(&recs);
        assert_eq!((k.requests, k.errors, k.local_requests), (5, 1, 3));
        assert!((k.hit_ratio - 0.6).abs() < 1e-12);
        assert!((k.cpm_usd - 0.0103 / 5.0 * 1000.0).abs() < 1e-9);
        assert!((k.savings_usd - (0.05 - 0.0103)).abs() < 1e-12);
        let local = k.tiers.iter().find(|t| t.tier == "local").unwrap();
        assert_eq!(local.latency_p50_ms, Some(20.0));
        assert_eq!(local.latency_p95_ms, Some(30.0));
        // Failed requests count as errors, not in the latency quantiles.
        let big = k.tiers.iter().find(|t| t.tier == "big").unwrap();
        assert_eq!((big.errors, big.latency_p99_ms), (1, Some(100.0)));
    }
}
