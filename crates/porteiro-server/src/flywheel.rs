//! S6 on the server: the flywheel's learned routes (`porteiro flywheel promote` writes them) put to
//! work and watched.
//!
//! - The routes file is reloaded when it changes, without a restart: each shadow or promoted route
//!   of the served model becomes a [`LearnedIndex`] of the router (its examples embedded once), and
//!   its adapter is loaded as `flywheel-<route>`.
//! - **Shadow:** a sample (`shadow_sample`) of the cluster's requests, answered by the teacher as
//!   before, is answered again by the candidate after the response went out, one at a time at
//!   most (the CPU budget: never more than one comparison runs, others are skipped).
//! - **Promoted:** the candidate serves; a sample (`monitor_sample`) is also asked of the teacher,
//!   off the request path (through the privacy guard, like any escalation).
//! - Each comparison (agreement by the cluster's answer kind) is appended to `shadow.jsonl` beside
//!   the routes file; once `min_live` are in, live agreement over the last `window` promotes a
//!   shadow route or rolls a route back ([`live_verdict`]): a new version of the routes file, a
//!   record in the audit trail, and the router follows on the next reload.

// Why the allow: reload failures and stage changes happen off any request, with no caller to return
// them to; the operator reads them on stderr, as the request log's writer failures.
#![allow(clippy::print_stderr)]

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use porteiro_flywheel::cluster::MIXED;
use porteiro_flywheel::routes::{Routes, Stage};
use porteiro_router::LearnedIndex;
use serde_json::Value;

pub use crate::learned::{adapter_name, Flywheel, Role, Watch, MAX_EXAMPLES};
use crate::plan::{self, Target, TierRef};
use crate::privacy::RequestCtx;
use crate::telemetry::Trace;
use crate::tier::{Api, Body, TierRequest};
use crate::AppState;

