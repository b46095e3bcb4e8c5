//! The LoRA adapters served by name: a request whose `model` is an adapter's name runs on the local
//! model with that adapter (sequences with different adapters, or none, share one batch). Adapters
//! load at start (`[[adapters]]`, `serve --lora NAME=PATH`) or through the admin endpoints
//! (`admin.rs`), without a restart; their weights are held against the KV budget, so loading one that would leave no
//! room for a full-context sequence is refused. Unloading drops the name at once; sequences already
//! running finish with the adapter they started with.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use porteiro_engine::lora::Adapter;
use porteiro_engine::model::Config as ModelConfig;
use porteiro_engine::scheduler::EngineHandle;

use crate::ApiError;

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

    /// Reads an adapter, checks it against the model and holds its memory in the engine's KV
    /// budget (`kv_bytes_per_token` converts). `name` must be no other model's name (the caller
    /// checks); returns the adapter's bytes.
    pub fn load(
        &self,
        engine: &EngineHandle,
        model: &ModelConfig,
        kv_bytes_per_token: u64,
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
        let adapter = Adapter::open(path, model, scale)
            .map_err(|e| ApiError::invalid("path", format!("Cannot load the adapter: {e}")))?;
        let bytes = adapter.bytes();
        let tokens = (bytes as u64).div_ceil(kv_bytes_per_token.max(1)) as usize;
        engine.hold_tokens(tokens).map_err(|left| {
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
            engine.release_tokens(tokens);
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

    /// Drops an adapter by name, giving its memory back to the engine; false when there is none.
    pub fn unload(&self, engine: Option<&EngineHandle>, name: &str) -> bool {
        match self.write().remove(name) {
            Some(l) => {
                if let Some(e) = engine {
                    e.release_tokens(l.tokens);
                }
                true
            }
            None => false,
        }
    }
}
