//! Typed PII / PHI / secret detection: the [`Detector`] runs its passes over one shared
//! [`ScanContext`](crate::context::ScanContext) and resolves the overlaps.
//!
//! The passes, in order (each reads what the passes before it found):
//!
//! 1. structured identifiers ([`crate::structured`]): secrets, e-mail addresses, card, account
//!    and national numbers, IP addresses, phones, dates of birth, record and document numbers,
//!    street addresses, honorifics; each candidate validated (check digits, octet ranges,
//!    entropy, a context word);
//! 2. persons and names ([`crate::persons`], with a first-name list);
//! 3. addresses inside sentences ([`crate::addresses::InSentences`], with a first-name list);
//! 4. quasi-identifiers ([`crate::quasi`], opt-in): dates, ages, web addresses, places, groups,
//!    honorifics, upper-case names;
//! 5. address blocks ([`crate::addresses::Blocks`]): the pieces of one address merged;
//! 6. affiliations ([`crate::affiliation`], with the quasi-identifiers): organisations and job
//!    titles, which lean on the persons and addresses found before;
//!
//! then the strongest of overlapping findings is kept ([`Category`] rank, length, position).
//!
//! The orchestrator: it imports the passes; the passes import only the bottom modules
//! ([`crate::core`], [`crate::lists`], [`crate::text`], [`crate::names`], [`crate::namewords`])
//! and the scan context, never this module nor each other.

use crate::addresses::{Blocks, InSentences};
use crate::affiliation::Affiliation;
use crate::context::{Pass, ScanContext};
use crate::persons::Persons;
use crate::quasi::Quasi;
use crate::structured::Structured;

pub use crate::core::{Category, Finding};
pub use crate::names::Names;
pub use crate::structured::{cnpj_valid, cpf_valid, iban_mod97, luhn};

/// All detectors, compiled once; `Detector` is cheap to share (`&self` scanning).
pub struct Detector {
    structured: Structured,
    persons: Persons,
    in_sentences: InSentences,
    /// Dates, ages, web addresses and places, when turned on.
    quasi: Option<Quasi>,
    blocks: Blocks,
    /// Organisations and job titles, on with the quasi-identifiers.
    affiliation: Option<Affiliation>,
    names: Option<Names>,
}

impl Detector {
    pub fn new() -> Self {
        Self {
            structured: Structured::new(),
            persons: Persons::new(),
            in_sentences: InSentences::new(),
            quasi: None,
            blocks: Blocks::new(),
            affiliation: None,
            names: None,
        }
    }

    /// Adds the quasi-identifiers: dates, ages, web addresses and places; and with them the
    /// organisations and job titles.
    pub fn with_quasi(mut self, quasi: Quasi) -> Self {
        self.quasi = Some(quasi);
        self.affiliation = Some(Affiliation::new());
        self
    }

    /// Adds person detection by a first-name list.
    pub fn with_names(mut self, names: Names) -> Self {
        self.names = Some(names);
        self
    }

    /// The passes in the order they run (see the module doc); a pass turned off does nothing.
    fn passes(&self) -> [&dyn Pass; 6] {
        [
            &self.structured,
            &self.persons,
            &self.in_sentences,
            &self.quasi,
            &self.blocks,
            &self.affiliation,
        ]
    }

    /// Every finding in `text`, sorted by start, without overlaps.
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        let mut cx = ScanContext::new(text, self.names.as_ref(), self.quasi.is_some());
        for pass in self.passes() {
            pass.run(&mut cx);
        }
        resolve(cx.found)
    }
}

impl Default for Detector {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps the strongest of overlapping candidates (rank, then length, then earliest).
fn resolve(mut cands: Vec<Finding>) -> Vec<Finding> {
    cands.sort_by(|a, b| {
        b.category
            .rank()
            .cmp(&a.category.rank())
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(a.start.cmp(&b.start))
    });
    let mut kept: Vec<Finding> = Vec::with_capacity(cands.len());
    for c in cands {
        if kept.iter().all(|k| c.end <= k.start || c.start >= k.end) {
            kept.push(c);
        }
    }
    kept.sort_by_key(|f| f.start);
    kept
}
