//! LoRA adapters served by name over a real model (smollm2-135m): an adapter answers as its own
//! model, one whose B is zero answers exactly like the base, adapters load and unload at run time
//! through the admin endpoints (which need the admin key, and are off without one), bad files are
//! refused naming what is wrong, and an adapter that would not fit the KV budget is refused.
//!
//! Skipped with a message when the model is not cached, unless PORTEIRO_REQUIRE_MODELS=1.
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use porteiro_config::{Config, Overrides};
use porteiro_engine::lora::{Adapter, LoraPair, Proj};
use porteiro_server::{app, load_generator, AppState, Settings};
use serde_json::{json, Value};
use tower::ServiceExt;

const MODEL: &str = "smollm2-135m";
const ADMIN: &str = "adm-key-1";

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

/// A small KV budget (12 MiB, context 256), so that adapter memory matters.
fn start(admin: Option<&str>) -> Option<AppState> {
    let path = cached(MODEL)?;
    let o = Overrides {
        model: Some(MODEL.into()),
        ..Default::default()
    };
    let cfg = Config::from_toml(
        "[model]\nctx = 256\nthreads = 2\n[embeddings]\nmodel = \"\"\n[limits]\nkv_cache_mib = 12\n",
        "test.toml",
        &o,
        MODEL,
        None,
    )
    .unwrap();
    let mut settings = Settings::from_config(&cfg);
    settings.admin_key = admin.map(str::to_string);
    let st = AppState::new(settings);
    let (g, _t) = load_generator(&path, &cfg).unwrap();
    st.set_generator(g);
    Some(st)
}

/// Writes an adapter of rank `r` on `projs` of every layer; B is zero when `amp` is 0.
fn write_adapter(
    st: &AppState,
    dir: &Path,
    name: &str,
    r: usize,
    projs: &[Proj],
    amp: f32,
) -> PathBuf {
    let c = &st.generator().unwrap().model_cfg;
    let path = dir.join(format!("{name}.gguf"));
    Adapter::random(c, r, projs, 5.0 * amp, r as f32, 7)
        .write(&path, c.arch.name())
        .unwrap();
    path
}

struct Reply {
    status: StatusCode,
    body: Value,
}

async fn send(
    st: &AppState,
    method: &str,
    uri: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> Reply {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    let resp = app(st.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn answer(st: &AppState, model: &str) -> Reply {
    let body = json!({"model": model, "temperature": 0, "max_tokens": 12,
                      "messages": [{"role": "user", "content": "Name three colours."}]});
    send(st, "POST", "/v1/chat/completions", Some(body), None).await
}

fn text(r: &Reply) -> String {
    r.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", r.body))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_answer_by_name_and_load_and_unload_at_run_time() {
    let Some(st) = start(Some(ADMIN)) else { return };
    let dir = tempfile::tempdir().unwrap();
    let all = [Proj::Q, Proj::K, Proj::V, Proj::O];
    let same = write_adapter(&st, dir.path(), "same", 4, &all, 0.0);
    let tuned = write_adapter(&st, dir.path(), "tuned", 4, &all, 1.0);

    // Loaded at start (as `serve` does): an adapter with B = 0 answers like the base, by its name.
    let g = st.generator().unwrap();
    st.load_adapter(g, "same", &same, 1.0).unwrap();
    let base = answer(&st, MODEL).await;
    let zero = answer(&st, "same").await;
    assert_eq!(zero.status, StatusCode::OK, "{}", zero.body);
    assert_eq!(zero.body["model"], "same");
    assert_eq!(text(&zero), text(&base));

    // The admin endpoints need the key.
    let load = json!({"name": "tuned", "path": tuned.display().to_string()});
    let r = send(&st, "POST", "/admin/adapters", Some(load.clone()), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(
        &st,
        "POST",
        "/admin/adapters",
        Some(load.clone()),
        Some("wrong"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer(&st, "tuned").await.status, StatusCode::NOT_FOUND);
    let r = send(
        &st,
        "POST",
        "/admin/adapters",
        Some(load.clone()),
        Some(ADMIN),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["parent"], MODEL);
    // Twice under one name: refused.
    let r = send(&st, "POST", "/admin/adapters", Some(load), Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);

    // Listed with their base; the tuned adapter changes the answer.
    let models = send(&st, "GET", "/v1/models", None, None).await;
    let parent_of = |id: &str| {
        models.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["parent"].clone())
    };
    assert_eq!(parent_of("tuned"), Some(json!(MODEL)), "{}", models.body);
    assert_eq!(parent_of(MODEL), Some(Value::Null));
    let t = answer(&st, "tuned").await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.body);
    assert_ne!(text(&t), text(&base));
    let listed = send(&st, "GET", "/admin/adapters", None, Some(ADMIN)).await;
    assert_eq!(
        listed.body["data"].as_array().unwrap().len(),
        2,
        "{}",
        listed.body
    );

    // Unloaded: the name is gone; a second unload is 404.
    let r = send(&st, "DELETE", "/admin/adapters/tuned", None, Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(answer(&st, "tuned").await.status, StatusCode::NOT_FOUND);
    let r = send(&st, "DELETE", "/admin/adapters/tuned", None, Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Names of other models are taken.
    let r = send(
        &st,
        "POST",
        "/admin/adapters",
        Some(json!({"name": MODEL, "path": same.display().to_string()})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_adapters_are_refused_naming_the_problem() {
    let Some(st) = start(Some(ADMIN)) else { return };
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, path: &Path| json!({"name": name, "path": path.display().to_string()});
    // Every projection at rank 16: ~9.8 MB of f16 weights, more than the 6.7 MB the 12 MiB KV budget
    // leaves beside one full-context sequence.
    let big = write_adapter(&st, dir.path(), "big", 16, &Proj::ALL, 1.0);
    let r = send(
        &st,
        "POST",
        "/admin/adapters",
        Some(load("big", &big)),
        Some(ADMIN),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("KV budget"), "{msg}");
    // Another architecture's adapter.
    let c = st.generator().unwrap().model_cfg.clone();
    let (k, n) = Proj::Q.dims(&c);
    let other = dir.path().join("other.gguf");
    Adapter::from_pairs(
        &c,
        1.0,
        1.0,
        vec![(
            0,
            Proj::Q,
            LoraPair {
                rank: 1,
                a: vec![0.0; k],
                b: vec![0.0; n],
            },
        )],
    )
    .write(&other, "qwen2")
    .unwrap();
    let r = send(
        &st,
        "POST",
        "/admin/adapters",
        Some(load("other", &other)),
        Some(ADMIN),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("qwen2") && msg.contains("llama"), "{msg}");
    // A file that is not there.
    let r = send(
        &st,
        "POST",
        "/admin/adapters",
        Some(load("gone", &dir.path().join("nope.gguf"))),
        Some(ADMIN),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    // Without an admin key the endpoints are off.
    let Some(off) = start(None) else { return };
    let r = send(&off, "GET", "/admin/adapters", None, Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