/// Reloads the routes file every 2 s when it changed (and once now).
pub fn watch(st: AppState) {
    tokio::spawn(async move {
        loop {
            if let Some(fw) = &st.flywheel {
                let mtime = std::fs::metadata(&fw.path).and_then(|m| m.modified()).ok();
                let changed = mtime != fw.loaded_mtime();
                if changed {
                    if let Err(e) = reload(&st, mtime).await {
                        eprintln!("porteiro: flywheel routes: {e}");
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

/// Reads the routes file and hands the router its shadow and promoted routes of this model.
async fn reload(st: &AppState, mtime: Option<SystemTime>) -> Result<(), String> {
    let Some(fw) = st.flywheel.clone() else {
        return Ok(());
    };
    let routes = Routes::load(&fw.path).map_err(|e| e.to_string())?;
    let Some(router) = st.routing.router.clone() else {
        fw.mark_loaded(mtime);
        if routes.active().next().is_some() {
            return Err("learned routes need the router's encoder ([embeddings] model)".into());
        }
        return Ok(());
    };
    let Some(g) = st.generator() else {
        // Adapters load against the model: try again once it is loaded.
        return Ok(());
    };
    let mut indexes = Vec::new();
    let mut used = Vec::new();
    for r in routes.active() {
        if r.model != st.settings.model_id {
            eprintln!(
                "porteiro: flywheel route {} is for {}, this server runs {}: not used",
                r.name, r.model, st.settings.model_id
            );
            continue;
        }
        let adapter = match &r.adapter {
            None => None,
            Some(p) => {
                let name = adapter_name(&r.name);
                let same = st
                    .adapters
                    .list()
                    .iter()
                    .any(|(n, path, _)| *n == name && Path::new(path) == p.as_path());
                if !same {
                    st.adapters.unload(Some(&g.engine), &name);
                    let (st2, n2, p2) = (st.clone(), name.clone(), p.clone());
                    let loaded = tokio::task::spawn_blocking(move || {
                        let g = st2.generator().ok_or("the model is not loaded")?;
                        st2.load_adapter(g, &n2, &p2, 1.0)
                            .map_err(|e| e.message.clone())
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    if let Err(e) = loaded {
                        eprintln!(
                            "porteiro: flywheel route {}: adapter {}: {e}; not used",
                            r.name,
                            p.display()
                        );
                        continue;
                    }
                }
                used.push(name.clone());
                Some(name)
            }
        };
        let texts: Vec<String> = r.examples.iter().take(MAX_EXAMPLES).cloned().collect();
        let enc = router.clone();
        let examples = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|t| enc.encoder().embed(t).vector)
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| e.to_string())?;
        let structure = (r.structure != MIXED).then(|| r.structure.clone());
        indexes.push(LearnedIndex::new(
            r.name.clone(),
            structure,
            examples,
            r.stage == Stage::Shadow,
            adapter,
        ));
    }
    // Adapters of routes no longer in use go.
    for (n, ..) in st.adapters.list() {
        if n.starts_with("flywheel-") && !used.contains(&n) {
            st.adapters.unload(Some(&g.engine), &n);
        }
    }
    let summary: Vec<String> = routes
        .active()
        .map(|r| format!("{} ({})", r.name, r.stage.as_str()))
        .collect();
    router.set_learned(indexes, fw.cfg.similarity_floor as f32);
    let live = read_live(&fw.shadow_log(), &routes, fw.cfg.window);
    st.metrics.flywheel_routes(routes.version);
    let version = routes.version;
    fw.set_loaded(routes, live, mtime);
    eprintln!(
        "porteiro: flywheel routes v{}: {}",
        version,
        if summary.is_empty() {
            "none active".to_string()
        } else {
            summary.join(", ")
        }
    );
    Ok(())
}

/// The comparisons of `shadow.jsonl` made since each route's stage last changed.
fn read_live(path: &Path, routes: &Routes, window: usize) -> HashMap<String, VecDeque<bool>> {
    let mut live: HashMap<String, VecDeque<bool>> = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return live;
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(name), Some(ts), Some(agree)) = (
            v["route"].as_str(),
            v["ts_ms"].as_i64(),
            v["agree"].as_bool(),
        ) else {
            continue;
        };
        if routes.get(name).is_some_and(|r| ts >= r.changed_ms) {
            let q = live.entry(name.to_string()).or_default();
            q.push_back(agree);
            if q.len() > window {
                q.pop_front();
            }
        }
    }
    live
}

/// Runs a picked comparison after the response went out: `served` is the answer the client got,
/// `upstream` whether an upstream tier gave it (a shadow compares only the teacher's answers, a
/// monitor only the candidate's: a fallback is neither).
pub fn compare(st: AppState, w: Watch, served: Value, upstream: bool) {
    if upstream != (w.role == Role::Shadow) {
        return;
    }
    tokio::spawn(async move {
        let Some(fw) = st.flywheel.clone() else {
            return;
        };
        let Ok(_permit) = fw.busy.clone().try_acquire_owned() else {
            return; // another comparison is running: this one is skipped (CPU budget)
        };
        let other = match w.role {
            Role::Shadow => candidate(&st, &w).await,
            Role::Monitor => teacher(&st, &w).await,
        };
        let Some(other) = other else {
            return;
        };
        let (teacher, cand) = match w.role {
            Role::Shadow => (&served, &other),
            Role::Monitor => (&other, &served),
        };
        // By the teacher's answer's own kind (a pooled cluster mixes kinds).
        let kind = porteiro_flywheel::item::kind_of(&w.raw, teacher);
        let agree = porteiro_flywheel::score::agrees(kind, teacher, cand);
        record(&st, &fw, &w.route.name, w.role, agree).await;
    });
}

/// The candidate's answer (the local model with the route's adapter).
async fn candidate(st: &AppState, w: &Watch) -> Option<Value> {
    let adapter = w
        .route
        .adapter
        .as_ref()
        .and_then(|_| st.adapters.get(&adapter_name(&w.route.name)));
    if w.route.adapter.is_some() && adapter.is_none() {
        return None;
    }
    side_answer(st, w, TierRef::Local, adapter, None, None).await
}

/// The teacher's answer: the upstream the route's traffic came from (else the last, most capable
/// one), through the privacy guard as any escalation; none when the guard keeps it local.
async fn teacher(st: &AppState, w: &Watch) -> Option<Value> {
    let ups = &st.routing.upstreams;
    let i = ups
        .iter()
        .position(|u| u.name() == w.route.teacher)
        .or(ups.len().checked_sub(1))?;
    let mut plan = plan::plan_chat(
        &st.routing,
        &st.privacy,
        Target::Upstream(i),
        None,
        w.raw.clone(),
    )
    .ok()?;
    if plan.order.first() != Some(&TierRef::Upstream(i)) {
        return None;
    }
    let (passthrough, unmasker) = (plan.passthrough.take(), plan.privacy.unmasker.take());
    side_answer(st, w, TierRef::Upstream(i), None, passthrough, unmasker).await
}

/// One tier's whole answer to the watched request, off the request path, recorded in the request
/// log like any answer (under the route `shadow:…` / `monitor:…`).
async fn side_answer(
    st: &AppState,
    w: &Watch,
    at: TierRef,
    adapter: Option<Arc<porteiro_engine::lora::Adapter>>,
    passthrough: Option<Value>,
    unmasker: Option<porteiro_privacy::Unmasker>,
) -> Option<Value> {
    let treq = TierRequest {
        adapter,
        body: Body::Chat(Box::new(w.req.clone())),
        passthrough: Mutex::new(passthrough),
        stream: false,
        prefix: None,
    };
    let tier = crate::tier::build(st, at);
    let ctx = RequestCtx {
        id: st.new_id("flywheel"),
        key_id: "flywheel".into(),
    };
    let trace = Trace::new(
        &st.telemetry,
        &st.privacy,
        &ctx,
        "chat",
        tier.model(),
        false,
    );
    trace.route(&format!("{}:{}", w.role.as_str(), w.route.name));
    trace.served(tier.name(), tier.model());
    let chunks = tier.answer(&treq).await.ok()?;
    let chunks = crate::answer::unmask(chunks, unmasker);
    let chunks = crate::answer::observe(
        st,
        chunks,
        &trace,
        Api::Chat,
        std::time::Instant::now(),
        None,
    );
    crate::answer::message(chunks).await
}

/// Appends one comparison, and acts on live agreement.
async fn record(st: &AppState, fw: &Arc<Flywheel>, name: &str, role: Role, agree: bool) {
    let line = serde_json::json!({"ts_ms": porteiro_flywheel::routes::now_ms(), "route": name,
        "role": role.as_str(), "agree": agree});
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(fw.shadow_log())
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = appended {
        eprintln!("porteiro: flywheel: {}: {e}", fw.shadow_log().display());
    }
    st.metrics.flywheel_comparison(name, role.as_str(), agree);
    let verdict = fw.push(name, agree);
    let Some((to, why)) = verdict else {
        return;
    };
    let (path, n) = (fw.path.clone(), name.to_string());
    let written = tokio::task::spawn_blocking(move || {
        Routes::update(&path, |r| r.set(&n, to, &why, None).into_iter().collect())
    })
    .await;
    match written {
        Ok(Ok((routes, changes))) => {
            for c in &changes {
                eprintln!(
                    "porteiro: flywheel route {}: {} → {} ({})",
                    c.route,
                    c.from.map_or("-", Stage::as_str),
                    c.to.as_str(),
                    c.why
                );
                st.privacy.audit_flywheel(routes.version, c);
            }
            // A rolled-back route stops serving now, not at the watcher's next look.
            let mtime = std::fs::metadata(&fw.path).and_then(|m| m.modified()).ok();
            if let Err(e) = reload(st, mtime).await {
                eprintln!("porteiro: flywheel routes: {e}");
            }
        }
        Ok(Err(e)) => eprintln!("porteiro: flywheel: {e}"),
        Err(e) => eprintln!("porteiro: flywheel: {e}"),
    }
}
