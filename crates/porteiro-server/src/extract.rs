//! Request bodies: read within the size limit (413 beyond it) and parsed with the path of the first
//! bad field, so that a 400 can name the parameter.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::{ApiError, AppState};

/// A JSON body read within the size limit (413 beyond it) and parsed with the path of the first bad
/// field, so that a 400 can name the parameter.
pub struct OpenAiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        let limit = st.settings.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = read_limited(req.into_body(), limit).await?;
        parse_json(&bytes).map(OpenAiJson)
    }
}

/// Like [`OpenAiJson`], also keeping the body as a JSON value (passed through to upstreams as sent).
pub struct OpenAiJsonRaw<T>(pub T, pub serde_json::Value);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJsonRaw<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        let OpenAiJson(raw) = OpenAiJson::<serde_json::Value>::from_request(req, st).await?;
        let bytes = serde_json::to_vec(&raw)
            .map_err(|e| ApiError::malformed(format!("re-reading the body: {e}")))?;
        let typed = parse_json(&bytes)?;
        Ok(OpenAiJsonRaw(typed, raw))
    }
}

async fn read_limited(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::malformed(format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Parses a request body; errors name the JSON path of the offending parameter.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let msg = inner.to_string();
                    // "missing field `model` at line 1 column 2": the path is the parent object.
                    let param = match msg.strip_prefix("missing field `") {
                        Some(rest) => {
                            let field = rest.split('`').next().unwrap_or("");
                            if path == "." {
                                field.to_string()
                            } else {
                                format!("{path}.{field}")
                            }
                        }
                        None => path,
                    };
                    let what = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                    Err(ApiError::invalid(
                        param.clone(),
                        format!("Invalid parameter `{param}`: {what}."),
                    ))
                }
                _ => Err(ApiError::malformed(format!(
                    "We could not parse the JSON body of your request ({inner})."
                ))),
            }
        }
    }
}
