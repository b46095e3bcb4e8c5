//! LoRA adapters served by name: a request whose `model` is an adapter's name runs on the local
//! model with that adapter (sequences with different adapters, or none, share one batch). Adapters
//! load at start (`[[adapters]]`, `serve --lora NAME=PATH`) or through the admin endpoints, without
//! a restart; their weights are held against the KV budget, so loading one that would leave no
//! room for a full-context sequence is refused. Unloading drops the name at once; sequences already
//! running finish with the adapter they started with.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::Json;
use porteiro_engine::lora::Adapter;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{ApiError, AppState, Generator};

struct Loaded {
    adapter: Arc<Adapter>,
    /// KV-budget tokens held for its weights.
    tokens: usize,
}

/// The adapters by name.
#[derive(Default)]
pub struct Adapters {
    by_name: RwLock<BTreeMap<String, Loaded>>,
}

impl Adapters {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Loaded>> {
        self.by_name.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Loaded>> {
        self.by_name.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Adapter>> {
        self.read().get(name).map(|l| l.adapter.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Names, paths and bytes of every adapter.
    pub fn list(&self) -> Vec<(String, String, usize)> {
        self.read()
            .iter()
            .map(|(n, l)| {
                (
                    n.clone(),
                    l.adapter.path.display().to_string(),
                    l.adapter.bytes(),
                )
            })
            .collect()
    }

    /// Reads an adapter, checks it against the model and holds its memory in the KV budget.
    /// `name` must be free (the caller checked it is no other model's name).
    pub fn load(
        &self,
        g: &Generator,
        name: &str,
        path: &Path,
        scale: f32,
    ) -> Result<usize, ApiError> {
        if self.contains(name) {
            return Err(ApiError::invalid(
                "name",
                format!("An adapter named `{name}` is already loaded; unload it first."),
            ));
        }
        let adapter = Adapter::open(path, &g.model_cfg, scale)
            .map_err(|e| ApiError::invalid("path", format!("Cannot load the adapter: {e}")))?;
        let bytes = adapter.bytes();
        let tokens = (bytes as u64).div_ceil(g.kv_bytes_per_token.max(1)) as usize;
        g.engine.hold_tokens(tokens).map_err(|left| {
            ApiError::invalid(
                "path",
                format!(
                    "The adapter needs {:.1} MiB ({tokens} tokens of the KV budget) and only {left} tokens are free beside one full-context sequence; raise limits.kv_cache_mib or unload another adapter.",
                    bytes as f64 / (1 << 20) as f64
                ),
            )
        })?;
        let mut map = self.write();
        if map.contains_key(name) {
            // Loaded concurrently under the same name: keep the first.
            g.engine.release_tokens(tokens);
            return Err(ApiError::invalid(
                "name",
                format!("An adapter named `{name}` is already loaded; unload it first."),
            ));
        }
        map.insert(
            name.to_string(),
            Loaded {
                adapter: Arc::new(adapter),
                tokens,
            },
        );
        Ok(bytes)
    }

    /// Drops an adapter by name; false when there is none.
    pub fn unload(&self, g: Option<&Generator>, name: &str) -> bool {
        match self.write().remove(name) {
            Some(l) => {
                if let Some(g) = g {
                    g.engine.release_tokens(l.tokens);
                }
                true
            }
            None => false,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Admin endpoints
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
        st2.adapters.load(g, &n2, Path::new(&path), scale)
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
    if st.adapters.unload(st.generator(), &name) {
        Ok(Json(json!({"id": name, "deleted": true})))
    } else {
        Err(ApiError::not_found(format!(
            "No adapter named `{name}` is loaded."
        )))
    }
}
