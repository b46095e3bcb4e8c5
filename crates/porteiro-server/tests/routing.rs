//! Routing and upstream behaviour over real HTTP on loopback: the Porteiro under test (driven through
//! `app` with a real small model and the MiniLM encoder) escalates to
//! - a second Porteiro instance (a real OpenAI-compatible upstream), and
//! - a scripted fault upstream that answers 500/429, hangs, or cuts a stream after N chunks,
//!
//! checking retries, the circuit breaker opening and closing, fallbacks to the local tier, and the
//! continuation of a broken stream. Skipped when the models are not cached (unless
//! PORTEIRO_REQUIRE_MODELS=1).
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use porteiro_config::{Config, Overrides};
use porteiro_server::Routing;
use porteiro_server::{app, load_generator, AppState, Embedder, Settings};
use serde_json::{json, Value};
use tower::ServiceExt;

const MODEL: &str = "smollm2-135m";
const EMBED: &str = "minilm-l6";

fn cached(alias: &str) -> Option<PathBuf> {
    match porteiro_models::fetch::resolve_model(alias, false) {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(
                std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
                "{alias} required but not cached: {e}"
            );
            eprintln!("skipping: {alias} not cached: {e}");
            None
        }
    }
}

/// What the fault upstream does with the next requests.
#[derive(Clone, Debug)]
enum Mode {
    Ok,
    /// Answer this status (with `Retry-After: 0` for 429) to the next `n` requests, then Ok.
    Status(u16, usize),
    /// Never answer.
    Hang,
    /// Stream this many content chunks, then drop the connection (no finish, no [DONE]).
    Cut(usize),
}

#[derive(Clone)]
struct Fault {
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicUsize>,
    /// The last request body received.
    last: Arc<Mutex<Value>>,
}

async fn fault_handler(State(f): State<Fault>, body: axum::Json<Value>) -> Response {
    f.hits.fetch_add(1, Ordering::SeqCst);
    *f.last.lock().unwrap() = body.0.clone();
    let mode = {
        let mut m = f.mode.lock().unwrap();
        let now = m.clone();
        if let Mode::Status(code, n) = now {
            *m = if n > 1 {
                Mode::Status(code, n - 1)
            } else {
                Mode::Ok
            };
        }
        now
    };
    let stream = body.0["stream"].as_bool().unwrap_or(false);
    let chunk = |text: &str, finish: Option<&str>| {
        json!({"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1, "model": "fault-model",
               "service_tier": "flex",
               "choices": [{"index": 0, "delta": {"content": text, "x_note": "n"}, "finish_reason": finish}]})
    };
    match mode {
        Mode::Status(code, _) => {
            let mut r = (
                StatusCode::from_u16(code).unwrap(),
                axum::Json(json!({"error": {"message": "scripted failure", "type": "server_error"}})),
            )
                .into_response();
            if code == 429 {
                r.headers_mut().insert("retry-after", "0".parse().unwrap());
            }
            r
        }
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Mode::Ok if !stream => axum::Json(json!({
            "id": "chatcmpl-fault", "object": "chat.completion", "created": 1, "model": "fault-model",
            "service_tier": "flex", "system_fingerprint": "fp_fault",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "UPSTREAM ANSWER", "annotations": [{"type": "x"}]}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        }))
        .into_response(),
        Mode::Ok | Mode::Cut(_) => {
            let n = if let Mode::Cut(n) = mode { n } else { 2 };
            let mut events: Vec<Result<String, std::io::Error>> = (0..n)
                .map(|i| Ok(format!("data: {}\n\n", chunk(&format!("up{i} "), None))))
                .collect();
            if matches!(mode, Mode::Cut(_)) {
                events.push(Err(std::io::Error::other("connection cut")));
            } else {
                events.push(Ok(format!("data: {}\n\n", chunk("", Some("stop")))));
                events.push(Ok("data: [DONE]\n\n".to_string()));
            }
            // Paced, so every chunk is flushed before the connection is cut.
            let paced = futures_util::stream::iter(events).then(|e| async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                e
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Body::from_stream(paced))
                .unwrap()
        }
    }
}

