//! A client for one OpenAI-compatible upstream endpoint (`POST {base_url}/chat/completions`).
//!
//! - Connection reuse: one `reqwest::Client` per endpoint, kept for the process.
//! - Retries with jittered exponential backoff on 429, 5xx, connect errors and timeouts, honouring a
//!   `Retry-After` of a few seconds; only before the response is handed to the caller, so nothing is
//!   ever retried after tokens reached the client.
//! - A circuit breaker per endpoint: `breaker_failures` consecutive failures open it for
//!   `breaker_cooldown_s`; then one trial request is let through (half-open) and its outcome closes or
//!   re-opens it. An open breaker fails fast, so the caller can fall back to the local tier at once.
//! - Streams are parsed from server-sent events into JSON chunks; a stream that ends without
//!   `[DONE]` or a finish reason, or stalls past the timeout, yields an error item, never a silent end.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use porteiro_config::Upstream;
use serde_json::Value;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum UpstreamError {
    #[error("upstream `{name}` answered {status}: {body}")]
    Status {
        name: String,
        status: u16,
        body: String,
    },
    #[error("upstream `{name}` unreachable: {why}")]
    Connect { name: String, why: String },
    #[error("upstream `{name}` timed out after {secs} s")]
    Timeout { name: String, secs: u64 },
    #[error("upstream `{name}` circuit open after repeated failures; retrying in {retry_in_s} s")]
    BreakerOpen { name: String, retry_in_s: u64 },
    #[error("upstream `{name}` sent an invalid response: {why}")]
    Protocol { name: String, why: String },
    #[error("upstream `{name}` stream broke: {why}")]
    Broken { name: String, why: String },
}

impl UpstreamError {
    /// Whether another attempt may succeed (and whether it counts against the breaker).
    fn transient(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Connect { .. } | UpstreamError::Timeout { .. } => true,
            UpstreamError::Broken { .. } => true,
            UpstreamError::BreakerOpen { .. } | UpstreamError::Protocol { .. } => false,
        }
    }
}

/// Circuit-breaker state of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct BreakerInner {
    failures: u32,
    open_until: Option<Instant>,
    /// A half-open trial is in flight: others keep failing fast until it reports.
    trial: bool,
}

/// Shared by the client and the streams it hands out (a stream reports when it ends).
#[derive(Debug)]
struct Breaker {
    inner: Mutex<BreakerInner>,
    failures_to_open: u32,
    cooldown: Duration,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, ok: bool) {
        let mut b = self.lock();
        b.trial = false;
        if ok {
            b.failures = 0;
            b.open_until = None;
        } else {
            b.failures += 1;
            // A failed half-open trial re-opens at once.
            if b.failures >= self.failures_to_open || b.open_until.is_some() {
                b.open_until = Some(Instant::now() + self.cooldown);
            }
        }
    }
}

/// Attempts made and the outcome, for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempts {
    pub tries: u32,
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Value, UpstreamError>> + Send>>;

pub enum Reply {
    /// A whole (non-streaming) chat completion.
    Json(Value),
    /// Chat completion chunks as they arrive.
    Stream(ChunkStream),
}

pub struct UpstreamClient {
    cfg: Upstream,
    http: reqwest::Client,
    key: Option<String>,
    breaker: Arc<Breaker>,
}

