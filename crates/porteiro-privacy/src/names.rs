//! The first-name list and the lexicon the person detector looks words up in ([`Names`]).
//!
//! Imports only the bottom modules ([`crate::lists`], [`crate::namewords`]).

use crate::lists::COMMON_WORDS;

/// A list of first names (gender-guesser's `nam_dict.txt`: ~45,000 names from many countries), and
/// optionally the lexicon of [`crate::namewords`]: name words (first and last names rare as
/// ordinary words) and the words known to English or Portuguese.
/// A listed name followed by a capitalised word, or a listed name inside a sentence, is a person;
/// a capitalised unknown word is a name.
pub struct Names {
    set: std::collections::HashSet<String>,
    words: std::collections::HashSet<String>,
    known: std::collections::HashMap<String, f32>,
    /// Whether unknown capitalised words are names ([`Category::Name`]).
    unknown_names: bool,
}

impl Names {
    /// Reads `nam_dict.txt` (a name in columns 3..29 after a gender code; `=` lines are aliases).
    pub fn from_nam_dict(text: &str) -> Self {
        let set = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('='))
            .filter_map(|l| {
                l.get(3..)
                    .map(|r| r.split("  ").next().unwrap_or("").trim())
            })
            .filter(|n| n.chars().count() >= 2 && !n.contains('+') && !n.contains(' '))
            .filter(|n| !COMMON_WORDS.contains(n))
            .map(str::to_string)
            .collect();
        Self {
            set,
            words: Default::default(),
            known: Default::default(),
            unknown_names: true,
        }
    }

    /// Whether unknown words count as names (on by default; off leaves them to the other rules).
    pub fn with_unknown_names(mut self, on: bool) -> Self {
        self.unknown_names = on;
        self
    }

    /// Adds the name words and known words (see [`crate::namewords`]).
    pub fn with_lexicon(mut self, lex: crate::namewords::Lexicon) -> Self {
        self.words = lex.name_words;
        self.known = lex.known;
        self
    }

    pub fn load(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self::from_nam_dict(&std::fs::read_to_string(path)?))
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Whether `w` is a listed first name or a name word. A capitalised word also counts when it
    /// is listed without its accents: the list has "Fabio" and not "Fábio", which as a frequent
    /// Portuguese word is no name word either. (Not in lowercase text: Vietnamese "này" is no
    /// "Nay".)
    pub fn contains(&self, w: &str) -> bool {
        self.set.contains(w)
            || self.words.contains(w)
            || (!w.is_ascii()
                && w.starts_with(char::is_uppercase)
                && self.set.contains(&fold_accents(w)))
    }

    /// Whether `w` is on the first-name list.
    pub fn is_first_name(&self, w: &str) -> bool {
        self.set.contains(w)
    }

    /// Whether `w` is a name word: rare enough as an ordinary word to count at a sentence's start.
    pub fn is_name_word(&self, w: &str) -> bool {
        self.words.contains(w)
    }

    /// Whether `w` (letters, with hyphens or apostrophes inside) is no English or Portuguese word:
    /// a part of it between hyphens and apostrophes, two letters or longer, is not a known word.
    /// Always false without a known-word list.
    pub fn is_unknown(&self, w: &str) -> bool {
        if self.known.is_empty() {
            return false;
        }
        let mut low = String::with_capacity(w.len());
        w.split(['-', '\'', '’'])
            .filter(|p| p.chars().nth(1).is_some())
            .any(|p| {
                low.clear();
                low.extend(p.chars().flat_map(char::to_lowercase));
                !self.known.contains_key(&low)
            })
    }

    /// The Zipf frequency of `w` as an English or Portuguese word (0 when unknown or without a
    /// known-word list).
    pub fn zipf(&self, w: &str) -> f32 {
        let low = w.to_lowercase();
        self.known.get(&low).copied().unwrap_or(0.0)
    }

    /// Whether `w` is unknown and unknown words count as names.
    pub(crate) fn unknown_name(&self, w: &str) -> bool {
        self.unknown_names && self.is_unknown(w)
    }

    /// Whether `w` is a common word (Zipf 5.5 or more: "me", "are", "just", "he", "here"; "john"
    /// is 5.4): where nothing but a list says it is a name (alone, or without a capital), it is
    /// taken for the word.
    pub fn is_common(&self, w: &str) -> bool {
        self.zipf(w) >= 5.5
    }
}

/// `w` without its accents ("Fábio" → "Fabio"): decomposed, combining marks dropped.
fn fold_accents(w: &str) -> String {
    use unicode_normalization::{char::is_combining_mark, UnicodeNormalization};
    w.nfd().filter(|c| !is_combining_mark(*c)).collect()
}
