//! Prometheus text exposition for `/metrics`. Every metric name lives in [`names`]; nothing else in the
//! server spells one.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use porteiro_engine::scheduler::EngineStats;

pub mod names {
    pub const HTTP_REQUESTS: &str = "porteiro_http_requests_total";
    pub const HTTP_DURATION: &str = "porteiro_http_request_duration_seconds";
    pub const TTFT: &str = "porteiro_time_to_first_token_seconds";
    pub const GENERATION_DURATION: &str = "porteiro_generation_duration_seconds";
    pub const PROMPT_TOKENS: &str = "porteiro_prompt_tokens_total";
    pub const COMPLETION_TOKENS: &str = "porteiro_completion_tokens_total";
    pub const EMBEDDING_INPUTS: &str = "porteiro_embedding_inputs_total";
    pub const CANCELLED: &str = "porteiro_cancelled_requests_total";
    pub const REJECTED: &str = "porteiro_rejected_requests_total";
    pub const RUNNING: &str = "porteiro_running_sequences";
    pub const WAITING: &str = "porteiro_waiting_requests";
    pub const KV_RESERVED: &str = "porteiro_kv_reserved_tokens";
    pub const KV_BYTES: &str = "porteiro_kv_cache_bytes";
    pub const STEPS: &str = "porteiro_engine_steps_total";
    pub const BATCH_TOKENS: &str = "porteiro_engine_batch_tokens_total";
    pub const READY: &str = "porteiro_ready";
    pub const ROUTER_DECISIONS: &str = "porteiro_router_decisions_total";
    pub const ROUTER_DECISION_DURATION: &str = "porteiro_router_decision_seconds";
    pub const UPSTREAM_FAILURES: &str = "porteiro_upstream_failures_total";
    pub const FALLBACKS: &str = "porteiro_fallbacks_total";
    pub const FLYWHEEL_COMPARISONS: &str = "porteiro_flywheel_comparisons_total";
    pub const FLYWHEEL_ROUTES_VERSION: &str = "porteiro_flywheel_routes_version";
    pub const PRIVACY_ACTIONS: &str = "porteiro_privacy_actions_total";
    pub const PII_FOUND: &str = "porteiro_pii_found_total";
    pub const TIER_REQUESTS: &str = "porteiro_tier_requests_total";
    pub const TIER_ERRORS: &str = "porteiro_tier_errors_total";
    pub const TIER_TOKENS: &str = "porteiro_tier_tokens_total";
    pub const TIER_COST: &str = "porteiro_tier_cost_usd_total";
    pub const TIER_LATENCY: &str = "porteiro_tier_latency_seconds";
    pub const TIER_TTFT: &str = "porteiro_tier_ttft_seconds";
    pub const TIER_INTER_TOKEN: &str = "porteiro_tier_inter_token_seconds";
    pub const TIER_LATENCY_RECENT: &str = "porteiro_tier_latency_recent_seconds";
    pub const TIER_TTFT_RECENT: &str = "porteiro_tier_ttft_recent_seconds";
    pub const HIT_RATIO: &str = "porteiro_hit_ratio";
    pub const COST: &str = "porteiro_cost_usd_total";
    pub const BASELINE_COST: &str = "porteiro_baseline_cost_usd_total";
    pub const SAVINGS: &str = "porteiro_savings_usd";
    pub const CPM: &str = "porteiro_cost_per_1k_requests_usd";
    pub const GATEWAY_OVERHEAD: &str = "porteiro_gateway_overhead_seconds";
    pub const LOG_WRITTEN: &str = "porteiro_request_log_written_total";
    pub const LOG_DROPPED: &str = "porteiro_request_log_dropped_total";
    pub const LOG_FAILED: &str = "porteiro_request_log_failed_total";
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative Prometheus histogram over fixed bucket bounds (seconds).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(&LATENCY_BUCKETS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    /// The `_bucket`, `_sum` and `_count` lines, with `labels` (may be empty) on each.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Counters and histograms owned by the HTTP layer (the engine keeps its own in [`EngineStats`]).
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    http_duration: Mutex<BTreeMap<String, Histogram>>,
    ttft: Mutex<BTreeMap<String, Histogram>>,
    generation: Mutex<BTreeMap<String, Histogram>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    embedding_inputs: AtomicU64,
    rejected: AtomicU64,
    /// The version of the flywheel's routes file in use.
    flywheel_version: AtomicU64,
    /// (wanted tier, served tier, route) -> decisions.
    decisions: Mutex<BTreeMap<(String, String, String), u64>>,
    decision_time: Mutex<Histogram>,
    /// (upstream, kind) -> failures.
    upstream_failures: Mutex<BTreeMap<(String, String), u64>>,
    /// (upstream, when) -> answers the local tier took over.
    fallbacks: Mutex<BTreeMap<(String, String), u64>>,
    /// (learned route, role, agreed) -> live comparisons with the teacher.
    flywheel: Mutex<BTreeMap<(String, String, bool), u64>>,
    /// (tier, action) -> requests the privacy guard acted on.
    privacy_actions: Mutex<BTreeMap<(String, String), u64>>,
    /// category -> values found.
    pii_found: Mutex<BTreeMap<String, u64>>,
}

/// Observes into the histogram of `key`, allocating the key only the first time.
fn observe(map: &mut BTreeMap<String, Histogram>, key: &str, v: f64) {
    match map.get_mut(key) {
        Some(h) => h.observe(v),
        None => map.entry(key.to_string()).or_default().observe(v),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves plain numbers behind: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        *lock(&self.requests)
            .entry((route.to_string(), status))
            .or_default() += 1;
        observe(&mut lock(&self.http_duration), route, seconds);
    }

    pub fn first_token(&self, endpoint: &str, seconds: f64) {
        observe(&mut lock(&self.ttft), endpoint, seconds);
    }

    pub fn generation_done(&self, endpoint: &str, seconds: f64, prompt: usize, completion: usize) {
        observe(&mut lock(&self.generation), endpoint, seconds);
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    pub fn embedded(&self, inputs: usize, tokens: usize) {
        self.embedding_inputs
            .fetch_add(inputs as u64, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// A routing decision: the tier the router chose, the tier that served, and the route.
    pub fn routed(&self, wanted: &str, served: &str, route: &str, seconds: f64) {
        *lock(&self.decisions)
            .entry((wanted.to_string(), served.to_string(), route.to_string()))
            .or_default() += 1;
        lock(&self.decision_time).observe(seconds);
    }

    pub fn upstream_failure(&self, upstream: &str, kind: &str) {
        *lock(&self.upstream_failures)
            .entry((upstream.to_string(), kind.to_string()))
            .or_default() += 1;
    }

    /// The local tier took over from `upstream` (`when`: before_first_token or mid_stream).
    pub fn fallback(&self, upstream: &str, when: &str) {
        *lock(&self.fallbacks)
            .entry((upstream.to_string(), when.to_string()))
            .or_default() += 1;
    }

    /// The flywheel's routes file was (re)loaded at `version`.
    pub fn flywheel_routes(&self, version: u64) {
        self.flywheel_version.store(version, Ordering::Relaxed);
    }

    /// A learned route's candidate was compared with the teacher (`role`: shadow or monitor).
    pub fn flywheel_comparison(&self, route: &str, role: &str, agreed: bool) {
        *lock(&self.flywheel)
            .entry((route.to_string(), role.to_string(), agreed))
            .or_default() += 1;
    }

    /// The privacy guard applied `action` (keep_local, mask, block, allow, none) to a request for `tier`.
    pub fn privacy(&self, tier: &str, action: &str, categories: &[(&str, usize)]) {
        *lock(&self.privacy_actions)
            .entry((tier.to_string(), action.to_string()))
            .or_default() += 1;
        let mut found = lock(&self.pii_found);
        for (c, n) in categories {
            *found.entry(c.to_string()).or_default() += *n as u64;
        }
    }

    /// The text exposition (format 0.0.4).
    pub fn render(&self, engine: Option<&EngineStats>, ready: bool) -> String {
        use names::*;
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut o,
            READY,
            "gauge",
            "1 when the model is loaded and requests are served.",
        );
        let _ = writeln!(o, "{READY} {}", u8::from(ready));
        head(
            &mut o,
            HTTP_REQUESTS,
            "counter",
            "HTTP requests by route and status.",
        );
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                o,
                "{HTTP_REQUESTS}{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        head(
            &mut o,
            HTTP_DURATION,
            "histogram",
            "Time to the response head (streams: until the stream starts).",
        );
        for (route, h) in lock(&self.http_duration).iter() {
            h.render(&mut o, HTTP_DURATION, &format!("route=\"{route}\""));
        }
        head(
            &mut o,
            TTFT,
            "histogram",
            "Time from request to the first generated text.",
        );
        for (ep, h) in lock(&self.ttft).iter() {
            h.render(&mut o, TTFT, &format!("endpoint=\"{ep}\""));
        }
        head(
            &mut o,
            GENERATION_DURATION,
            "histogram",
            "Time from request to the last generated token.",
        );
        for (ep, h) in lock(&self.generation).iter() {
            h.render(&mut o, GENERATION_DURATION, &format!("endpoint=\"{ep}\""));
        }
        for (name, help, v) in [
            (
                PROMPT_TOKENS,
                "Prompt tokens of finished requests (generation and embeddings).",
                &self.prompt_tokens,
            ),
            (
                COMPLETION_TOKENS,
                "Generated tokens of finished requests.",
                &self.completion_tokens,
            ),
            (EMBEDDING_INPUTS, "Texts embedded.", &self.embedding_inputs),
            (
                REJECTED,
                "Requests refused because the queue was full (429).",
                &self.rejected,
            ),
        ] {
            head(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        if let Some(e) = engine {
            let ld = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
            for (name, kind, help, v) in [
                (
                    RUNNING,
                    "gauge",
                    "Sequences holding a slot and a KV cache.",
                    ld(&e.running),
                ),
                (
                    WAITING,
                    "gauge",
                    "Requests queued for a slot.",
                    ld(&e.waiting),
                ),
                (
                    KV_RESERVED,
                    "gauge",
                    "KV positions reserved by running sequences.",
                    ld(&e.kv_reserved_tokens),
                ),
                (
                    KV_BYTES,
                    "gauge",
                    "Bytes allocated by the KV caches of running sequences.",
                    ld(&e.kv_bytes),
                ),
                (
                    CANCELLED,
                    "counter",
                    "Requests cancelled because the client went away.",
                    e.cancelled.load(Ordering::Relaxed),
                ),
                (
                    STEPS,
                    "counter",
                    "Batched forward steps.",
                    e.steps.load(Ordering::Relaxed),
                ),
                (
                    BATCH_TOKENS,
                    "counter",
                    "Tokens processed by batched forward steps.",
                    e.batch_tokens.load(Ordering::Relaxed),
                ),
            ] {
                head(&mut o, name, kind, help);
                let _ = writeln!(o, "{name} {v}");
            }
        }
        head(
            &mut o,
            ROUTER_DECISIONS,
            "counter",
            "Routed requests by the tier the router chose, the tier that served and the route.",
        );
        for ((wanted, served, route), n) in lock(&self.decisions).iter() {
            let _ = writeln!(
                o,
                "{ROUTER_DECISIONS}{{wanted=\"{wanted}\",served=\"{served}\",route=\"{route}\"}} {n}"
            );
        }
        head(
            &mut o,
            ROUTER_DECISION_DURATION,
            "histogram",
            "Time to decide a route (encode + decide).",
        );
        lock(&self.decision_time).render(&mut o, ROUTER_DECISION_DURATION, "");
        head(
            &mut o,
            UPSTREAM_FAILURES,
            "counter",
            "Failed upstream attempts by upstream and kind.",
        );
        for ((up, kind), n) in lock(&self.upstream_failures).iter() {
            let _ = writeln!(
                o,
                "{UPSTREAM_FAILURES}{{upstream=\"{up}\",kind=\"{kind}\"}} {n}"
            );
        }
        head(
            &mut o,
            FALLBACKS,
            "counter",
            "Answers the local tier took over from an upstream, by when it happened.",
        );
        for ((up, when), n) in lock(&self.fallbacks).iter() {
            let _ = writeln!(o, "{FALLBACKS}{{upstream=\"{up}\",when=\"{when}\"}} {n}");
        }
        head(
            &mut o,
            FLYWHEEL_ROUTES_VERSION,
            "gauge",
            "Version of the flywheel's routes file in use (0: none).",
        );
        let _ = writeln!(
            o,
            "{FLYWHEEL_ROUTES_VERSION} {}",
            self.flywheel_version.load(Ordering::Relaxed)
        );
        head(
            &mut o,
            FLYWHEEL_COMPARISONS,
            "counter",
            "Live comparisons of a learned route's candidate with the teacher, by role and outcome.",
        );
        for ((route, role, agreed), n) in lock(&self.flywheel).iter() {
            let _ = writeln!(
                o,
                "{FLYWHEEL_COMPARISONS}{{route=\"{route}\",role=\"{role}\",agreed=\"{agreed}\"}} {n}"
            );
        }
        head(
            &mut o,
            PRIVACY_ACTIONS,
            "counter",
            "Requests by tier and what the privacy guard did (none, keep_local, mask, block, allow).",
        );
        for ((tier, action), n) in lock(&self.privacy_actions).iter() {
            let _ = writeln!(
                o,
                "{PRIVACY_ACTIONS}{{tier=\"{tier}\",action=\"{action}\"}} {n}"
            );
        }
        head(
            &mut o,
            PII_FOUND,
            "counter",
            "Personal-data values found in requests, by category (never the values).",
        );
        for (c, n) in lock(&self.pii_found).iter() {
            let _ = writeln!(o, "{PII_FOUND}{{category=\"{c}\"}} {n}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.request("/v1/models", 200, 0.003);
        m.request("/v1/models", 200, 0.7);
        let text = m.render(None, true);
        assert!(
            text.contains("porteiro_http_requests_total{route=\"/v1/models\",status=\"200\"} 2")
        );
        assert!(text.contains(
            "porteiro_http_request_duration_seconds_bucket{route=\"/v1/models\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "porteiro_http_request_duration_seconds_bucket{route=\"/v1/models\",le=\"1\"} 2"
        ));
        assert!(
            text.contains("porteiro_http_request_duration_seconds_count{route=\"/v1/models\"} 2")
        );
        assert!(text.contains("porteiro_ready 1"));
    }
}
