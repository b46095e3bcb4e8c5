//! BERT's WordPiece tokenizer, read from a Hugging Face `tokenizer.json`: the BertNormalizer (clean
//! text, pad CJK characters, lowercase and strip accents), the BertPreTokenizer (split on whitespace and
//! punctuation) and greedy longest-match-first WordPiece with the `##` continuation prefix.

use std::collections::HashMap;
use std::path::Path;

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

#[derive(Debug, thiserror::Error)]
pub enum WordPieceError {
    #[error("{path}: {why}")]
    Read { path: String, why: String },
    #[error("tokenizer.json: model type is `{0}`, expected WordPiece")]
    NotWordPiece(String),
    #[error("tokenizer.json: the vocabulary has no `{0}` token")]
    MissingToken(&'static str),
}

#[derive(Debug)]
pub struct WordPiece {
    vocab: HashMap<String, u32>,
    pub cls: u32,
    pub sep: u32,
    unk: u32,
    lowercase: bool,
    strip_accents: bool,
    max_chars_per_word: usize,
    prefix: String,
}

impl WordPiece {
    pub fn from_file(path: &Path) -> Result<Self, WordPieceError> {
        let read = |why: String| WordPieceError::Read {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| read(e.to_string()))?;
        Self::from_json(&v).map_err(|e| match e {
            WordPieceError::Read { why, .. } => read(why),
            e => e,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Self, WordPieceError> {
        let bad = |why: &str| WordPieceError::Read {
            path: "tokenizer.json".into(),
            why: why.into(),
        };
        let model = &v["model"];
        let kind = model["type"].as_str().unwrap_or("");
        if kind != "WordPiece" {
            return Err(WordPieceError::NotWordPiece(kind.into()));
        }
        let vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("model.vocab is not an object"))?
            .iter()
            .map(|(k, id)| {
                Ok((
                    k.clone(),
                    id.as_u64()
                        .ok_or_else(|| bad("a vocab id is not a number"))?
                        as u32,
                ))
            })
            .collect::<Result<_, WordPieceError>>()?;
        let id = |t: &'static str| vocab.get(t).copied().ok_or(WordPieceError::MissingToken(t));
        let norm = &v["normalizer"];
        let lowercase = norm["lowercase"].as_bool().unwrap_or(true);
        // BertNormalizer: strip_accents null follows lowercase.
        let strip_accents = norm["strip_accents"].as_bool().unwrap_or(lowercase);
        Ok(Self {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            unk: vocab
                .get(model["unk_token"].as_str().unwrap_or("[UNK]"))
                .copied()
                .ok_or(WordPieceError::MissingToken("[UNK]"))?,
            max_chars_per_word: model["max_input_chars_per_word"].as_u64().unwrap_or(100) as usize,
            prefix: model["continuing_subword_prefix"]
                .as_str()
                .unwrap_or("##")
                .to_string(),
            vocab,
            lowercase,
            strip_accents,
        })
    }

    /// Token ids of `text` without [CLS]/[SEP].
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let norm = self.normalize(text);
        let mut ids = Vec::new();
        for word in pre_tokenize(&norm) {
            self.word_pieces(word, &mut ids);
        }
        ids
    }

    fn normalize(&self, text: &str) -> String {
        let mut s = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\0' || c == '\u{fffd}' || is_control(c) {
                continue;
            }
            if is_cjk(c) {
                s.push(' ');
                s.push(c);
                s.push(' ');
            } else if c.is_whitespace() {
                s.push(' ');
            } else {
                s.push(c);
            }
        }
        if self.strip_accents {
            s = s.nfd().filter(|&c| !is_combining_mark(c)).collect();
        }
        if self.lowercase {
            s = s.to_lowercase();
        }
        s
    }

