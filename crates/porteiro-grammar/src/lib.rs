//! Structured output over llguidance: `response_format` (JSON object / JSON Schema) and tool calls
//! become a grammar, the grammar a per-token mask over our tokenizer's vocabulary. The token trie is
//! built once per model ([`Grammars::new`]); each request gets its own matcher ([`Constraint`]).
//!
//! The next mask is computed on a helper thread as soon as a token is committed, so it overlaps
//! the engine's next forward pass instead of adding to it.

mod tools;

pub use tools::{call_header, Header, ObjectScan, Scan, ToolConstraint, ToolPlan, ToolSyntax};

use std::sync::mpsc;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use porteiro_engine::scheduler::TokenConstraint;
use porteiro_models::tokenizer::Tokenizer;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("{0}")]
    Unsupported(String),
    #[error("building the token trie: {0}")]
    Trie(String),
    #[error("cannot start the grammar thread: {0}")]
    Thread(std::io::Error),
}

/// Our tokenizer as llguidance sees it: the trie of every token's bytes (special tokens marked
/// with 0xFF, as toktrie expects) and our own BPE for forced text.
struct Env {
    trie: TokTrie,
    tok: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tok.encode(text, false, false),
            // Partial UTF-8: the trie's greedy tokenization is what the grammar needs here.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// What a request wants its output to be.
#[derive(Debug, Clone)]
pub enum Spec {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
    /// One call of one of these functions: `{"name": …, "arguments": {…}}`.
    ToolCall(Vec<Tool>),
}

#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

impl Spec {
    /// The JSON Schema the output must satisfy, with llguidance told to emit compact JSON (no
    /// free whitespace between tokens: a small model otherwise wanders off into newlines).
    pub fn schema(&self) -> Value {
        let mut s = self.plain_schema();
        if let Some(o) = s.as_object_mut() {
            o.entry("x-guidance").or_insert_with(|| {
                json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"})
            });
        }
        s
    }

    pub(crate) fn plain_schema(&self) -> Value {
        match self {
            Spec::JsonObject => json!({"type": "object"}),
            Spec::JsonSchema(s) => s.clone(),
            Spec::ToolCall(tools) => {
                let calls: Vec<Value> = tools
                    .iter()
                    .map(|t| {
                        json!({
                            "type": "object",
                            "properties": {
                                "name": {"const": t.name},
                                "arguments": t.parameters,
                            },
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                if calls.len() == 1 {
                    calls[0].clone()
                } else {
                    json!({"anyOf": calls})
                }
            }
        }
    }

    /// A system-prompt addition telling the model what is expected (the grammar guarantees the
    /// shape; the description helps the model fill it with the right values).
    pub fn instructions(&self) -> String {
        match self {
            Spec::JsonObject => "Answer with a single JSON object.".into(),
            Spec::JsonSchema(s) => format!(
                "Answer with a single JSON object that follows this JSON Schema:\n{}",
                serde_json::to_string(s).unwrap_or_default()
            ),
            Spec::ToolCall(tools) => {
                let mut s = String::from(
                    "Call exactly one of these functions. Answer with a JSON object {\"name\": <function name>, \"arguments\": <arguments object>}.\n",
                );
                for t in tools {
                    s.push_str(&format!(
                        "- {}: {} Parameters (JSON Schema): {}\n",
                        t.name,
                        t.description.as_deref().unwrap_or(""),
                        serde_json::to_string(&t.parameters).unwrap_or_default()
                    ));
                }
                s
            }
        }
    }
}

/// Shared per model: the token trie and llguidance's parser factory.
pub struct Grammars {
    factory: Arc<ParserFactory>,
    vocab: usize,
}

impl Grammars {
    pub fn new(tok: Arc<Tokenizer>) -> Result<Self, GrammarError> {
        let n = tok.vocab_size();
        let eos = tok.eos_id().or_else(|| tok.eot_id()).unwrap_or(0);
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                if tok.is_control(id) || tok.is_eog(id) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(tok.token_bytes(id, true));
                    w
                } else {
                    tok.token_bytes(id, false)
                }
            })
            .collect();
        let mut info = TokRxInfo::new(n as u32, eos);
        info.tok_end_of_turn = tok.eot_id();
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tok });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Trie(e.to_string()))?;
        factory.set_stderr_log_level(0);
        Ok(Self {
            factory: Arc::new(factory),
            vocab: n,
        })
    }

    /// Compiles `spec`; unsupported schema features are an error that names them.
    pub fn constraint(&self, spec: &Spec) -> Result<Constraint, GrammarError> {
        let grammar = TopLevelGrammar::from_json_schema(spec.schema());
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Unsupported(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Unsupported(e));
        }
        Constraint::spawn(matcher, self.vocab)
    }
}

/// One request's matcher, living on a helper thread. A commit is answered at once (is the grammar
/// complete?); the next mask is computed after that, while the engine runs its forward pass, and
/// picked up by the next `allowed`.
pub struct Constraint {
    tx: mpsc::Sender<u32>,
    /// Replies to commits: Ok(true) once the grammar is complete.
    state: mpsc::Receiver<Result<bool, String>>,
    masks: mpsc::Receiver<Result<Vec<u32>, String>>,
}

fn mask_words(m: &mut Matcher, vocab: usize) -> Result<Vec<u32>, String> {
    let v = m.compute_mask_or_eos().map_err(|e| e.to_string())?;
    let mut out = vec![0u32; vocab.div_ceil(32)];
    for id in 0..vocab {
        if v.is_allowed(id as u32) {
            out[id / 32] |= 1 << (id % 32);
        }
    }
    Ok(out)
}

impl Constraint {
    fn spawn(mut m: Matcher, vocab: usize) -> Result<Self, GrammarError> {
        let (tx, commits) = mpsc::channel::<u32>();
        let (tx_state, state) = mpsc::channel();
        let (tx_mask, masks) = mpsc::channel();
        std::thread::Builder::new()
            .name("porteiro-grammar".into())
            .spawn(move || {
                // The first mask right away: it overlaps the prompt's prefill.
                if tx_mask.send(mask_words(&mut m, vocab)).is_err() {
                    return;
                }
                while let Ok(t) = commits.recv() {
                    let r = m.consume_token(t).map_err(|e| e.to_string());
                    let stopped = r.as_ref().is_ok_and(|_| m.is_stopped());
                    if tx_state.send(r.map(|_| stopped)).is_err() || stopped {
                        return;
                    }
                    if tx_mask.send(mask_words(&mut m, vocab)).is_err() {
                        return;
                    }
                }
            })
            .map_err(GrammarError::Thread)?;
        Ok(Self { tx, state, masks })
    }
}

const GONE: &str = "the grammar thread stopped";

impl TokenConstraint for Constraint {
    fn allowed(&mut self) -> Result<Option<Vec<u32>>, String> {
        self.masks.recv().map_err(|_| GONE.to_string())?.map(Some)
    }

    fn commit(&mut self, token: u32) -> Result<bool, String> {
        self.tx.send(token).map_err(|_| GONE.to_string())?;
        self.state.recv().map_err(|_| GONE.to_string())?
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn tool_and_schema_specs_compile_to_schemas() {
        let t = Spec::ToolCall(vec![Tool {
            name: "get_weather".into(),
            description: Some("Weather for a city.".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }]);
        let s = t.schema();
        assert_eq!(s["properties"]["name"]["const"], "get_weather");
        assert!(t.instructions().contains("get_weather"));
        assert_eq!(Spec::JsonObject.schema()["type"], "object");
    }
}