impl UpstreamClient {
    /// Builds the client; the API key is read from `api_key_env` now (a missing variable is an error,
    /// so a misconfigured key fails at start, not on the first escalation).
    pub fn new(cfg: Upstream) -> Result<Self, String> {
        let key = match &cfg.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                format!(
                    "upstream `{}`: environment variable {var} (api_key_env) is not set",
                    cfg.name
                )
            })?),
            None => None,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_s))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("upstream `{}`: {e}", cfg.name))?;
        Ok(Self {
            http,
            key,
            breaker: Arc::new(Breaker {
                inner: Mutex::new(BreakerInner {
                    failures: 0,
                    open_until: None,
                    trial: false,
                }),
                failures_to_open: cfg.breaker_failures,
                cooldown: Duration::from_secs(cfg.breaker_cooldown_s),
            }),
            cfg,
        })
    }

    pub fn config(&self) -> &Upstream {
        &self.cfg
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn breaker_state(&self) -> BreakerState {
        let b = self.breaker.lock();
        match b.open_until {
            None => BreakerState::Closed,
            Some(t) if Instant::now() < t => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Admission through the breaker: Err when open (or a half-open trial is already out).
    fn admit(&self) -> Result<(), UpstreamError> {
        let mut b = self.breaker.lock();
        if let Some(until) = b.open_until {
            let now = Instant::now();
            if now < until || b.trial {
                return Err(UpstreamError::BreakerOpen {
                    name: self.cfg.name.clone(),
                    retry_in_s: until.saturating_duration_since(now).as_secs().max(1),
                });
            }
            b.trial = true;
        }
        Ok(())
    }

    /// Reports an attempt's outcome to the breaker.
    pub fn record(&self, ok: bool) {
        self.breaker.record(ok);
    }

    /// Sends a chat completion request. `body` is the client's request; its `model` is replaced by
    /// the upstream's. Retries transient failures (with backoff) while nothing has been returned.
    pub async fn chat(&self, mut body: Value) -> Result<(Reply, Attempts), UpstreamError> {
        body["model"] = Value::String(self.cfg.model.clone());
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let mut attempts = Attempts::default();
        loop {
            self.admit()?;
            attempts.tries += 1;
            let result = self.once(&body, stream).await;
            match result {
                Ok(reply) => {
                    if !stream {
                        self.record(true);
                    }
                    // A stream reports to the breaker when it ends (see `sse_stream`).
                    return Ok((reply, attempts));
                }
                Err((e, retry_after)) => {
                    if e.transient() {
                        self.record(false);
                    }
                    if !e.transient() || attempts.tries > self.cfg.retries {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff(attempts.tries, retry_after)).await;
                }
            }
        }
    }

    async fn once(
        &self,
        body: &Value,
        stream: bool,
    ) -> Result<Reply, (UpstreamError, Option<u64>)> {
        let name = || self.cfg.name.clone();
        let timeout = Duration::from_secs(self.cfg.timeout_s);
        let mut req = self
            .http
            .post(format!("{}/chat/completions", self.cfg.base_url))
            .json(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if !stream {
            req = req.timeout(timeout);
        }
        // For streams the timeout covers the response head here and each chunk later.
        let resp = match tokio::time::timeout(timeout, req.send()).await {
            Err(_) => {
                return Err((
                    UpstreamError::Timeout {
                        name: name(),
                        secs: self.cfg.timeout_s,
                    },
                    None,
                ))
            }
            Ok(Err(e)) => return Err((classify(&self.cfg, e), None)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let text = tokio::time::timeout(timeout, resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err((
                UpstreamError::Status {
                    name: name(),
                    status: status.as_u16(),
                    body: text.chars().take(500).collect(),
                },
                retry_after,
            ));
        }
        if stream {
            return Ok(Reply::Stream(sse_stream(self, resp, timeout)));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| (classify(&self.cfg, e), None))?;
        if v.get("choices").and_then(Value::as_array).is_none() {
            return Err((
                UpstreamError::Protocol {
                    name: name(),
                    why: "no `choices` array in the completion".into(),
                },
                None,
            ));
        }
        Ok(Reply::Json(v))
    }
}

fn classify(cfg: &Upstream, e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError::Timeout {
            name: cfg.name.clone(),
            secs: cfg.timeout_s,
        }
    } else if e.is_decode() {
        UpstreamError::Protocol {
            name: cfg.name.clone(),
            why: e.to_string(),
        }
    } else {
        UpstreamError::Connect {
            name: cfg.name.clone(),
            why: e.to_string(),
        }
    }
}

/// Exponential backoff from 100 ms with ±50% jitter (so clients retrying together spread out),
/// or the server's Retry-After when it asks for at most 10 s.
fn backoff(attempt: u32, retry_after_s: Option<u64>) -> Duration {
    if let Some(s) = retry_after_s.filter(|s| *s <= 10) {
        return Duration::from_secs(s);
    }
    let base = 100u64 << attempt.min(6);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base))
}

/// Server-sent events to JSON chunks. Reports to the breaker when the stream ends: success after
/// `[DONE]` (or a chunk with a finish reason and then EOF), failure when it breaks or stalls.
fn sse_stream(client: &UpstreamClient, resp: reqwest::Response, idle: Duration) -> ChunkStream {
    struct St {
        body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
        buf: Vec<u8>,
        finished: bool,
        done: bool,
        name: String,
        idle: Duration,
    }
    let st = St {
        body: Box::pin(resp.bytes_stream()),
        buf: Vec::new(),
        finished: false,
        done: false,
        name: client.cfg.name.clone(),
        idle,
    };
    let breaker = client.breaker.clone();
    let report = move |ok: bool| breaker.record(ok);
    Box::pin(futures_util::stream::unfold(
        (st, report),
        |(mut st, report)| async move {
            if st.done {
                return None;
            }
            loop {
                // A complete event is a block ending with a blank line.
                if let Some(end) = find_event_end(&st.buf) {
                    let event: Vec<u8> = st.buf.drain(..end.1).collect();
                    let text = String::from_utf8_lossy(&event[..end.0]).into_owned();
                    let data: Vec<&str> = text
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim_start)
                        .collect();
                    if data.is_empty() {
                        continue; // comments / keep-alives
                    }
                    let data = data.join("\n");
                    if data == "[DONE]" {
                        report(true);
                        return None;
                    }
                    return match serde_json::from_str::<Value>(&data) {
                        Ok(v) => {
                            if v.get("error").is_some() {
                                st.done = true;
                                report(false);
                                let why = v["error"]["message"]
                                    .as_str()
                                    .unwrap_or("error event")
                                    .to_string();
                                return Some((
                                    Err(UpstreamError::Broken {
                                        name: st.name.clone(),
                                        why,
                                    }),
                                    (st, report),
                                ));
                            }
                            if v["choices"]
                                .as_array()
                                .is_some_and(|c| c.iter().any(|c| !c["finish_reason"].is_null()))
                            {
                                st.finished = true;
                            }
                            Some((Ok(v), (st, report)))
                        }
                        Err(e) => {
                            st.done = true;
                            report(false);
                            Some((
                                Err(UpstreamError::Protocol {
                                    name: st.name.clone(),
                                    why: format!("bad SSE data: {e}"),
                                }),
                                (st, report),
                            ))
                        }
                    };
                }
                match tokio::time::timeout(st.idle, st.body.next()).await {
                    Ok(Some(Ok(bytes))) => st.buf.extend_from_slice(&bytes),
                    Ok(None) => {
                        if st.finished {
                            report(true);
                            return None;
                        }
                        st.done = true;
                        report(false);
                        let why = "the connection closed before the answer finished".to_string();
                        return Some((
                            Err(UpstreamError::Broken {
                                name: st.name.clone(),
                                why,
                            }),
                            (st, report),
                        ));
                    }
                    Ok(Some(Err(e))) => {
                        st.done = true;
                        report(false);
                        return Some((
                            Err(UpstreamError::Broken {
                                name: st.name.clone(),
                                why: e.to_string(),
                            }),
                            (st, report),
                        ));
                    }
                    Err(_) => {
                        st.done = true;
                        report(false);
                        let why = format!("no data for {} s", st.idle.as_secs());
                        return Some((
                            Err(UpstreamError::Broken {
                                name: st.name.clone(),
                                why,
                            }),
                            (st, report),
                        ));
                    }
                }
            }
        },
    ))
}

/// (end of the event text, end including the separator) of the first complete SSE event.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, i + 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, i + 4));
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_honours_short_retry_after() {
        for attempt in 1..5u32 {
            let base = 100u64 << attempt;
            let d = backoff(attempt, None).as_millis() as u64;
            assert!((base / 2..=base / 2 + base).contains(&d), "{attempt}: {d}");
        }
        assert_eq!(backoff(1, Some(2)), Duration::from_secs(2));
        assert!(backoff(1, Some(600)) < Duration::from_secs(1));
    }

    #[test]
    fn sse_events_are_split_on_blank_lines() {
        assert_eq!(find_event_end(b"data: 1\n\ndata: 2"), Some((7, 9)));
        assert_eq!(find_event_end(b"data: 1\r\n\r\n"), Some((7, 11)));
        assert_eq!(find_event_end(b"data: 1\n"), None);
    }
}
