//! `porteiro report` (KPIs of a period from the request log, as HTML and Markdown) and
//! `porteiro gateway-bench` (the gateway's own overhead under load, against an instant upstream).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use porteiro_config::{Config, Overrides};
use porteiro_telemetry::kpi::quantile;
use porteiro_telemetry::log::{RequestLog, Sealer};

#[derive(Args)]
pub struct ReportArgs {
    /// Period to cover, ending now: 30m, 24h, 7d …
    #[arg(long, default_value = "24h")]
    since: String,
    /// The request log (default: `[log] path` from --config, else $PORTEIRO_HOME/requests.db).
    #[arg(long)]
    db: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTML output; the Markdown goes next to it with a .md extension.
    #[arg(short, long, default_value = "porteiro-report.html")]
    output: PathBuf,
}

/// "90s", "30m", "24h", "7d" → duration.
pub fn parse_period(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a period like 30m, 24h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" | "" => n * 3600.0,
        "d" => n * 86400.0,
        _ => bail!("`{s}`: the unit must be s, m, h or d"),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub fn report(a: &ReportArgs) -> Result<()> {
    let db = match &a.db {
        Some(p) => p.clone(),
        None => {
            let cfg = Config::load(
                a.config.as_deref(),
                &Overrides::default(),
                crate::DEFAULT_MODEL,
            )?;
            crate::serve::request_log_path(&cfg)
                .context("the request log is off in this configuration ([log] path = \"\")")?
        }
    };
    if !db.exists() {
        bail!("{} does not exist (no requests logged yet?)", db.display());
    }
    let period = parse_period(&a.since)?;
    let log = RequestLog::open(&db)?;
    let since = porteiro_telemetry::now_ms() - period.as_millis() as i64;
    let recs = log.since(since, None::<&Sealer>)?;
    let label = format!("last {}", a.since);
    let html = porteiro_telemetry::report::html(&recs, &label);
    let md = porteiro_telemetry::report::markdown(&recs, &label);
    std::fs::write(&a.output, html).with_context(|| format!("writing {}", a.output.display()))?;
    let md_path = a.output.with_extension("md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    print!("{md}");
    eprintln!(
        "report: {} and {} ({} requests)",
        a.output.display(),
        md_path.display(),
        recs.len()
    );
    Ok(())
}

#[derive(Args)]
pub struct GatewayBenchArgs {
    /// Requests per second (open loop: sent on schedule, whatever the answers do).
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Stream the answers (SSE) instead of JSON.
    #[arg(long)]
    stream: bool,
}

fn q3(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    let f = |q| quantile(v, q).map_or("–".into(), |x: f64| format!("{:.3}", x * 1e3));
    format!("{} / {} / {}", f(0.5), f(0.95), f(0.99))
}

/// Fires `n` requests at `rate`/s at `url`; returns latencies in seconds and the error count.
async fn load(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    rate: u32,
    n: usize,
) -> (Vec<f64>, usize) {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        let (c, url, body) = (client.clone(), url.to_string(), body.to_string());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = match c
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            (t.elapsed().as_secs_f64(), ok)
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok((l, true)) => lat.push(l),
            _ => errors += 1,
        }
    }
    (lat, errors)
}

pub fn gateway_bench(a: &GatewayBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(gateway_bench_async(a))
}

