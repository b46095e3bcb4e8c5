//! The state one scan shares between the detector's passes ([`ScanContext`]), and what a pass is
//! ([`Pass`]).
//!
//! Imports only the bottom modules ([`crate::core`], [`crate::names`]).

use std::cell::OnceCell;

use crate::core::Finding;
use crate::names::Names;

/// What the passes of one scan share: the text and what is known of it, and the findings so far.
/// Each pass reads the findings of the passes before it and appends its own (the last merges
/// some); the order of the findings is kept, as overlaps are resolved in it at the end.
pub(crate) struct ScanContext<'a> {
    pub(crate) text: &'a str,
    /// The text has no capital at all, so capitals give no hint of a name.
    pub(crate) all_lower: bool,
    /// The first-name list and lexicon, when person detection is on.
    pub(crate) names: Option<&'a Names>,
    /// Whether the quasi-identifiers are on (the person pass then also reports job titles).
    pub(crate) quasi: bool,
    /// The text's lines, found once for the passes that look at lines.
    pub(crate) lines: Lines,
    /// The candidates found so far, overlapping, in the order the passes found them.
    pub(crate) found: Vec<Finding>,
}

impl<'a> ScanContext<'a> {
    pub(crate) fn new(text: &'a str, names: Option<&'a Names>, quasi: bool) -> Self {
        Self {
            text,
            all_lower: no_capitals(text),
            names,
            quasi,
            lines: Lines::default(),
            found: Vec::new(),
        }
    }
}

/// One step of a scan: reads the context and appends (or merges) findings.
pub(crate) trait Pass {
    fn run(&self, cx: &mut ScanContext);
}

/// A pass that is turned off does nothing.
impl<P: Pass> Pass for Option<P> {
    fn run(&self, cx: &mut ScanContext) {
        if let Some(p) = self {
            p.run(cx);
        }
    }
}

/// The text's [`content_lines`], found on first use.
#[derive(Default)]
pub(crate) struct Lines(OnceCell<Vec<(usize, usize)>>);

impl Lines {
    /// The lines of `text` (the scan's text: the same every call).
    pub(crate) fn get(&self, text: &str) -> &[(usize, usize)] {
        self.0.get_or_init(|| content_lines(text))
    }
}

/// Whether `text` has no capital letter at all (so capitals give no hint of a name).
fn no_capitals(text: &str) -> bool {
    !text.chars().any(char::is_uppercase)
}

/// The non-empty lines of `text` as byte ranges, without quote marks and bullets in front
/// (">", "???", "-", "*") or spaces around.
pub(crate) fn content_lines(text: &str) -> Vec<(usize, usize)> {
    let mut lines = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end();
        let lead = body.len()
            - body
                .trim_start_matches(|c: char| {
                    c.is_whitespace() || matches!(c, '>' | '?' | '-' | '*' | '•')
                })
                .len();
        if lead < body.len() {
            lines.push((at + lead, at + body.len()));
        }
        at += line.len();
    }
    lines
}
