//! API keys: with keys configured, `/v1` and the dashboard's data need `Authorization: Bearer <key>`
//! (compared in constant time); the key's fingerprint goes into the request's context.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::privacy::RequestCtx;
use crate::{ApiError, AppState};

/// With API keys configured, `/v1` needs `Authorization: Bearer <key>`.
pub async fn require_key(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let keys = &st.settings.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(k) if key_allowed(keys, k) => {
            let key_id = porteiro_privacy::key_id(Some(k));
            if let Some(ctx) = req.extensions_mut().get_mut::<RequestCtx>() {
                ctx.key_id = key_id;
            }
            next.run(req).await
        }
        Some(_) => ApiError::unauthorized("Incorrect API key provided.").into_response(),
        None => ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
        )
        .into_response(),
    }
}

/// The key in `Authorization: Bearer <key>`, if any.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `given` is one of the configured keys (compared in constant time).
pub(crate) fn key_allowed(keys: &[String], given: &str) -> bool {
    keys.iter()
        .any(|key| constant_time_eq(key.as_bytes(), given.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
