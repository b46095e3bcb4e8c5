//! `/v1/chat/completions` and `/v1/completions`, top to bottom: plan the request (where it goes,
//! what the privacy guard says), record the plan (audit, metrics, trace), start the first tier that
//! answers, apply the answer combinators, and encode the response.

use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use porteiro_config::LOCAL_TIER;
use porteiro_protocol::{ChatCompletionRequest, CompletionRequest};
use serde_json::Value;

use crate::answer;
use crate::extract::{OpenAiJson, OpenAiJsonRaw};
use crate::plan::{self, LocalIds, Plan, Target};
use crate::privacy::{counts_list, Action, RequestCtx};
use crate::respond::{self, Routed, Shape};
use crate::state::unix_now;
use crate::telemetry::Trace;
use crate::tier::local::LocalTier;
use crate::tier::{Api, Body, Tier, TierError, TierRequest};
use crate::{ApiError, AppState};

pub async fn chat(
    State(st): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    OpenAiJsonRaw(req, raw): OpenAiJsonRaw<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let stream = req.stream.unwrap_or(false);
    let trace = Trace::new(&st.telemetry, &st.privacy, &ctx, "chat", &req.model, stream);
    if trace.stores_text() {
        trace.texts(serde_json::to_string(&raw["messages"]).ok(), None);
    }
    if trace.collects() {
        let mut body = raw.clone();
        if let Some(o) = body.as_object_mut() {
            for k in ["model", "stream", "stream_options"] {
                o.remove(k);
            }
        }
        trace.sample_request(body);
    }
    let result = chat_inner(&st, &ctx, req, raw, t0, &trace).await;
    if let Err(e) = &result {
        trace.fail(e.status.as_u16(), &e.message);
    }
    result
}

fn local_ids<'a>(st: &'a AppState, adapter: &'a dyn Fn(&str) -> bool) -> LocalIds<'a> {
    LocalIds {
        model: &st.settings.model_id,
        embedding: st.settings.embedding_id.as_deref(),
        adapter,
    }
}

async fn chat_inner(
    st: &AppState,
    ctx: &RequestCtx,
    req: ChatCompletionRequest,
    raw: Value,
    t0: Instant,
    trace: &Trace,
) -> Result<Response, ApiError> {
    // 1. The plan.
    let is_adapter = |m: &str| st.adapters.contains(m);
    let target = plan::target(&st.routing, &local_ids(st, &is_adapter), &req.model)?;
    if target == Target::Local && st.generator().is_none() {
        return Err(ApiError::unavailable(
            "The model is still loading; retry shortly.",
        ));
    }
    let decision = match (target, st.routing.router.clone()) {
        (Target::Auto, Some(router)) => {
            let text = plan::routing_text(&req);
            // Learned routes match requests of their cluster's structure only.
            let structure = st
                .flywheel
                .as_ref()
                .map(|_| porteiro_flywheel::item::structure_of(&raw));
            tokio::task::spawn_blocking(move || {
                router.decide_structured(&text, structure.as_deref())
            })
            .await
            .map(Some)
            .map_err(|e| ApiError::internal(format!("routing: {e}")))?
        }
        _ => None,
    };
    // A promoted learned route answers with its cluster's adapter; else the adapter the model names.
    let adapter = match decision.as_ref().and_then(|d| d.learned.as_ref()) {
        Some(m) if !m.shadow => m.adapter.as_deref().and_then(|a| st.adapters.get(a)),
        _ => st.adapters.get(&req.model),
    };
    // A sample of a learned route's requests is compared with the other side after the answer.
    let watch = match (&st.flywheel, &decision) {
        (Some(fw), Some(d)) => fw.pick(
            d.learned.as_ref().map(|m| m.name.as_str()),
            !d.escalates(),
            &req,
            &raw,
        ),
        _ => None,
    };
    let mut plan = plan::plan_chat(&st.routing, &st.privacy, target, decision, raw)?;
    record(st, ctx, &plan, trace);
    if let Some(e) = plan.blocked() {
        return Err(e);
    }

    // 2. The first tier that answers.
    let stream = req.stream.unwrap_or(false);
    let include_usage = include_usage(req.stream_options.as_ref());
    // The local model answers under the name it was asked for (an adapter's, say); routed
    // requests under the model's own id.
    let model = if plan.routed {
        st.settings.model_id.clone()
    } else {
        req.model.clone()
    };
    let treq = TierRequest {
        adapter,
        body: Body::Chat(Box::new(req)),
        passthrough: std::sync::Mutex::new(plan.passthrough.take()),
        stream,
        prefix: None,
    };
    let tiers: Vec<Box<dyn Tier>> = plan
        .order
        .iter()
        .map(|t| crate::tier::build(st, *t))
        .collect();
    let secs = plan
        .decision
        .as_ref()
        .map_or(0.0, |d| d.elapsed.as_secs_f64());
    let serving = |name: &str| {
        if plan.routed {
            st.metrics.routed(&plan.wanted, name, &plan.route, secs);
        }
    };
    let started = answer::first_answer(st, tiers, &treq, trace, &serving)
        .await
        .map_err(TierError::into_api)?;

    // 3. The combinators, in their one order.
    let upstream = started.tier != LOCAL_TIER;
    let chunks = if upstream && stream {
        let mode = st.routing.cfg.mid_stream;
        answer::continue_locally(st, &started.tier, mode, treq, started.chunks, trace)
    } else {
        started.chunks
    };
    let chunks = answer::unmask(chunks, plan.privacy.unmasker.take());
    let tap = watch.map(|w| {
        let st = st.clone();
        Box::new(move |answer| crate::flywheel::compare(st, w, answer, upstream)) as answer::Tap
    });
    let chunks = answer::observe(st, chunks, trace, Api::Chat, t0, tap);

    // 4. The response.
    let shape = Shape::new(
        Api::Chat,
        st.new_id("chatcmpl"),
        model,
        unix_now(),
        include_usage,
    );
    let resp = if stream {
        respond::sse(chunks, shape)
    } else {
        respond::collect(chunks, shape).await?
    };
    if !plan.routed {
        return Ok(resp);
    }
    let action = plan.privacy.action;
    let privacy = match action {
        Action::KeepLocal => Some(action.as_str()),
        Action::None => None,
        _ if upstream => Some(action.as_str()),
        _ => None,
    };
    let score = plan
        .decision
        .as_ref()
        .map_or_else(|| "none".to_string(), |d| d.score_header());
    Ok(respond::decorate(
        resp,
        &Routed {
            tier: &started.tier,
            route: plan
                .decision
                .as_ref()
                .map_or("explicit", |d| d.route.as_str()),
            score,
            decision_ms: secs * 1e3,
            fallback: started.fallback,
            privacy,
        },
    ))
}

