//! Text helpers more than one pass uses: where a job title starts ([`title_start`]) and the words
//! before a position ([`words_before`]).
//!
//! Imports only the bottom module [`crate::lists`].

use crate::lists::NOT_IN_TITLES;

/// Where the title in `v` starts once leading function words are dropped ("on Certified nursing
/// assistant"); `None` when one is left inside ("sure the teacher" is no title).
pub(crate) fn title_start(v: &str) -> Option<usize> {
    let function = |w: &str| NOT_IN_TITLES.contains(&w.to_lowercase().as_str());
    let mut rest = v.trim_start();
    while let Some(w) = rest.split_whitespace().next().filter(|w| function(w)) {
        rest = rest[w.len()..].trim_start();
    }
    let words: Vec<&str> = rest.split_whitespace().collect();
    (!words.is_empty() && !words[..words.len() - 1].iter().any(|w| function(w)))
        .then(|| v.len() - rest.len())
}

/// Where the `n` words (letters, hyphens, apostrophes; one space or tab apart) before `at` start,
/// or fewer if the line, a punctuation mark or the text comes first.
pub(crate) fn words_before(text: &str, at: usize, n: usize) -> usize {
    let mut from = at;
    for _ in 0..n {
        let head = &text[..from];
        let Some(gap) = head.strip_suffix([' ', '\t']) else {
            break;
        };
        let word =
            gap.trim_end_matches(|c: char| c.is_alphabetic() || matches!(c, '-' | '\'' | '’'));
        if word.len() == gap.len() {
            break;
        }
        from = word.len();
    }
    from
}