async fn spawn_fault() -> (String, Fault) {
    let f = Fault {
        mode: Arc::new(Mutex::new(Mode::Ok)),
        hits: Arc::new(AtomicUsize::new(0)),
        last: Arc::new(Mutex::new(Value::Null)),
    };
    let router = axum::Router::new()
        .route("/v1/chat/completions", post(fault_handler))
        .with_state(f.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await });
    (format!("http://{addr}/v1"), f)
}

fn load(cfg: &Config, with_routing: bool) -> AppState {
    let path = cached(MODEL).unwrap();
    let mut b = AppState::builder(Settings::from_config(cfg));
    if with_routing {
        let e = Embedder::open(&cached(EMBED).unwrap()).unwrap();
        let router = porteiro_router::Router::new(cfg, e.encoder.clone()).unwrap();
        let upstreams = cfg
            .upstreams
            .iter()
            .map(|u| Arc::new(porteiro_upstream::UpstreamClient::new(u.clone()).unwrap()))
            .collect();
        b = b
            .embedder(e)
            .routing(Routing::new(cfg.router.clone(), Some(router), upstreams));
    }
    let st = b.build();
    let (g, _t) = load_generator(&path, cfg).unwrap();
    st.set_generator(g);
    st
}

fn config(text: &str) -> Config {
    let o = Overrides {
        model: Some(MODEL.into()),
        ..Default::default()
    };
    Config::from_toml(
        &format!("[model]\nctx = 1024\nthreads = 1\n{text}"),
        "test.toml",
        &o,
        MODEL,
        None,
    )
    .unwrap()
}

/// A second Porteiro serving the same small model on loopback.
async fn spawn_peer() -> String {
    let st = load(&config("[embeddings]\nmodel = \"\"\n"), false);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app(st)).await });
    format!("http://{addr}/v1")
}

fn routing_config(fault: &str, peer: &str, mid_stream: &str) -> Config {
    config(&format!(
        r#"
[router]
mid_stream = "{mid_stream}"
similarity_floor = 0.4

[[upstreams]]
name = "peer"
base_url = "{peer}"
model = "{MODEL}"
price_in_per_m = 0.5
price_out_per_m = 1.5

[[upstreams]]
name = "fault"
base_url = "{fault}"
model = "fault-model"
timeout_s = 2
retries = 2
breaker_failures = 3
breaker_cooldown_s = 1

[[routes]]
name = "json"
tier = "local"
examples = ["format this as JSON", "convert this record to JSON", "extract the fields as JSON"]

[[routes]]
name = "proof"
tier = "peer"
examples = ["prove that there are infinitely many primes", "give a rigorous proof of this theorem", "prove that the square root of two is irrational"]
"#
    ))
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
    elapsed: Duration,
}

impl Reply {
    fn h(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn sse(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(str::to_string)
            .collect()
    }
    /// Concatenated delta content of a chat stream.
    fn streamed_text(&self) -> String {
        self.sse()
            .iter()
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    }
}

async fn chat(st: &AppState, model: &str, content: &str, stream: bool) -> Reply {
    let body = json!({"model": model, "messages": [{"role": "user", "content": content}],
                      "max_tokens": 8, "temperature": 0, "stream": stream});
    send(st, &body).await
}

async fn send(st: &AppState, body: &Value) -> Reply {
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let t0 = Instant::now();
    let resp = app(st.clone()).oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        elapsed: t0.elapsed(),
    }
}

