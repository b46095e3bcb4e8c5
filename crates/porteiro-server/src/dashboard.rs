//! The live dashboard: `GET /` is one HTML page compiled into the binary (inline CSS and JS, charts
//! drawn on canvas, no external assets) that polls `GET /api/dashboard` for the same snapshot
//! `/metrics` renders, so the page and the metrics always agree. With API keys configured the
//! data needs one (`Authorization: Bearer`, or `?key=` on the page's URL, which it passes on).
//! With the flywheel's routes file in use, a card shows each learned route's stage, held-out
//! evidence and live agreement.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::{ApiError, AppState};

const PAGE: &str = include_str!("../assets/dashboard.html");

pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct KeyParam {
    key: Option<String>,
}

pub async fn data(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<KeyParam>,
) -> Result<Response, ApiError> {
    let keys = &st.settings.api_keys;
    if !keys.is_empty() {
        let given = crate::auth::bearer(&headers).or(q.key.as_deref());
        if !given.is_some_and(|g| crate::auth::key_allowed(keys, g)) {
            return Err(ApiError::unauthorized(
                "The dashboard data needs an API key (Authorization: Bearer, or ?key= on the page URL).",
            ));
        }
    }
    let snap = st.telemetry.enabled().then(|| st.telemetry.snapshot());
    let tiers: Vec<String> = std::iter::once(porteiro_config::LOCAL_TIER.to_string())
        .chain(st.routing.upstreams.iter().map(|u| u.name().to_string()))
        .collect();
    let flywheel = st.flywheel.as_ref().map(|fw| {
        let routes: Vec<_> = fw
            .live()
            .into_iter()
            .map(|(r, live)| {
                json!({"name": r.name, "title": r.title, "stage": r.stage, "model": r.model,
                    "mode": r.mode, "evidence": r.evidence, "live": live, "changed_ms": r.changed_ms,
                    "why": r.why})
            })
            .collect();
        json!({"version": fw.version(), "routes": routes})
    });
    Ok(Json(json!({
        "model": st.settings.model_id,
        "ready": st.ready(),
        "tiers": tiers,
        "telemetry": snap,
        "flywheel": flywheel,
    }))
    .into_response())
}
