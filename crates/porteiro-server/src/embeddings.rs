//! `/v1/embeddings` with the catalog's MiniLM sentence encoder: float lists or base64 (little-endian
//! f32, what the official Python SDK asks for by default). Inputs longer than the encoder's
//! `max_seq_length` (256 tokens for MiniLM) are truncated, as sentence-transformers does.

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use porteiro_protocol::{
    f32s_to_base64, EmbeddingData, EmbeddingInput, EmbeddingList, EmbeddingRequest, EmbeddingUsage,
    EmbeddingVector,
};

use crate::{ApiError, AppState, OpenAiJson};

/// Inputs per request at most (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

pub async fn embeddings(
    State(st): State<AppState>,
    OpenAiJson(req): OpenAiJson<EmbeddingRequest>,
) -> Result<Json<EmbeddingList>, ApiError> {
    let t0 = Instant::now();
    let Some(id) = st.settings.embedding_id.clone() else {
        return Err(if req.model == st.settings.model_id {
            ApiError::invalid(
                "model",
                "Embeddings are turned off on this server ([embeddings] model = \"\").",
            )
        } else {
            ApiError::model_not_found(&req.model)
        });
    };
    if req.model != id {
        return Err(if req.model == st.settings.model_id {
            ApiError::invalid(
                "model",
                format!(
                    "`{}` is a generative model; embeddings come from `{id}`.",
                    req.model
                ),
            )
        } else {
            ApiError::model_not_found(&req.model)
        });
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64` (got `{other}`)."),
            ))
        }
    };
    let texts = match req.input {
        EmbeddingInput::Text(t) => vec![t],
        EmbeddingInput::Texts(v) => v,
        EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => {
            return Err(ApiError::invalid(
                "input",
                "Token-id input is not supported by this encoder; send text.",
            ))
        }
    };
    if texts.is_empty() || texts.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "`input` must hold between 1 and {MAX_INPUTS} texts (got {}).",
                texts.len()
            ),
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::invalid(
            format!("input[{i}]"),
            "Input texts must not be empty.",
        ));
    }
    let emb = st.embedder().ok_or_else(|| {
        ApiError::unavailable("The embedding model is still loading; retry shortly.")
    })?;
    let dim = emb.encoder.dim();
    if let Some(d) = req.dimensions {
        if d != dim as i64 {
            return Err(ApiError::invalid(
                "dimensions",
                format!("This model gives {dim}-dimensional vectors; `dimensions` must be {dim} or absent (got {d})."),
            ));
        }
    }
    let _permit = emb
        .permits
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("The embedding model is shutting down."))?;
    let enc = emb.encoder.clone();
    let vectors =
        tokio::task::spawn_blocking(move || texts.iter().map(|t| enc.embed(t)).collect::<Vec<_>>())
            .await
            .map_err(|e| ApiError::internal(format!("the embedding task failed: {e}")))?;
    let tokens: usize = vectors.iter().map(|v| v.tokens).sum();
    st.metrics.embedded(vectors.len(), tokens);
    st.metrics
        .generation_done("embeddings", t0.elapsed().as_secs_f64(), 0, 0);
    Ok(Json(EmbeddingList {
        object: "list",
        data: vectors
            .into_iter()
            .enumerate()
            .map(|(i, e)| EmbeddingData {
                object: "embedding",
                index: i as u32,
                embedding: if base64 {
                    EmbeddingVector::Base64(f32s_to_base64(&e.vector))
                } else {
                    EmbeddingVector::Float(e.vector)
                },
            })
            .collect(),
        model: id,
        usage: EmbeddingUsage {
            prompt_tokens: tokens as u32,
            total_tokens: tokens as u32,
        },
    }))
}
