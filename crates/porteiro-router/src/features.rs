//! The difficulty scorer: logistic regression over the sentence embedding and a few cheap features.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::RouterError;

/// Names of the cheap features, in order (kept in the scorer file so a file from another version
/// is refused rather than misread).
pub const CHEAP: [&str; 4] = ["log_chars", "code", "math", "non_ascii"];

/// Cheap features of a request text, each roughly in [0, 1].
pub fn cheap_features(text: &str) -> [f32; 4] {
    let chars = text.chars().count().max(1);
    let log_chars = ((1 + chars) as f32).ln() / 10.0;
    let code_markers = [
        "```",
        "def ",
        "fn ",
        "#include",
        "function ",
        "class ",
        "};",
        "=>",
        "import ",
    ];
    let code = if code_markers.iter().any(|m| text.contains(m)) {
        1.0
    } else {
        0.0
    };
    let mathy = text
        .chars()
        .filter(|c| c.is_ascii_digit() || "+-*/=^<>()∑∫√π".contains(*c))
        .count();
    let math = (mathy as f32 / chars as f32 * 4.0).min(1.0);
    let non_ascii = text.chars().filter(|c| !c.is_ascii()).count() as f32 / chars as f32;
    [log_chars, code, math, non_ascii]
}

/// The input vector of the scorer: embedding then cheap features.
pub fn feature_vector(text: &str, embedding: &[f32]) -> Vec<f32> {
    let mut x = embedding.to_vec();
    x.extend_from_slice(&cheap_features(text));
    x
}

/// P(local answer is good enough) = sigmoid(w · x + b).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scorer {
    pub embedding_dim: usize,
    pub cheap: Vec<String>,
    pub weights: Vec<f32>,
    pub bias: f32,
    /// Where the scorer came from (data file, rows, held-out accuracy) for people reading it.
    #[serde(default)]
    pub trained_on: String,
}

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl Scorer {
    pub fn load(path: &Path) -> Result<Self, RouterError> {
        let err = |why: String| RouterError::Scorer {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let s: Scorer = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if s.cheap != CHEAP {
            return Err(err(format!(
                "its cheap features are {:?}, this build computes {:?}; retrain it",
                s.cheap, CHEAP
            )));
        }
        if s.weights.len() != s.embedding_dim + CHEAP.len() {
            return Err(err(format!(
                "{} weights for {} inputs",
                s.weights.len(),
                s.embedding_dim + CHEAP.len()
            )));
        }
        Ok(s)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }

    pub fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    pub fn score_features(&self, x: &[f32]) -> f32 {
        sigmoid(crate::dot(&self.weights, x) + self.bias)
    }

    pub fn score(&self, text: &str, embedding: &[f32]) -> f32 {
        self.score_features(&feature_vector(text, embedding))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn cheap_features_see_code_math_and_language() {
        let [_, code, _, _] = cheap_features("```python\ndef f(x):\n    return x\n```");
        assert_eq!(code, 1.0);
        let [_, code, math, _] = cheap_features("Solve 3x + 5 = 20 for x.");
        assert_eq!(code, 0.0);
        assert!(math > 0.3, "{math}");
        let [_, _, _, pt] = cheap_features("Extraia o endereço e a razão social");
        assert!(pt > 0.0);
        let [short, ..] = cheap_features("hi");
        let [long, ..] = cheap_features(&"word ".repeat(400));
        assert!(long > short);
    }
}
