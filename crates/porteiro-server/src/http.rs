//! The HTTP surface: [`app`] wires every route with the API-key check and request tracking;
//! [`serve`] runs it with a bounded graceful drain. Plus the small endpoints (`/health`,
//! `/metrics`, `/v1/models`).

use std::future::{Future, IntoFuture};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use porteiro_protocol::{ModelCard, ModelList};

use crate::privacy::RequestCtx;
use crate::{admin, auth, dashboard, embeddings, handlers, ApiError, AppState};

/// The router with every route, the API-key check on `/v1`, and request metrics.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(handlers::chat))
        .route("/completions", post(handlers::completions))
        .route("/embeddings", post(embeddings::embeddings))
        .route("/models", get(list_models))
        .route("/models/{id}", get(get_model))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .nest("/v1", v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/", get(dashboard::page))
        .route("/api/dashboard", get(dashboard::data))
        .route("/admin/adapters", get(admin::list).post(admin::load))
        .route("/admin/adapters/{name}", delete(admin::unload))
        .fallback(|| async { ApiError::not_found("Unknown path; see /v1/models.") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Runs the server until `shutdown` resolves, then stops accepting connections and lets in-flight
/// requests finish for up to `grace`; what is still running after that is cancelled (streams end
/// with an error event) and the server returns at most 2 s later.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let server = axum::serve(listener, app(state.clone())).with_graceful_shutdown(async move {
        shutdown.await;
        st.start_draining();
        let _ = tx.send(());
    });
    let server = server.into_future();
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = rx => match tokio::time::timeout(grace, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                state.stop_engine();
                tokio::time::timeout(Duration::from_secs(2), &mut server)
                    .await
                    .unwrap_or(Ok(()))
            }
        },
    };
    state.stop_engine();
    result
}

/// Records route, status and time to the response head; gives the request its id (`x-request-id`).
async fn track(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = st.new_id("req");
    req.extensions_mut().insert(RequestCtx {
        id: id.clone(),
        key_id: porteiro_privacy::key_id(None),
    });
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let t0 = Instant::now();
    let mut resp = next.run(req).await;
    st.metrics
        .request(&route, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn health(State(st): State<AppState>) -> Response {
    if st.ready() {
        Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        let status = if st.draining() {
            "shutting_down"
        } else {
            "loading"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": status })),
        )
            .into_response()
    }
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    let mut body = st
        .metrics
        .render(st.generator().map(|g| g.engine.stats()), st.ready());
    if st.telemetry.enabled() {
        st.telemetry.snapshot().render_prometheus(&mut body);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn cards(st: &AppState) -> Vec<ModelCard> {
    // The local model, the embedding model, then the routed name and each upstream's name.
    let r = &st.routing;
    let routed: Vec<String> = r
        .auto_model()
        .map(str::to_string)
        .into_iter()
        .chain(r.upstreams.iter().map(|u| u.name().to_string()))
        .collect();
    let card = |id: &String, parent: Option<String>| ModelCard {
        id: id.clone(),
        object: "model",
        created: st.created(),
        owned_by: "porteiro",
        parent,
    };
    let adapters: Vec<String> = st.adapters.list().into_iter().map(|(n, ..)| n).collect();
    std::iter::once(&st.settings.model_id)
        .chain(st.settings.embedding_id.as_ref())
        .chain(routed.iter())
        .map(|id| card(id, None))
        .chain(
            adapters
                .iter()
                .map(|id| card(id, Some(st.settings.model_id.clone()))),
        )
        .collect()
}

async fn list_models(State(st): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: cards(&st),
    })
}

async fn get_model(
    State(st): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    cards(&st)
        .into_iter()
        .find(|c| c.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::model_not_found(&id))
}
