//! Per-request telemetry. Each chat / completion request carries a [`Trace`]; the handler marks where
//! it was sent and the pipeline's observation step (`answer::observe`, the one place that sees every
//! chunk) marks its tokens, usage and outcome. When the last clone is dropped (the answer is
//! complete, failed, or the client went away) the record is priced, added to the live aggregates
//! behind `/metrics` and the dashboard, and queued for the request log.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use porteiro_config::Config;
use porteiro_engine::scheduler::EngineStats;
use porteiro_telemetry::kpi::{self, Kpis};
use porteiro_telemetry::log::LogWriter;
use porteiro_telemetry::{now_ms, Prices, RequestRecord, Sample, LOCAL_TIER};
use serde::Serialize;

use crate::metrics::Histogram;
use crate::privacy::{Action, Guard, RequestCtx};

/// Records kept in memory for quantiles and the dashboard's table.
const WINDOW: usize = 2000;
const RECENT: usize = 50;
/// Time series: buckets of this many seconds, this many kept.
const BUCKET_S: i64 = 5;
const BUCKETS: usize = 120;

/// Histogram bucket bounds for sub-millisecond gateway overhead, in seconds.
pub const OVERHEAD_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// Bucket bounds of the per-tier latency histograms, in seconds (answers can take minutes).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// (tier, model, route).
pub type Key = (String, String, String);

/// Counters per (tier, model, route).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub ts_ms: i64,
    pub requests: BTreeMap<String, u64>,
    pub cost_usd: f64,
    pub baseline_usd: f64,
    pub latency_ms_max: f64,
}

#[derive(Default)]
struct Agg {
    counters: BTreeMap<(String, String, String), Counters>,
    latency: BTreeMap<Key, Histogram>,
    ttft: BTreeMap<Key, Histogram>,
    itl: BTreeMap<Key, Histogram>,
    overhead: Histogram,
    /// The last overhead samples, seconds (exact quantiles for `porteiro gateway-bench`).
    overhead_samples: VecDeque<f64>,
    requests: u64,
    errors: u64,
    local: u64,
    cost: f64,
    baseline: f64,
    window: VecDeque<RequestRecord>,
    series: VecDeque<Bucket>,
}

/// What the dashboard and `/metrics` show, from one lock.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Totals since start; quantiles over the last requests in memory.
    pub kpis: Kpis,
    pub counters: Vec<(String, String, String, Counters)>,
    pub series: Vec<Bucket>,
    pub recent: Vec<RequestRecord>,
    #[serde(skip)]
    pub latency: BTreeMap<Key, Histogram>,
    #[serde(skip)]
    pub ttft: BTreeMap<Key, Histogram>,
    #[serde(skip)]
    pub itl: BTreeMap<Key, Histogram>,
    #[serde(skip)]
    pub overhead: Histogram,
    pub log_written: u64,
    pub log_dropped: u64,
    pub log_failed: u64,
}