fn set(f: &Fault, m: Mode) {
    *f.mode.lock().unwrap() = m;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_retries_breaker_and_fallbacks() {
    if cached(MODEL).is_none() || cached(EMBED).is_none() {
        return;
    }
    let (fault_url, fault) = spawn_fault().await;
    let peer = spawn_peer().await;
    let st = load(&routing_config(&fault_url, &peer, "continue"), true);

    // Routing by example: a formatting request stays local, a proof goes to the peer Porteiro.
    let r = chat(
        &st,
        "auto",
        "Please format this as JSON: name Ana, age 31",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (r.h("x-porteiro-tier"), r.h("x-porteiro-route")),
        ("local", "json")
    );
    assert!(r.h("x-porteiro-score").parse::<f32>().unwrap() >= 0.5);
    assert_eq!(r.json()["model"], MODEL);
    let r = chat(
        &st,
        "auto",
        "Prove that there are infinitely many prime numbers.",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (r.h("x-porteiro-tier"), r.h("x-porteiro-route")),
        ("peer", "proof"),
        "score {}",
        r.h("x-porteiro-score")
    );
    assert!(!r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    // Streaming pass-through from the peer.
    let r = chat(
        &st,
        "auto",
        "Prove that the square root of 2 is irrational.",
        true,
    )
    .await;
    assert_eq!(r.h("x-porteiro-tier"), "peer");
    assert_eq!(
        r.sse().last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.body
    );

    // Retries: two 500s, then success on the third attempt.
    set(&fault, Mode::Status(500, 2));
    let before = fault.hits.load(Ordering::SeqCst);
    let r = chat(&st, "fault", "hello", false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.h("x-porteiro-tier"), "fault");
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "UPSTREAM ANSWER"
    );
    assert_eq!(fault.hits.load(Ordering::SeqCst) - before, 3);
    // 429 with Retry-After: 0 is retried too.
    set(&fault, Mode::Status(429, 1));
    let r = chat(&st, "fault", "hello", false).await;
    assert_eq!(r.h("x-porteiro-tier"), "fault", "{}", r.body);

    // Down before the first token: the local tier answers, marked as a fallback. Three failed
    // attempts (1 + 2 retries) open the breaker ...
    set(&fault, Mode::Status(503, 1000));
    let r = chat(&st, "fault", "hello", false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (r.h("x-porteiro-tier"), r.h("x-porteiro-fallback")),
        ("local", "status")
    );
    // ... so the next request does not reach the upstream at all.
    let hits = fault.hits.load(Ordering::SeqCst);
    let r = chat(&st, "fault", "hello", true).await;
    assert_eq!(
        (r.h("x-porteiro-tier"), r.h("x-porteiro-fallback")),
        ("local", "breaker_open")
    );
    assert_eq!(r.sse().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(fault.hits.load(Ordering::SeqCst), hits);
    // After the cooldown one trial goes through; its success closes the breaker.
    set(&fault, Mode::Ok);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = chat(&st, "fault", "hello", false).await;
    assert_eq!(r.h("x-porteiro-tier"), "fault", "{}", r.body);
    assert_eq!(fault.hits.load(Ordering::SeqCst), hits + 1);
    let r = chat(&st, "fault", "hello", false).await;
    assert_eq!(r.h("x-porteiro-tier"), "fault");

    // A hanging upstream times out (2 s per attempt) and the local tier answers.
    set(&fault, Mode::Hang);
    let r = chat(&st, "fault", "hello", false).await;
    assert_eq!(
        (r.h("x-porteiro-tier"), r.h("x-porteiro-fallback")),
        ("local", "timeout")
    );
    assert!(r.elapsed < Duration::from_secs(15), "{:?}", r.elapsed);
    // Let the breaker close again.
    set(&fault, Mode::Ok);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        chat(&st, "fault", "hello", false)
            .await
            .h("x-porteiro-tier"),
        "fault"
    );

    // A stream cut after 2 chunks is continued by the local model: the client sees the upstream's
    // text, then more text, then a finish reason and [DONE] — no error, no silent truncation.
    set(&fault, Mode::Cut(2));
    let done = |m: &str| -> f64 {
        let key = "porteiro_generation_duration_seconds_count{endpoint=\"chat\"} ";
        m.lines()
            .find_map(|l| l.strip_prefix(key))
            .map_or(0.0, |v| v.parse().unwrap())
    };
    let generations = done(&metrics(&st).await);
    let r = chat(&st, "fault", "Count from one to ten.", true).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.h("x-porteiro-tier"), "fault");
    let text = r.streamed_text();
    assert!(text.starts_with("up0 up1 "), "{text}");
    assert!(text.len() > "up0 up1 ".len(), "no continuation: {}", r.body);
    let events = r.sse();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(!r.body.contains("\"error\""), "{}", r.body);
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    // The continued answer is reported done once, like every other answer.
    assert_eq!(done(&metrics(&st).await), generations + 1.0);

    // The metrics saw it all.
    let m = metrics(&st).await;
    assert!(
        m.contains("porteiro_fallbacks_total{upstream=\"fault\",when=\"mid_stream\"} 1"),
        "{m}"
    );
    assert!(m.contains("porteiro_fallbacks_total{upstream=\"fault\",when=\"before_first_token\"}"));
    assert!(m.contains(
        "porteiro_router_decisions_total{wanted=\"peer\",served=\"peer\",route=\"proof\"}"
    ));
    assert!(m.contains("porteiro_upstream_failures_total{upstream=\"fault\",kind=\"timeout\"}"));
}