/// What the plan decided, recorded before anything is answered: the audit record, the privacy
/// metrics and the trace's route and privacy action.
fn record(st: &AppState, ctx: &RequestCtx, plan: &Plan, trace: &Trace) {
    trace.route(&plan.route);
    let p = &plan.privacy;
    if p.action != Action::None {
        trace.privacy(p.action);
    }
    if st.privacy.enabled() {
        st.privacy
            .audit(ctx, &p.tier, &plan.route, p.action, &p.counts);
        st.metrics
            .privacy(&p.tier, p.action.as_str(), &counts_list(&p.counts));
    }
}

/// `stream_options.include_usage`: a last chunk with the usage.
fn include_usage(o: Option<&porteiro_protocol::StreamOptions>) -> bool {
    o.and_then(|o| o.include_usage).unwrap_or(false)
}

pub async fn completions(
    State(st): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let stream = req.stream.unwrap_or(false);
    let trace = Trace::new(
        &st.telemetry,
        &st.privacy,
        &ctx,
        "completions",
        &req.model,
        stream,
    );
    trace.served(LOCAL_TIER, &st.settings.model_id);
    let result = completions_inner(&st, req, &trace).await;
    if let Err(e) = &result {
        trace.fail(e.status.as_u16(), &e.message);
    }
    result
}

/// Legacy completions are the local model's only (no routing, no privacy guard: nothing leaves).
async fn completions_inner(
    st: &AppState,
    req: CompletionRequest,
    trace: &Trace,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let is_adapter = |m: &str| st.adapters.contains(m);
    plan::local_target(&local_ids(st, &is_adapter), &req.model)?;
    let adapter = st.adapters.get(&req.model);
    if st.generator().is_none() {
        return Err(ApiError::unavailable(
            "The model is still loading; retry shortly.",
        ));
    }
    let stream = req.stream.unwrap_or(false);
    let include_usage = include_usage(req.stream_options.as_ref());
    let model = req.model.clone();
    let treq = TierRequest {
        adapter,
        body: Body::Completion(Box::new(req)),
        passthrough: Default::default(),
        stream,
        prefix: None,
    };
    let tiers: Vec<Box<dyn Tier>> = vec![Box::new(LocalTier::new(st.clone()))];
    let started = answer::first_answer(st, tiers, &treq, trace, &|_| {})
        .await
        .map_err(TierError::into_api)?;
    let chunks = answer::observe(st, started.chunks, trace, Api::Completion, t0, None);
    let shape = Shape::new(
        Api::Completion,
        st.new_id("cmpl"),
        model,
        unix_now(),
        include_usage,
    );
    if stream {
        Ok(respond::sse(chunks, shape))
    } else {
        respond::collect(chunks, shape).await
    }
}