async fn gateway_bench_async(a: &GatewayBenchArgs) -> Result<()> {
    use axum::routing::post;
    // The instant upstream: a fixed answer, JSON or a 3-chunk stream.
    let upstream = axum::Router::new().route(
        "/v1/chat/completions",
        post(|body: axum::Json<serde_json::Value>| async move {
            let base = serde_json::json!({"id": "x", "created": 1, "model": "instant"});
            if body["stream"].as_bool().unwrap_or(false) {
                let mut s = String::new();
                for piece in ["Hello", ", ", "world"] {
                    s += &format!("data: {}\n\n", serde_json::json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "instant", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]}));
                }
                s += &format!("data: {}\n\n", serde_json::json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "instant", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}));
                s += "data: [DONE]\n\n";
                ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], s).into_response()
            } else {
                let mut v = base;
                v["object"] = "chat.completion".into();
                v["choices"] = serde_json::json!([{"index": 0, "message": {"role": "assistant", "content": "Hello, world"}, "finish_reason": "stop"}]);
                v["usage"] = serde_json::json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15});
                axum::Json(v).into_response()
            }
        }),
    );
    use axum::response::IntoResponse;
    let ul = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let up_addr = ul.local_addr()?;
    tokio::spawn(async move { axum::serve(ul, upstream).await });

    let dir = tempfile::tempdir()?;
    let db = dir.path().join("requests.db");
    let toml = format!(
        "[embeddings]\nmodel = \"\"\n[privacy]\npolicy = \"mask\"\n[log]\npath = \"{}\"\n\
         [[upstreams]]\nname = \"instant\"\nbase_url = \"http://{up_addr}/v1\"\nmodel = \"instant-model\"\n\
         price_in_per_m = 0.15\nprice_out_per_m = 0.6\nretries = 0\n",
        db.display()
    );
    let cfg = Config::from_toml(
        &toml,
        "gateway-bench",
        &Overrides::default(),
        crate::DEFAULT_MODEL,
        None,
    )?;
    let upstreams = cfg
        .upstreams
        .iter()
        .map(|u| porteiro_upstream::UpstreamClient::new(u.clone()).map(Arc::new))
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    let state = porteiro_server::AppState::builder(porteiro_server::Settings::from_config(&cfg))
        .privacy(crate::serve::privacy_guard(&cfg)?)
        .telemetry(crate::serve::telemetry(&cfg)?)
        .routing(porteiro_server::Routing::new(
            cfg.router.clone(),
            None,
            upstreams,
        ))
        .build();
    let gl = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw_addr = gl.local_addr()?;
    let st = state.clone();
    tokio::spawn(async move { axum::serve(gl, porteiro_server::app(st)).await });

    let n = (a.rate * a.seconds) as usize;
    let body = serde_json::json!({"model": "instant", "stream": a.stream, "messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Summarise: the quarterly report shows revenue up 4% and costs flat; reply to ana@example.com."}
    ]})
    .to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    // Warm up both paths (connections, allocations).
    let direct = format!("http://{up_addr}/v1/chat/completions");
    let via = format!("http://{gw_addr}/v1/chat/completions");
    load(&client, &direct, &body, a.rate, (a.rate / 5) as usize).await;
    load(&client, &via, &body, a.rate, (a.rate / 5) as usize).await;
    let before = state.telemetry.overhead_samples().len();
    eprintln!(
        "gateway-bench: {n} requests at {}/s, {}, first directly to the instant upstream, then through Porteiro (privacy mask + request log on)",
        a.rate,
        if a.stream { "SSE" } else { "JSON" }
    );
    let (mut d_lat, d_err) = load(&client, &direct, &body, a.rate, n).await;
    let (mut g_lat, g_err) = load(&client, &via, &body, a.rate, n).await;
    let t = &state.telemetry;
    t.flush();
    let mut over: Vec<f64> = t.overhead_samples().split_off(before);
    let snap = t.snapshot();
    println!("| path | requests | errors | client latency p50 / p95 / p99 (ms) |");
    println!("|---|---|---|---|");
    println!(
        "| instant upstream, direct | {n} | {d_err} | {} |",
        q3(&mut d_lat)
    );
    println!("| through Porteiro | {n} | {g_err} | {} |", q3(&mut g_lat));
    println!(
        "\ngateway overhead measured in Porteiro (handler time minus time waiting on the upstream), {} requests: p50 / p95 / p99 = {} ms",
        over.len(),
        q3(&mut over)
    );
    println!(
        "request log: {} written, {} dropped, {} failed",
        snap.log_written, snap.log_dropped, snap.log_failed
    );
    Ok(())
}
