//! Single-sequence generation: prefill in chunks, then sample token by token, streaming text, honouring
//! stop strings, max tokens and end-of-generation tokens.

use std::time::Instant;

use porteiro_models::tokenizer::{StreamDecoder, Tokenizer};

use crate::model::{BatchToken, ForwardError, KvCache, Model, Scratch};
use crate::sampler::{Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Prompt tokens per forward call during prefill.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            prefill_chunk: 512,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or stop string.
    Stop,
    /// max_tokens or the context window reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish: FinishReason,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub ttft_s: f64,
}

/// Feeds `tokens` to the model at the end of `kv`, `chunk` at a time; returns the logits of the last.
pub fn prefill(
    model: &Model,
    tokens: &[u32],
    kv: &mut KvCache,
    s: &mut Scratch,
    chunk: usize,
) -> Result<Vec<f32>, ForwardError> {
    let chunk = chunk.max(1);
    let mut done = 0;
    while done < tokens.len() {
        let end = (done + chunk).min(tokens.len());
        let start_pos = kv.len();
        let batch: Vec<BatchToken> = tokens[done..end]
            .iter()
            .enumerate()
            .map(|(i, &t)| BatchToken {
                token: t,
                seq: 0,
                pos: start_pos + i,
                logits: done + i + 1 == tokens.len(),
            })
            .collect();
        model.forward(&batch, &mut [&mut *kv], s)?;
        done = end;
    }
    Ok(s.logits[..model.cfg.vocab].to_vec())
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string: text that must be
/// held back from the stream until we know whether it starts a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for l in (1..s.len()).rev() {
            if l > keep
                && text.len() >= l
                && s.is_char_boundary(l)
                && text.is_char_boundary(text.len() - l)
                && text.ends_with(&s[..l])
            {
                keep = l;
                break;
            }
        }
    }
    keep
}

/// Text of generated tokens as it becomes final: decodes incrementally (complete UTF-8 only), cuts at the
/// first stop string, and holds back a tail that may be the start of a stop string. Shared by
/// [`generate`] and the server's scheduler.
pub struct StopText<'a> {
    dec: StreamDecoder<'a>,
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

/// What one token added to a [`StopText`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TextStep {
    /// Text that is now final (may be empty).
    pub text: String,
    /// A stop string was found: the text ends before it and generation must stop.
    pub stopped: bool,
}

impl<'a> StopText<'a> {
    pub fn new(tok: &'a Tokenizer, stops: &[String]) -> Self {
        Self {
            dec: StreamDecoder::new(tok),
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds one generated token.
    pub fn push(&mut self, id: u32) -> TextStep {
        self.text.push_str(&self.dec.push(id));
        // A stop string can only start at or after `emitted`: text before it was released only once no
        // suffix of it could begin one (see `held_back`).
        let from = self.emitted;
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|st| self.text[from..].find(st.as_str()).map(|i| from + i))
            .min()
        {
            self.text.truncate(at);
            return TextStep {
                text: self.release(at),
                stopped: true,
            };
        }
        let safe = self.text.len() - held_back(&self.text, &self.stops);
        TextStep {
            text: self.release(safe),
            stopped: false,
        }
    }

    /// Ends the text (end-of-generation token or length limit): releases what was held back. With
    /// `flush_decoder`, bytes of an incomplete character come out too (as U+FFFD).
    pub fn finish(&mut self, flush_decoder: bool) -> String {
        if flush_decoder {
            let rest = self.dec.flush();
            self.text.push_str(&rest);
        }
        self.release(self.text.len())
    }

    /// All final text so far.
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }

    fn release(&mut self, upto: usize) -> String {
        if upto <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        out
    }
}

/// Generates a continuation of `prompt` (token ids). `on_text` receives text as it becomes final.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    kv: &mut KvCache,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, ForwardError> {
    let mut s = Scratch::default();
    let t0 = Instant::now();
    let mut logits = prefill(model, prompt, kv, &mut s, opts.prefill_chunk)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut out = StopText::new(tok, &opts.stop);
    let mut tokens = Vec::new();
    let mut finish = FinishReason::Length;
    let mut ttft_s = 0.0;
    let t1 = Instant::now();
    while tokens.len() < opts.max_tokens {
        let next = sampler.sample(&mut logits);
        if tokens.is_empty() {
            ttft_s = t0.elapsed().as_secs_f64();
        }
        if tok.is_eog(next) {
            finish = FinishReason::Stop;
            break;
        }
        sampler.accept(next);
        tokens.push(next);
        let step = out.push(next);
        if !step.text.is_empty() {
            on_text(&step.text);
        }
        if step.stopped {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() >= opts.max_tokens || kv.len() >= kv.capacity() {
            break;
        }
        let pos = kv.len();
        model.forward(
            &[BatchToken {
                token: next,
                seq: 0,
                pos,
                logits: true,
            }],
            &mut [&mut *kv],
            &mut s,
        )?;
        logits.copy_from_slice(&s.logits[..model.cfg.vocab]);
    }
    let rest = out.finish(finish == FinishReason::Length);
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Generation {
        text: out.text().to_string(),
        tokens,
        prompt_tokens: prompt.len(),
        finish,
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
        ttft_s,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_partial_stop_strings() {
        let stops = vec!["</end>".to_string()];
        assert_eq!(held_back("hello </e", &stops), 3);
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(held_back("x<", &stops), 1);
    }
}