async fn metrics(st: &AppState) -> String {
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = app(st.clone()).oneshot(req).await.unwrap();
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_porteiro_does_not_model_pass_through_both_ways() {
    if cached(MODEL).is_none() || cached(EMBED).is_none() {
        return;
    }
    let (fault_url, fault) = spawn_fault().await;
    let st = load(&routing_config(&fault_url, &fault_url, "continue"), true);
    // Request side: unknown OpenAI fields reach the upstream as sent; local-only ones do not.
    let body = json!({"model": "fault", "messages": [{"role": "user", "content": "hi"}],
                      "metadata": {"run": "7"}, "prediction": {"type": "content", "content": "x"},
                      "top_k": 5});
    let r = send(&st, &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let sent = fault.last.lock().unwrap().clone();
    assert_eq!(sent["metadata"]["run"], "7", "{sent}");
    assert_eq!(sent["prediction"]["content"], "x", "{sent}");
    assert!(sent.get("top_k").is_none(), "{sent}");
    assert_eq!(sent["model"], "fault-model");
    // Answer side, JSON: unknown fields at the top, the choice and the message come back.
    let v = r.json();
    assert_eq!(v["service_tier"], "flex", "{v}");
    assert_eq!(v["system_fingerprint"], "fp_fault", "{v}");
    assert_eq!(
        v["choices"][0]["message"]["annotations"][0]["type"], "x",
        "{v}"
    );
    assert_eq!(v["choices"][0]["message"]["content"], "UPSTREAM ANSWER");
    assert_eq!(
        (v["id"].as_str(), v["model"].as_str()),
        (Some("chatcmpl-fault"), Some("fault-model"))
    );
    assert_eq!(v["usage"]["total_tokens"], 5);
    // ... and streamed.
    let mut body = body;
    body["stream"] = true.into();
    let r = send(&st, &body).await;
    let first: Value = serde_json::from_str(&r.sse()[0]).unwrap();
    assert_eq!(first["service_tier"], "flex", "{first}");
    assert_eq!(first["choices"][0]["delta"]["x_note"], "n", "{first}");
    assert_eq!(first["id"], "chatcmpl-fault");
    assert_eq!(r.streamed_text(), "up0 up1 ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_stream_can_end_with_an_error_event_instead() {
    if cached(MODEL).is_none() || cached(EMBED).is_none() {
        return;
    }
    let (fault_url, fault) = spawn_fault().await;
    // The peer is never called here: point it at the fault upstream.
    let st = load(&routing_config(&fault_url, &fault_url, "error"), true);
    set(&fault, Mode::Cut(1));
    let r = chat(&st, "fault", "hello", true).await;
    let events = r.sse();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("broke off")),
        "{}",
        r.body
    );
    // Unknown models are still 404, and /v1/models lists the routed names.
    assert_eq!(
        chat(&st, "nope", "hi", false).await.status,
        StatusCode::NOT_FOUND
    );
    let req = Request::builder()
        .uri("/v1/models")
        .body(Body::empty())
        .unwrap();
    let resp = app(st.clone()).oneshot(req).await.unwrap();
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"auto") && ids.contains(&"fault") && ids.contains(&"peer"),
        "{ids:?}"
    );
}