impl Snapshot {
    /// The Prometheus lines of the request telemetry (per tier / model / route, FinOps KPIs,
    /// request log health).
    pub fn render_prometheus(&self, o: &mut String) {
        use crate::metrics::names::*;
        let snap = self;
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let esc = |s: &str| {
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        let lbl = |t: &str, m: &str, r: &str| {
            format!(
                "tier=\"{}\",model=\"{}\",route=\"{}\"",
                esc(t),
                esc(m),
                esc(r)
            )
        };
        type Pick = fn(&Counters) -> f64;
        let series: [(&str, &str, &str, Pick); 5] = [
            (TIER_REQUESTS, "", "Requests answered, by tier, model and route.", |c| c.requests as f64),
            (TIER_ERRORS, "", "Requests that failed, by tier, model and route.", |c| c.errors as f64),
            (TIER_TOKENS, ",direction=\"in\"", "Tokens by tier, model, route and direction (in: prompt, out: completion).", |c| c.prompt_tokens as f64),
            (TIER_TOKENS, ",direction=\"out\"", "", |c| c.completion_tokens as f64),
            (TIER_COST, "", "Cost in USD by tier, model and route (upstream token prices; local: machine price x busy time).", |c| c.cost_usd),
        ];
        for (name, extra, help, pick) in series {
            if !help.is_empty() {
                head(o, name, "counter", help);
            }
            for (t, m, r, c) in &snap.counters {
                let _ = writeln!(o, "{name}{{{}{extra}}} {}", lbl(t, m, r), pick(c));
            }
        }
        let hists = |o: &mut String, name: &str, help: &str, hs: &BTreeMap<Key, Histogram>| {
            head(o, name, "histogram", help);
            for ((t, m, r), h) in hs {
                h.render(o, name, &lbl(t, m, r));
            }
        };
        hists(
            o,
            TIER_LATENCY,
            "Request latency by tier, model and route (successful requests).",
            &snap.latency,
        );
        hists(
            o,
            TIER_TTFT,
            "Time to first token by tier, model and route.",
            &snap.ttft,
        );
        hists(
            o,
            TIER_INTER_TOKEN,
            "Time between streamed pieces of an answer, by tier, model and route.",
            &snap.itl,
        );
        // Quantiles as the dashboard shows them (nearest rank over the last requests in memory).
        let summary =
            |o: &mut String,
             name: &str,
             help: &str,
             pick: &dyn Fn(&porteiro_telemetry::kpi::TierKpis) -> [Option<f64>; 3]| {
                head(o, name, "summary", help);
                for t in &snap.kpis.tiers {
                    for (q, v) in ["0.5", "0.95", "0.99"].iter().zip(pick(t)) {
                        if let Some(v) = v {
                            let _ = writeln!(
                                o,
                                "{name}{{tier=\"{}\",quantile=\"{q}\"}} {}",
                                esc(&t.tier),
                                v / 1e3
                            );
                        }
                    }
                }
            };
        summary(
            o,
            TIER_LATENCY_RECENT,
            "Latency quantiles by tier over the last 2000 requests.",
            &|t| [t.latency_p50_ms, t.latency_p95_ms, t.latency_p99_ms],
        );
        summary(
            o,
            TIER_TTFT_RECENT,
            "TTFT quantiles by tier over the last 2000 requests.",
            &|t| [t.ttft_p50_ms, t.ttft_p95_ms, t.ttft_p99_ms],
        );
        let k = &snap.kpis;
        head(
            o,
            HIT_RATIO,
            "gauge",
            "Share of requests answered by the local tier.",
        );
        let _ = writeln!(o, "{HIT_RATIO} {}", k.hit_ratio);
        head(o, COST, "counter", "Total cost in USD.");
        let _ = writeln!(o, "{COST} {}", k.cost_usd);
        head(
            o,
            BASELINE_COST,
            "counter",
            "What every request would have cost at the baseline upstream's token prices.",
        );
        let _ = writeln!(o, "{BASELINE_COST} {}", k.baseline_usd);
        head(o, SAVINGS, "gauge", "Baseline cost minus actual cost, USD.");
        let _ = writeln!(o, "{SAVINGS} {}", k.savings_usd);
        head(o, CPM, "gauge", "Cost per 1000 requests, USD.");
        let _ = writeln!(o, "{CPM} {}", k.cpm_usd);
        head(
            o,
            GATEWAY_OVERHEAD,
            "histogram",
            "Time in the gateway on upstream requests, excluding waiting for the upstream.",
        );
        snap.overhead.render(o, GATEWAY_OVERHEAD, "");
        head(o, LOG_WRITTEN, "counter", "Request-log records written.");
        let _ = writeln!(o, "{LOG_WRITTEN} {}", snap.log_written);
        head(o, LOG_DROPPED, "counter", "Request-log records dropped because the writer's queue was full (the requests succeeded).");
        let _ = writeln!(o, "{LOG_DROPPED} {}", snap.log_dropped);
        head(
            o,
            LOG_FAILED,
            "counter",
            "Request-log records the database refused.",
        );
        let _ = writeln!(o, "{LOG_FAILED} {}", snap.log_failed);
    }
}

pub struct Telemetry {
    /// False for the no-op telemetry (nothing is recorded or rendered).
    enabled: bool,
    agg: Mutex<Agg>,
    prices: BTreeMap<String, Prices>,
    baseline: Prices,
    machine_per_s: f64,
    pub log: Option<LogWriter>,
    /// Whether the request log keeps prompts and answers (sealed).
    pub store_text: bool,
    /// Whether upstream answers are kept as flywheel samples (sealed).
    pub collect: bool,
    /// The engine's counters, for the local tier's cost (the engine loads after the listener).
    engine: OnceLock<Arc<EngineStats>>,
}

impl Telemetry {
    pub fn new(cfg: &Config, log: Option<LogWriter>) -> Self {
        let prices: BTreeMap<String, Prices> = cfg
            .upstreams
            .iter()
            .map(|u| {
                (
                    u.name.clone(),
                    Prices {
                        input_per_m: u.price_in_per_m,
                        output_per_m: u.price_out_per_m,
                    },
                )
            })
            .collect();
        let t = &cfg.telemetry;
        let baseline = match &t.baseline {
            Some(b) => prices[b],
            None => cfg
                .upstreams
                .iter()
                .max_by(|a, b| {
                    (a.price_in_per_m + a.price_out_per_m)
                        .total_cmp(&(b.price_in_per_m + b.price_out_per_m))
                })
                .map_or(
                    Prices {
                        input_per_m: t.baseline_price_in_per_m,
                        output_per_m: t.baseline_price_out_per_m,
                    },
                    |u| prices[&u.name],
                ),
        };
        Self {
            enabled: true,
            agg: Mutex::new(Agg {
                overhead: Histogram::new(&OVERHEAD_BUCKETS),
                ..Default::default()
            }),
            prices,
            baseline,
            machine_per_s: t.machine_price_per_hour / 3600.0,
            store_text: cfg.log.store_text && log.is_some(),
            collect: cfg.flywheel.collect && log.is_some(),
            log,
            engine: OnceLock::new(),
        }
    }

