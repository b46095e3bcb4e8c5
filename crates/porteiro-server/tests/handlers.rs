//! Handler-level tests without sockets: the real router (`porteiro_server::app`) driven with
//! `tower::ServiceExt::oneshot`, over a real small model (smollm2-135m) and the MiniLM encoder.
//!
//! Skipped with a message when the models are not cached, unless PORTEIRO_REQUIRE_MODELS=1.
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use porteiro_config::{Config, Overrides};
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

fn config(extra: &str) -> Config {
    let text = format!("[model]\nctx = 512\nthreads = 2\n{extra}");
    let o = Overrides {
        model: Some(MODEL.into()),
        ..Default::default()
    };
    Config::from_toml(&text, "test.toml", &o, MODEL, None).unwrap()
}

/// A state with both models loaded, or None (skip) when they are not cached.
fn start(extra: &str) -> Option<AppState> {
    let path = cached(MODEL)?;
    let epath = cached(EMBED)?;
    let cfg = config(extra);
    let st = AppState::builder(Settings::from_config(&cfg))
        .embedder(Embedder::open(&epath).unwrap())
        .build();
    let (g, _engine_thread) = load_generator(&path, &cfg).unwrap();
    st.set_generator(g);
    Some(st)
}

/// The state most tests share: one engine, many concurrent requests (which is the point).
fn shared() -> Option<AppState> {
    static S: OnceLock<Option<AppState>> = OnceLock::new();
    S.get_or_init(|| start("[server]\nmax_body_bytes = 65536\n"))
        .clone()
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// `data:` payloads of an SSE body.
    fn sse(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(str::to_string)
            .collect()
    }

    fn error(&self) -> (Option<String>, Option<String>, String) {
        let v = self.json();
        let e = &v["error"];
        assert!(e["type"].is_string(), "not an OpenAI error: {v}");
        (
            e["param"].as_str().map(String::from),
            e["code"].as_str().map(String::from),
            e["message"].as_str().unwrap_or("").to_string(),
        )
    }
}