    fn word_pieces(&self, word: &str, out: &mut Vec<u32>) {
        if word.chars().count() > self.max_chars_per_word {
            out.push(self.unk);
            return;
        }
        let start_len = out.len();
        let mut start = 0;
        let mut piece = String::new();
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while end > start {
                piece.clear();
                if start > 0 {
                    piece.push_str(&self.prefix);
                }
                piece.push_str(&word[start..end]);
                if let Some(&id) = self.vocab.get(&piece) {
                    found = Some(id);
                    break;
                }
                end = word[..end]
                    .char_indices()
                    .next_back()
                    .map_or(start, |(i, _)| i);
            }
            match found {
                Some(id) => {
                    out.push(id);
                    start = end;
                }
                None => {
                    out.truncate(start_len);
                    out.push(self.unk);
                    return;
                }
            }
        }
    }
}

/// Whitespace-separated words, each punctuation character a word of its own.
fn pre_tokenize(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for w in s.split_whitespace() {
        let mut from = 0;
        for (i, c) in w.char_indices() {
            if is_punctuation(c) {
                if i > from {
                    out.push(&w[from..i]);
                }
                out.push(&w[i..i + c.len_utf8()]);
                from = i + c.len_utf8();
            }
        }
        if from < w.len() {
            out.push(&w[from..]);
        }
    }
    out
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    // Cc plus the common format characters (Cf).
    c.is_control()
        || matches!(c, '\u{00ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}')
}

/// ASCII punctuation and symbols (as BERT treats them), plus the Unicode punctuation blocks
/// (Latin-1 marks, General Punctuation, CJK and full-width punctuation).
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c,
            '\u{00a1}' | '\u{00a7}' | '\u{00ab}' | '\u{00b6}' | '\u{00b7}' | '\u{00bb}' | '\u{00bf}'
            | '\u{037e}' | '\u{0387}' | '\u{055a}'..='\u{055f}' | '\u{0589}' | '\u{05be}' | '\u{060c}'
            | '\u{061b}' | '\u{061f}' | '\u{06d4}' | '\u{0964}' | '\u{0965}'
            | '\u{2010}'..='\u{2027}' | '\u{2030}'..='\u{2043}' | '\u{2045}'..='\u{2051}'
            | '\u{2053}'..='\u{205e}' | '\u{2e00}'..='\u{2e4f}' | '\u{3001}'..='\u{3003}'
            | '\u{3008}'..='\u{3011}' | '\u{3014}'..='\u{301f}' | '\u{30fb}'
            | '\u{ff01}'..='\u{ff03}' | '\u{ff05}'..='\u{ff0a}' | '\u{ff0c}'..='\u{ff0f}'
            | '\u{ff1a}' | '\u{ff1b}' | '\u{ff1f}' | '\u{ff20}' | '\u{ff3b}'..='\u{ff3d}' | '\u{ff3f}'
            | '\u{ff5b}' | '\u{ff5d}' | '\u{ff5f}'..='\u{ff65}')
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> WordPiece {
        let vocab: Vec<&str> = vec![
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "!", "un", "##aff", "##able",
            ",", "cafe", "中",
        ];
        let v = serde_json::json!({
            "normalizer": {"type": "BertNormalizer", "lowercase": true, "strip_accents": null},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100,
                      "vocab": vocab.iter().enumerate().map(|(i, t)| (t.to_string(), i)).collect::<HashMap<_, _>>()}
        });
        WordPiece::from_json(&v).unwrap()
    }

    #[test]
    fn splits_punctuation_lowercases_and_strips_accents() {
        let t = tiny();
        assert_eq!(t.encode("Hello, WORLD!"), vec![4, 10, 5, 6]);
        assert_eq!(t.encode("Café"), vec![11]);
        assert_eq!(t.encode("x中y"), vec![1, 12, 1]);
    }

    #[test]
    fn greedy_longest_match_with_continuation_prefix() {
        let t = tiny();
        assert_eq!(t.encode("unaffable"), vec![7, 8, 9]);
        // A word with an unknown piece becomes a single [UNK].
        assert_eq!(t.encode("unaffz hello"), vec![1, 4]);
    }
}
