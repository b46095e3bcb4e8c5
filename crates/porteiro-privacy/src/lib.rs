//! The privacy guard: what personal data a request holds ([`detect`]), how it is hidden from an
//! upstream and restored in the answer ([`mask`]), what the configuration decides ([`Policy`]), and
//! the tamper-evident record of every decision ([`audit`]). Quasi-identifiers (dates, ages, web
//! addresses, places, employers and job titles) are opt-in ([`quasi`], [`affiliation`]). No value
//! ever reaches a log or an audit record: only categories and counts.
//!
//! Modules, bottom up (each imports only those above it in this list):
//! - `core` (the shared types: [`Category`], [`Finding`], rules), `lists` (the word lists in
//!   `data/*.txt`), [`namewords`] (the name-word lexicon): import no other module of the crate;
//! - `text` (shared text helpers) and `names` ([`detect::Names`], the first-name list);
//! - `context`: the scan context the passes share, and the `Pass` trait;
//! - the passes: `structured`, `persons`, `addresses`, [`quasi`], [`affiliation`];
//! - [`detect`]: the [`Detector`], which runs the passes in order;
//! - [`mask`], [`eval`], [`audit`].

mod addresses;
pub mod affiliation;
pub mod audit;
mod context;
mod core;
pub mod detect;
pub mod eval;
mod lists;
pub mod mask;
mod names;
pub mod namewords;
mod persons;
pub mod quasi;
mod structured;
#[cfg(test)]
mod testutil;
mod text;

pub use audit::{AuditLog, AuditRecord, AuditWriter, Tamper, Verification};
pub use detect::{Category, Detector, Finding};
pub use mask::{mask_together, Masker, StreamUnmasker, Unmasker};

use serde::{Deserialize, Serialize};

/// What happens to a request holding personal data that is about to leave for an upstream tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Served by the local tier, whatever the router decided.
    #[default]
    KeepLocal,
    /// Values replaced by typed placeholders before leaving, restored in the answer.
    Mask,
    /// Refused with 400 naming the categories (never the values).
    Block,
    /// Sent as it is (explicit opt-out); still audited. The only policy that lets secrets out.
    Allow,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::KeepLocal => "keep_local",
            Policy::Mask => "mask",
            Policy::Block => "block",
            Policy::Allow => "allow",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "keep_local" => Policy::KeepLocal,
            "mask" => Policy::Mask,
            "block" => Policy::Block,
            "allow" => Policy::Allow,
            _ => return None,
        })
    }
}

/// A fingerprint of an API key for audit records: the first 12 hex digits of its SHA-256.
pub fn key_id(key: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    match key {
        None => "anonymous".into(),
        Some(k) => Sha256::digest(k.as_bytes())[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}
