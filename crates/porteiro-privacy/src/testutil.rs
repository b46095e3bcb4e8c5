//! What the tests of several passes share: the default detector's findings, and detectors with
//! small first-name lists and lexicons.

use crate::detect::{Detector, Names};
use crate::Category;

/// What the default detector (no first-name list, no quasi-identifiers) finds in `text`.
pub(crate) fn found(text: &str) -> Vec<(Category, String)> {
    Detector::new()
        .scan(text)
        .into_iter()
        .map(|f| (f.category, f.value(text).to_string()))
        .collect()
}

pub(crate) fn has(text: &str, c: Category, v: &str) {
    let f = found(text);
    assert!(
        f.iter().any(|(k, x)| *k == c && x == v),
        "{c:?} {v:?} not found in {text:?}: {f:?}"
    );
}

pub(crate) fn none_of(text: &str, c: Category) {
    let f = found(text);
    assert!(
        f.iter().all(|(k, _)| *k != c),
        "{c:?} wrongly found in {text:?}: {f:?}"
    );
}

/// The values of category `c` that `det` finds in `text`.
pub(crate) fn of(det: &Detector, text: &str, c: Category) -> Vec<String> {
    det.scan(text)
        .into_iter()
        .filter(|f| f.category == c)
        .map(|f| f.value(text).to_string())
        .collect()
}

/// Three first names (Mark, Nicole, Fabio) and one name word (Christiansen); no known words.
pub(crate) fn sentence_start_detector() -> Detector {
    let names = Names::from_nam_dict(concat!(
        "M  Mark                        1\nF  Nicole                      1\nM  F",
        "abio                       1\n",
    ))
    .with_lexicon(crate::namewords::Lexicon {
        name_words: ["Christiansen".to_string()].into(),
        known: Default::default(),
    });
    Detector::new().with_names(names)
}

/// First names (some of them common words: Will, Are, To, You), one name word
/// (Christiansen) and a few known words, the common ones at Zipf 6 and the others at 3.
pub(crate) fn lexicon_detector() -> Detector {
    let known = [
        "the", "had", "given", "his", "address", "is", "from", "we", "met", "at", "noon", "early",
        "work", "by", "my", "name", "they", "and", "what", "a", "wife", "remember", "me", "will",
        "are", "you", "just", "he", "on", "redeem", "to", "tales", "i", "between", "lives",
        "bulgak", "leverett", "unlike", "castro", "novel", "windows", "version", "frank", "freud",
        "support", "in", "it", "ran", "can", "help", "focuses", "class", "file", "today",
    ];
    let common = [
        "the", "is", "and", "a", "me", "are", "you", "to", "on", "he", "my", "i", "windows",
        "today",
    ];
    let names = Names::from_nam_dict(concat!(
        "M  Mark                        1\nF  Nicole                      1\nM  A",
        "dam                        1\nF  Donna                       1\nM  Brian",
        "                       1\nF  Danielle                    1\nM  Will     ",
        "                   1\nM  Are                         1\nM  To           ",
        "               1\nM  Frank                       1\nM  Hi               ",
        "           1\nM  Tab                         1\nM  You                  ",
        "       1\nM  File                        1\n",
    ))
    .with_lexicon(crate::namewords::Lexicon {
        name_words: ["Christiansen".to_string()].into(),
        known: known
            .iter()
            .map(|w| (w.to_string(), if common.contains(w) { 6.0 } else { 3.0 }))
            .collect(),
    });
    Detector::new().with_names(names)
}