    /// Telemetry that records nothing (servers built without it, e.g. in tests).
    pub fn off() -> Self {
        Self {
            enabled: false,
            agg: Mutex::new(Agg::default()),
            prices: BTreeMap::new(),
            baseline: Prices {
                input_per_m: 0.0,
                output_per_m: 0.0,
            },
            machine_per_s: 0.0,
            log: None,
            store_text: false,
            collect: false,
            engine: OnceLock::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The engine's counters, once it is loaded (prices the local tier by its busy time).
    pub fn set_engine(&self, stats: Arc<EngineStats>) {
        // Set once per engine; a second engine is never started.
        let _ = self.engine.set(stats);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Agg> {
        self.agg.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prices a finished record and adds it everywhere.
    fn finish(&self, mut rec: RequestRecord, itl: &[f64], overhead: Option<f64>) {
        // The in-memory window keeps records without their texts.
        let texts = (rec.prompt.take(), rec.response.take());
        let sample = rec.sample.take();
        rec.baseline_usd = self.baseline.cost(rec.prompt_tokens, rec.completion_tokens);
        rec.cost_usd = if rec.tier == LOCAL_TIER {
            // The request's share of the engine's measured busy time, by tokens processed.
            let per_token_s = self.engine.get().map_or(0.0, |s| {
                let tokens = s.batch_tokens.load(Ordering::Relaxed).max(1) as f64;
                s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9 / tokens
            });
            (rec.prompt_tokens + rec.completion_tokens) as f64 * per_token_s * self.machine_per_s
        } else {
            self.prices
                .get(&rec.tier)
                .map_or(0.0, |p| p.cost(rec.prompt_tokens, rec.completion_tokens))
        };
        {
            let mut a = self.lock();
            let err = rec.is_error();
            let c = a
                .counters
                .entry((rec.tier.clone(), rec.model.clone(), rec.route.clone()))
                .or_default();
            c.requests += 1;
            c.errors += err as u64;
            c.prompt_tokens += rec.prompt_tokens;
            c.completion_tokens += rec.completion_tokens;
            c.cost_usd += rec.cost_usd;
            a.requests += 1;
            a.errors += err as u64;
            a.local += (rec.tier == LOCAL_TIER) as u64;
            a.cost += rec.cost_usd;
            a.baseline += rec.baseline_usd;
            let key: Key = (rec.tier.clone(), rec.model.clone(), rec.route.clone());
            if !err {
                a.latency
                    .entry(key.clone())
                    .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
                    .observe(rec.latency_ms / 1e3);
                if let Some(t) = rec.ttft_ms {
                    a.ttft
                        .entry(key.clone())
                        .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
                        .observe(t / 1e3);
                }
                let h = a
                    .itl
                    .entry(key)
                    .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS));
                for &g in itl {
                    h.observe(g);
                }
            }
            if let Some(o) = overhead {
                a.overhead.observe(o);
                a.overhead_samples.push_back(o);
                if a.overhead_samples.len() > 100_000 {
                    a.overhead_samples.pop_front();
                }
            }
            let bucket_ts = rec.ts_ms / (BUCKET_S * 1000) * BUCKET_S * 1000;
            if a.series.back().is_none_or(|b| b.ts_ms != bucket_ts) {
                a.series.push_back(Bucket {
                    ts_ms: bucket_ts,
                    requests: BTreeMap::new(),
                    cost_usd: 0.0,
                    baseline_usd: 0.0,
                    latency_ms_max: 0.0,
                });
                if a.series.len() > BUCKETS {
                    a.series.pop_front();
                }
            }
            if let Some(b) = a.series.back_mut() {
                *b.requests.entry(rec.tier.clone()).or_default() += 1;
                b.cost_usd += rec.cost_usd;
                b.baseline_usd += rec.baseline_usd;
                b.latency_ms_max = b.latency_ms_max.max(rec.latency_ms);
            }
            a.window.push_back(rec.clone());
            if a.window.len() > WINDOW {
                a.window.pop_front();
            }
        }
        if let Some(l) = &self.log {
            // Texts are present only when the log stores them (`Trace::texts`).
            (rec.prompt, rec.response) = texts;
            rec.sample = sample;
            l.record(rec);
        }
    }

    /// Totals since start, quantiles over the in-memory window.
    pub fn snapshot(&self) -> Snapshot {
        let a = self.lock();
        let mut kpis = kpi::compute(a.window.iter());
        kpis.requests = a.requests;
        kpis.errors = a.errors;
        kpis.local_requests = a.local;
        kpis.cost_usd = a.cost;
        kpis.baseline_usd = a.baseline;
        kpis.savings_usd = a.baseline - a.cost;
        if a.requests > 0 {
            kpis.hit_ratio = a.local as f64 / a.requests as f64;
            kpis.cpm_usd = a.cost / a.requests as f64 * 1000.0;
            kpis.baseline_cpm_usd = a.baseline / a.requests as f64 * 1000.0;
        }
        let stats = self.log.as_ref().map(|l| l.stats.clone());
        let load = |f: fn(&porteiro_telemetry::log::LogStats) -> u64| stats.as_deref().map_or(0, f);
        Snapshot {
            kpis,
            counters: a
                .counters
                .iter()
                .map(|((t, m, r), c)| (t.clone(), m.clone(), r.clone(), c.clone()))
                .collect(),
            series: a.series.iter().cloned().collect(),
            recent: a.window.iter().rev().take(RECENT).cloned().collect(),
            latency: a.latency.clone(),
            ttft: a.ttft.clone(),
            itl: a.itl.clone(),
            overhead: a.overhead.clone(),
            log_written: load(|s| s.written.load(Ordering::Relaxed)),
            log_dropped: load(|s| s.dropped.load(Ordering::Relaxed)),
            log_failed: load(|s| s.failed.load(Ordering::Relaxed)),
        }
    }

    /// The recorded gateway overheads in seconds, oldest first.
    pub fn overhead_samples(&self) -> Vec<f64> {
        self.lock().overhead_samples.iter().copied().collect()
    }

    /// Waits for queued request-log records to be written.
    pub fn flush(&self) {
        if let Some(l) = &self.log {
            l.flush();
        }
    }
}

struct TraceState {
    telemetry: Arc<Telemetry>,
    privacy: Arc<Guard>,
    rec: RequestRecord,
    t0: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<f64>,
    /// Time spent waiting on an upstream (subtracted for the gateway overhead).
    upstream_wait: Option<Duration>,
    /// The flywheel sample being assembled (`[flywheel] collect`).
    sample: Option<Sample>,
}

/// The request being served; clones share one state, recorded when the last clone drops.
#[derive(Clone)]
pub struct Trace(Arc<Mutex<TraceState>>);

impl Trace {
    pub fn new(
        telemetry: &Arc<Telemetry>,
        privacy: &Arc<Guard>,
        ctx: &RequestCtx,
        endpoint: &str,
        model: &str,
        stream: bool,
    ) -> Self {
        Trace(Arc::new(Mutex::new(TraceState {
            telemetry: telemetry.clone(),
            privacy: privacy.clone(),
            rec: RequestRecord {
                id: ctx.id.clone(),
                ts_ms: now_ms(),
                key_id: ctx.key_id.clone(),
                endpoint: endpoint.into(),
                tier: LOCAL_TIER.into(),
                model: model.into(),
                route: "-".into(),
                status: 200,
                stream,
                privacy: "none".into(),
                ..Default::default()
            },
            t0: Instant::now(),
            first: None,
            last: None,
            itl: Vec::new(),
            upstream_wait: None,
            sample: None,
        })))
    }

    fn with<R>(&self, f: impl FnOnce(&mut TraceState) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Where the answer comes from.
    pub fn served(&self, tier: &str, model: &str) {
        self.with(|s| {
            s.rec.tier = tier.into();
            s.rec.model = model.into();
        });
    }

    pub fn route(&self, route: &str) {
        self.with(|s| s.rec.route = route.into());
    }

    pub fn privacy(&self, action: Action) {
        self.with(|s| s.rec.privacy = action.as_str().into());
    }

    pub fn fallback(&self, why: &str) {
        self.with(|s| s.rec.fallback = Some(why.into()));
    }

    /// A piece of the answer reached the client.
    pub fn token(&self) {
        self.with(|s| {
            let now = Instant::now();
            match s.last {
                None => s.first = Some(now),
                Some(l) => s.itl.push((now - l).as_secs_f64()),
            }
            s.last = Some(now);
        });
    }

    pub fn usage(&self, prompt: u64, completion: u64) {
        self.with(|s| {
            s.rec.prompt_tokens = prompt;
            s.rec.completion_tokens = completion;
        });
    }

    /// Adds tokens (a local continuation of an upstream answer).
    pub fn add_usage(&self, prompt: u64, completion: u64) {
        self.with(|s| {
            s.rec.prompt_tokens += prompt;
            s.rec.completion_tokens += completion;
        });
    }

    pub fn fail(&self, status: u16, msg: &str) {
        self.with(|s| {
            s.rec.status = status;
            s.rec.error = Some(msg.chars().take(300).collect());
        });
    }

    pub fn upstream_wait(&self, d: Duration) {
        self.with(|s| *s.upstream_wait.get_or_insert(Duration::ZERO) += d);
    }

    /// Texts for the request log (kept only when `[log] store_text` is on).
    pub fn texts(&self, prompt: Option<String>, response: Option<String>) {
        self.with(|s| {
            if s.telemetry.store_text {
                if prompt.is_some() {
                    s.rec.prompt = prompt;
                }
                if response.is_some() {
                    s.rec.response = response;
                }
            }
        });
    }

    pub fn stores_text(&self) -> bool {
        self.with(|s| s.telemetry.store_text)
    }

    /// Whether this request's answer may become a flywheel sample.
    pub fn collects(&self) -> bool {
        self.with(|s| s.telemetry.collect)
    }

    /// The request a flywheel sample starts from (kept only when collecting).
    pub fn sample_request(&self, request: serde_json::Value) {
        self.with(|s| {
            if s.telemetry.collect {
                s.sample = Some(Sample {
                    request,
                    ..Default::default()
                });
            }
        });
    }

    /// The complete answer of a sample (the observer assembles it from the chunks).
    pub fn sample_answer(&self, answer: serde_json::Value, finish_reason: Option<String>) {
        self.with(|s| {
            if let Some(x) = s.sample.as_mut() {
                x.answer = answer;
                x.finish_reason = finish_reason;
            }
        });
    }
}

impl Drop for TraceState {
    fn drop(&mut self) {
        if !self.telemetry.enabled {
            return;
        }
        let total = self.t0.elapsed();
        let mut rec = std::mem::take(&mut self.rec);
        rec.latency_ms = total.as_secs_f64() * 1e3;
        rec.ttft_ms = self.first.map(|f| (f - self.t0).as_secs_f64() * 1e3);
        if rec.status == 200 && self.last.is_none() && rec.completion_tokens == 0 && rec.stream {
            // A stream that never produced anything: the client went away.
            rec.status = 499;
            rec.error
                .get_or_insert_with(|| "client disconnected".into());
        }
        // A sample is an upstream's complete answer; a local or failed one teaches nothing. Its
        // personal data is masked like the stored texts, but consistently across prompt and answer.
        if let Some(mut x) = self.sample.take() {
            if rec.tier != LOCAL_TIER
                && !rec.is_error()
                && rec.fallback.is_none()
                && !x.answer.is_null()
            {
                if rec.privacy != Action::Allow.as_str() {
                    self.privacy.redact_together(&mut x.request, &mut x.answer);
                }
                rec.sample = serde_json::to_string(&x).ok();
            }
        }
        // Stored texts keep personal data only where the privacy policy let it leave anyway.
        if rec.privacy != Action::Allow.as_str() {
            let g = &self.privacy;
            rec.prompt = rec.prompt.map(|p| g.redact(&p));
            rec.response = rec.response.map(|p| g.redact(&p));
        }
        let overhead = self
            .upstream_wait
            .map(|w| total.saturating_sub(w).as_secs_f64());
        self.telemetry.finish(rec, &self.itl, overhead);
    }
}
