//! The admin endpoints (`/admin/adapters`): list, load and unload LoRA adapters at run time. They
//! need `Authorization: Bearer <admin key>` and are off (404) when the server has no admin key.

use std::path::Path;

use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{ApiError, AppState, Generator};

// ------------------------------------------------------------------------------------------------

/// The admin key check: off (404) without a key, 401 with a wrong or missing one.
fn admin(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.settings.admin_key else {
        return Err(ApiError::not_found(
            "The admin endpoints are off: start the server with an admin key in the variable named by server.admin_key_env (default PORTEIRO_ADMIN_KEY).",
        ));
    };
    match crate::auth::bearer(headers) {
        Some(k) if crate::auth::key_allowed(std::slice::from_ref(key), k) => Ok(()),
        _ => Err(ApiError::unauthorized(
            "The admin endpoints need `Authorization: Bearer <admin key>`.",
        )),
    }
}

fn loaded(st: &AppState) -> Result<&Generator, ApiError> {
    st.generator()
        .ok_or_else(|| ApiError::unavailable("The model is still loading; retry shortly."))
}

pub async fn list(State(st): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    admin(&st, &headers)?;
    let data: Vec<Value> = st
        .adapters
        .list()
        .into_iter()
        .map(|(name, path, bytes)| {
            json!({"id": name, "path": path, "bytes": bytes, "parent": st.settings.model_id})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    name: String,
    path: String,
    scale: Option<f32>,
}

pub async fn load(
    State(st): State<AppState>,
    headers: HeaderMap,
    crate::OpenAiJson(req): crate::OpenAiJson<LoadRequest>,
) -> Result<Json<Value>, ApiError> {
    admin(&st, &headers)?;
    loaded(&st)?;
    let name = req.name.trim().to_string();
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid(
            "name",
            "`name` must be non-empty, without spaces.",
        ));
    }
    let taken = name == st.settings.model_id
        || st.settings.embedding_id.as_deref() == Some(name.as_str())
        || st.routing.auto_model() == Some(name.as_str())
        || st
            .routing
            .upstreams
            .iter()
            .any(|u| u.name() == name || u.config().model == name);
    if taken {
        return Err(ApiError::invalid(
            "name",
            format!("`{name}` is already the name of a model on this server."),
        ));
    }
    let scale = req.scale.unwrap_or(1.0);
    if !scale.is_finite() {
        return Err(ApiError::invalid(
            "scale",
            "`scale` must be a finite number.",
        ));
    }
    let (st2, path, n2) = (st.clone(), req.path.clone(), name.clone());
    // Reading and converting the weights takes a while: off the async workers.
    let bytes = tokio::task::spawn_blocking(move || {
        let g = loaded(&st2)?;
        st2.load_adapter(g, &n2, Path::new(&path), scale)
    })
    .await
    .map_err(|e| ApiError::internal(format!("loading the adapter: {e}")))??;
    Ok(Json(json!({
        "id": name, "object": "model", "parent": st.settings.model_id, "path": req.path, "bytes": bytes
    })))
}

pub async fn unload(
    State(st): State<AppState>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&st, &headers)?;
    if st.adapters.unload(st.generator().map(|g| &g.engine), &name) {
        Ok(Json(json!({"id": name, "deleted": true})))
    } else {
        Err(ApiError::not_found(format!(
            "No adapter named `{name}` is loaded."
        )))
    }
}