fn request(method: &str, uri: &str, body: Option<&Value>) -> Request<Body> {
    let b = Request::builder().method(method).uri(uri);
    match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(v).unwrap()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

async fn send(st: &AppState, req: Request<Body>) -> Reply {
    let resp = app(st.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(st: &AppState, uri: &str, body: Value) -> Reply {
    send(st, request("POST", uri, Some(&body))).await
}

fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

async fn wait_until(cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "condition not reached in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn health_is_503_until_the_model_is_loaded() {
    let Some(path) = cached(MODEL) else { return };
    let cfg = config("[embeddings]\nmodel = \"\"\n");
    let st = AppState::new(Settings::from_config(&cfg));
    let r = send(&st, request("GET", "/health", None)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["status"], "loading");
    let r = post(&st, "/v1/chat/completions", chat("hi", json!({}))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    let (g, _t) = load_generator(&path, &cfg).unwrap();
    st.set_generator(g);
    let r = send(&st, request("GET", "/health", None)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ok");
    st.stop_engine();
}

#[tokio::test]
async fn models_lists_both_models_and_unknown_ids_are_404() {
    let Some(st) = shared() else { return };
    let r = send(&st, request("GET", "/v1/models", None)).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, EMBED]);
    let r = send(&st, request("GET", &format!("/v1/models/{MODEL}"), None)).await;
    assert_eq!(r.json()["object"], "model");
    let r = send(&st, request("GET", "/v1/models/gpt-4", None)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error().1.as_deref(), Some("model_not_found"));
}

#[tokio::test]
async fn chat_non_stream_reports_usage_and_length() {
    let Some(st) = shared() else { return };
    let r = post(
        &st,
        "/v1/chat/completions",
        chat(
            "Write a poem about the sea.",
            json!({"max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], MODEL);
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert!(!c["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(c["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 8);
    assert!(u["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 8)
    );
}

#[tokio::test]
async fn chat_stream_matches_non_stream_and_ends_with_usage_and_done() {
    let Some(st) = shared() else { return };
    let body = |stream: bool| {
        chat(
            "Name three colours.",
            json!({"max_tokens": 12, "temperature": 0, "stream": stream,
                   "stream_options": {"include_usage": true}}),
        )
    };
    let whole = post(&st, "/v1/chat/completions", body(false)).await.json();
    let r = post(&st, "/v1/chat/completions", body(true)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = r.sse();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, whole["choices"][0]["message"]["content"]);
    let n = chunks.len();
    assert_eq!(
        chunks[n - 2]["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    // The usage chunk: no choices, the same usage as the whole answer; earlier chunks carry null.
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"], whole["usage"]);
    assert!(chunks[0]["usage"].is_null());
}

#[tokio::test]
async fn stop_string_cuts_the_text_and_finishes_with_stop() {
    let Some(st) = shared() else { return };
    let ask = |stop: Value| {
        chat(
            "Describe a sunny day in the park.",
            json!({"max_tokens": 24, "temperature": 0, "stop": stop, "ignore_eos": true}),
        )
    };
    let free = post(&st, "/v1/chat/completions", ask(Value::Null))
        .await
        .json();
    let full = free["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // A stop string from the middle of the greedy answer.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 6, "{full:?}");
    let stop = format!(" {}", words[4]);
    let cut = &full[..full.find(&stop).unwrap()];
    for s in [json!(stop), json!(["zzzz-never", stop])] {
        let v = post(&st, "/v1/chat/completions", ask(s)).await.json();
        assert_eq!(v["choices"][0]["message"]["content"], cut);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test]
async fn same_seed_same_sample() {
    let Some(st) = shared() else { return };
    let ask = |seed: u64| {
        chat(
            "Invent a name for a cat.",
            json!({"max_tokens": 16, "temperature": 1.0, "seed": seed, "ignore_eos": true}),
        )
    };
    let text = |v: Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a = text(post(&st, "/v1/chat/completions", ask(7)).await.json());
    let b = text(post(&st, "/v1/chat/completions", ask(7)).await.json());
    let c = text(post(&st, "/v1/chat/completions", ask(8)).await.json());
    assert_eq!(a, b);
    assert_ne!(a, c, "different seeds gave the same 16 sampled tokens");
}

#[tokio::test]
async fn chat_logprobs_list_each_token_with_alternatives() {
    let Some(st) = shared() else { return };
    let v = post(
        &st,
        "/v1/chat/completions",
        chat(
            "Hello!",
            json!({"max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 3, "ignore_eos": true}),
        ),
    )
    .await
    .json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    let mut joined = String::new();
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], t["token"]);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        joined.push_str(t["token"].as_str().unwrap());
    }
    assert_eq!(joined, v["choices"][0]["message"]["content"]);
}

#[tokio::test]
async fn completions_text_stream_and_echo() {
    let Some(st) = shared() else { return };
    let body = |extra: Value| {
        let mut v = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                           "temperature": 0, "ignore_eos": true});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let v = post(&st, "/v1/completions", body(json!({}))).await.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let r = post(&st, "/v1/completions", body(json!({"stream": true}))).await;
    let data = r.sse();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(streamed, text);
    let e = post(&st, "/v1/completions", body(json!({"echo": true})))
        .await
        .json();
    assert_eq!(
        e["choices"][0]["text"].as_str().unwrap(),
        format!("The capital of France is{text}")
    );
    let l = post(&st, "/v1/completions", body(json!({"logprobs": 2})))
        .await
        .json();
    let lp = &l["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
}

fn decode_base64(s: &str) -> Vec<f32> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 {c}"),
    };
    let mut bytes = Vec::new();
    for q in s.as_bytes().chunks(4) {
        let n = q
            .iter()
            .take_while(|&&c| c != b'=')
            .fold(0u32, |acc, &c| (acc << 6) | u32::from(val(c)));
        let k = q.iter().take_while(|&&c| c != b'=').count();
        let n = n << (6 * (4 - k));
        bytes.extend_from_slice(&n.to_be_bytes()[1..k]);
    }
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[tokio::test]
async fn embeddings_float_and_base64_agree() {
    let Some(st) = shared() else { return };
    let input = json!([
        "The cat sat on the mat.",
        "A kitten rests on a rug.",
        "Stock prices fell."
    ]);
    let f = post(
        &st,
        "/v1/embeddings",
        json!({"model": EMBED, "input": input}),
    )
    .await;
    assert_eq!(f.status, StatusCode::OK);
    let f = f.json();
    assert_eq!(f["object"], "list");
    assert_eq!(f["model"], EMBED);
    let vecs: Vec<Vec<f32>> = f["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["object"], "embedding");
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    assert_eq!(vecs.len(), 3);
    assert!(vecs.iter().all(|v| v.len() == 384));
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(cos(&vecs[0], &vecs[1]) > cos(&vecs[0], &vecs[2]));
    assert!(f["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let b = post(
        &st,
        "/v1/embeddings",
        json!({"model": EMBED, "input": input, "encoding_format": "base64"}),
    )
    .await
    .json();
    for (i, v) in vecs.iter().enumerate() {
        let d = decode_base64(b["data"][i]["embedding"].as_str().unwrap());
        assert_eq!(&d, v);
    }
}

#[tokio::test]
async fn invalid_requests_get_openai_errors_naming_the_parameter() {
    let Some(st) = shared() else { return };
    let cases: Vec<(Value, &str)> = vec![
        (chat("x", json!({"temperature": "hot"})), "temperature"),
        (chat("x", json!({"temperature": 3})), "temperature"),
        (chat("x", json!({"n": 2})), "n"),
        (chat("x", json!({"top_p": 0})), "top_p"),
        (chat("x", json!({"max_tokens": 0})), "max_tokens"),
        (
            chat("x", json!({"max_completion_tokens": -1})),
            "max_completion_tokens",
        ),
        (
            chat("x", json!({"presence_penalty": 5})),
            "presence_penalty",
        ),
        (chat("x", json!({"stop": 3})), "stop"),
        (chat("x", json!({"top_logprobs": 2})), "top_logprobs"),
        (chat("x", json!({"tools": []})), "tools"),
        (
            chat("x", json!({"response_format": {"type": "xml"}})),
            "response_format.type",
        ),
        (
            chat(
                "x",
                json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (json!({"model": MODEL, "messages": []}), "messages"),
        (
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": MODEL, "messages": [{"content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": EMBED, "messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
    ];
    for (body, param) in cases {
        let r = post(&st, "/v1/chat/completions", body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            r.error().0.as_deref(),
            Some(param),
            "{body}: {:?}",
            r.error()
        );
    }
    let r = send(
        &st,
        Request::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .body(Body::from("{\"model\": "))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().1.as_deref(), Some("invalid_json"));
    for (body, param) in [
        (
            json!({"model": EMBED, "input": "x", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"model": EMBED, "input": ""}), "input[0]"),
        (
            json!({"model": EMBED, "input": "x", "dimensions": 12}),
            "dimensions",
        ),
        (json!({"model": MODEL, "input": "x"}), "model"),
    ] {
        let r = post(&st, "/v1/embeddings", body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.error().0.as_deref(), Some(param), "{body}");
    }
    let r = post(
        &st,
        "/v1/completions",
        json!({"model": MODEL, "prompt": ["a", "b"]}),
    )
    .await;
    assert_eq!(r.error().0.as_deref(), Some("prompt"));
}

#[tokio::test]
async fn unknown_model_404_context_overflow_400_and_oversized_body_413() {
    let Some(st) = shared() else { return };
    let mut body = chat("x", json!({}));
    body["model"] = json!("gpt-4o");
    let r = post(&st, "/v1/chat/completions", body).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error().1.as_deref(), Some("model_not_found"));
    let r = post(
        &st,
        "/v1/embeddings",
        json!({"model": "text-embedding-3-small", "input": "x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = post(
        &st,
        "/v1/chat/completions",
        chat("Hello", json!({"max_tokens": 1000})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let (param, code, msg) = r.error();
    assert_eq!(code.as_deref(), Some("context_length_exceeded"));
    assert_eq!(param.as_deref(), Some("messages"));
    assert!(
        msg.contains("maximum context length is 512 tokens"),
        "{msg}"
    );
    assert!(msg.contains("1000 in the completion"), "{msg}");
    let long = "word ".repeat(600);
    let r = post(&st, "/v1/chat/completions", chat(&long, json!({}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().2.contains("in the messages"));

    // max_body_bytes = 65536 for the shared state.
    let huge = "x".repeat(70_000);
    let r = post(&st, "/v1/chat/completions", chat(&huge, json!({}))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error().1.as_deref(), Some("request_too_large"));

    let r = send(&st, request("GET", "/v1/nothing", None)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    r.error();
    let r = send(&st, request("GET", "/v1/chat/completions", None)).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    r.error();
}

#[tokio::test]
async fn api_keys_are_required_on_v1_when_configured() {
    let Some(st) = start("[server]\napi_keys = [\"sk-right\"]\n[embeddings]\nmodel = \"\"\n")
    else {
        return;
    };
    let with = |key: Option<&str>| {
        let mut b = Request::builder().method("GET").uri("/v1/models");
        if let Some(k) = key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        b.body(Body::empty()).unwrap()
    };
    let r = send(&st, with(None)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error().1.as_deref(), Some("invalid_api_key"));
    assert_eq!(
        send(&st, with(Some("sk-wrong"))).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&st, with(Some("sk-right"))).await.status,
        StatusCode::OK
    );
    // Health and metrics stay open for probes.
    assert_eq!(
        send(&st, request("GET", "/health", None)).await.status,
        StatusCode::OK
    );
    st.stop_engine();
}

#[tokio::test]
async fn full_queue_gets_429_with_retry_after() {
    let Some(st) = start("[limits]\nmax_seqs = 1\nmax_queue = 0\n[embeddings]\nmodel = \"\"\n")
    else {
        return;
    };
    let long = chat(
        "Tell me a long story.",
        json!({"max_tokens": 400, "stream": true, "ignore_eos": true}),
    );
    let resp = app(st.clone())
        .oneshot(request("POST", "/v1/chat/completions", Some(&long)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The first chunk: the long request holds the only slot.
    body.frame().await.unwrap().unwrap();
    let r = post(
        &st,
        "/v1/chat/completions",
        chat("hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error().1.as_deref(), Some("rate_limit_exceeded"));
    let ra: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&ra));
    drop(body);
    // Once the first client is gone, the slot is free again.
    let g = st.generator().unwrap();
    wait_until(|| g.engine.stats().running.load(Ordering::Relaxed) == 0).await;
    let r = post(
        &st,
        "/v1/chat/completions",
        chat("hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let m = String::from_utf8(send(&st, request("GET", "/metrics", None)).await.body).unwrap();
    assert!(m.contains("porteiro_rejected_requests_total 1"), "{m}");
    st.stop_engine();
}

#[tokio::test]
async fn client_disconnect_mid_stream_frees_the_sequence() {
    let Some(st) = start("[embeddings]\nmodel = \"\"\n") else {
        return;
    };
    let long = chat(
        "Count from one to five hundred.",
        json!({"max_tokens": 400, "stream": true, "ignore_eos": true}),
    );
    let resp = app(st.clone())
        .oneshot(request("POST", "/v1/chat/completions", Some(&long)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    let stats = st.generator().unwrap().engine.stats();
    assert_eq!(stats.running.load(Ordering::Relaxed), 1);
    assert!(stats.kv_bytes.load(Ordering::Relaxed) > 0);
    drop(body);
    let t0 = Instant::now();
    wait_until(|| {
        stats.running.load(Ordering::Relaxed) == 0 && stats.kv_bytes.load(Ordering::Relaxed) == 0
    })
    .await;
    eprintln!("sequence freed {:?} after the disconnect", t0.elapsed());
    assert_eq!(stats.cancelled.load(Ordering::Relaxed), 1);
    assert!(stats.completion_tokens.load(Ordering::Relaxed) < 400);
    st.stop_engine();
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_latency() {
    let Some(st) = start("[embeddings]\nmodel = \"\"\n") else {
        return;
    };
    let r = post(
        &st,
        "/v1/chat/completions",
        chat("Hi", json!({"max_tokens": 3, "ignore_eos": true})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // Done reaches the client just before the engine sweeps the finished sequence.
    let stats = st.generator().unwrap().engine.stats();
    wait_until(|| stats.running.load(Ordering::Relaxed) == 0).await;
    let r = send(&st, request("GET", "/metrics", None)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = String::from_utf8(r.body).unwrap();
    for want in [
        "porteiro_ready 1",
        "porteiro_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
        "porteiro_time_to_first_token_seconds_count{endpoint=\"chat\"} 1",
        "porteiro_generation_duration_seconds_count{endpoint=\"chat\"} 1",
        "porteiro_completion_tokens_total 3",
        "porteiro_running_sequences 0",
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }
    st.stop_engine();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_after_the_grace_period_cancels_streams_with_an_error_event() {
    use std::io::{Read, Write};
    let Some(st) = start("[embeddings]\nmodel = \"\"\n") else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(porteiro_server::serve(
        listener,
        st.clone(),
        async {
            let _ = stop_rx.await;
        },
        Duration::from_millis(200),
    ));
    let body = serde_json::to_string(&chat(
        "Count to a thousand.",
        json!({"max_tokens": 400, "stream": true, "ignore_eos": true}),
    ))
    .unwrap();
    let client = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            c,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    });
    let stats = st.generator().unwrap().engine.stats();
    wait_until(|| stats.completion_tokens.load(Ordering::Relaxed) > 2).await;
    let t0 = Instant::now();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returned within the grace period + 2 s")
        .unwrap()
        .unwrap();
    let text = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("shutting down") && text.contains("data: [DONE]"),
        "{text}"
    );
    // The engine has stopped: new work is refused ...
    let r = post(
        &st,
        "/v1/chat/completions",
        chat("hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // ... and the server is no longer ready.
    let g = st.generator().unwrap();
    wait_until(|| !g.engine.is_running()).await;
    let r = send(&st, request("GET", "/health", None)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
}
