//! S2, curation: what of the logged teacher traffic a student may learn from.
//!
//! Rules, in this order (each dropped item counted under its reason):
//! 1. `truncated` (`finish_reason: length`), `filtered` (`content_filter`), `empty` (no text and no
//!    call), `no_user_message`: an answer that is cut, withheld or about nothing teaches nothing.
//! 2. `conversation`: two or more user turns with neither tools nor a response schema. That is a
//!    person chatting; agents and API callers send one turn, or bind the answer to tools or a schema.
//!    (Tool results come back as `tool` messages, so an agent's loop stays one user turn.)
//! 3. `duplicate`: the same request (canonical JSON) as an earlier item.
//! 4. `near_duplicate`: same structure (system-prompt template, tools, schema) and a query whose
//!    embedding has cosine ≥ `near_cosine` with an earlier kept item's.
//! 5. Personal data: every string of the request and the answer masked by one masker, so a value has
//!    the same placeholder in both (the collector already masked what left under `mask`; this also
//!    covers samples taken under `allow`).

use std::collections::{BTreeMap, HashMap, HashSet};

use porteiro_privacy::Detector;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::item::Item;

#[derive(Debug, Clone)]
pub struct CurateOptions {
    /// Cosine at or above which two queries of one structure are the same task instance.
    pub near_cosine: f32,
}

impl Default for CurateOptions {
    fn default() -> Self {
        Self { near_cosine: 0.97 }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CurateReport {
    pub input: usize,
    pub kept: usize,
    /// Reason → items dropped for it.
    pub dropped: BTreeMap<&'static str, usize>,
    /// Kept items in which personal data was masked.
    pub masked_items: usize,
    /// Category → values masked.
    pub masked: BTreeMap<String, usize>,
}

/// Why an item is unfit on its own (rules 1–2), if it is.
pub fn unfit(i: &Item) -> Option<&'static str> {
    match i.finish_reason.as_deref() {
        Some("length") => return Some("truncated"),
        Some("content_filter") => return Some("filtered"),
        _ => {}
    }
    let calls = i.answer["tool_calls"]
        .as_array()
        .is_some_and(|c| !c.is_empty());
    if !calls && i.answer_text().trim().is_empty() {
        return Some("empty");
    }
    if i.query().trim().is_empty() {
        return Some("no_user_message");
    }
    if i.user_turns() >= 2 && i.tool_names().is_empty() && !i.schema_bound() {
        return Some("conversation");
    }
    None
}

fn request_hash(i: &Item) -> [u8; 32] {
    // Keys sorted: clients may order a body's fields differently.
    fn canon(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(o) => {
                let m: BTreeMap<_, _> = o.iter().map(|(k, x)| (k.clone(), canon(x))).collect();
                serde_json::to_value(m).unwrap_or_default()
            }
            serde_json::Value::Array(a) => a.iter().map(canon).collect(),
            x => x.clone(),
        }
    }
    Sha256::digest(canon(&i.request).to_string().as_bytes()).into()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-12)
}

/// Curates `items` (oldest first). `embed` turns queries into vectors (the router's encoder);
/// `detector` masks personal data (None: leave texts as they are).
pub fn curate(
    items: Vec<Item>,
    embed: &mut dyn FnMut(&[String]) -> Vec<Vec<f32>>,
    detector: Option<&Detector>,
    opts: &CurateOptions,
) -> (Vec<Item>, CurateReport) {
    let mut report = CurateReport {
        input: items.len(),
        ..Default::default()
    };
    let mut seen = HashSet::new();
    let mut fit = Vec::new();
    for i in items {
        let why = unfit(&i).or_else(|| (!seen.insert(request_hash(&i))).then_some("duplicate"));
        match why {
            Some(w) => *report.dropped.entry(w).or_default() += 1,
            None => fit.push(i),
        }
    }
    let queries: Vec<String> = fit.iter().map(Item::query).collect();
    let vecs = if queries.is_empty() {
        Vec::new()
    } else {
        embed(&queries)
    };
    // Kept embeddings per structure: near duplicates only within one task's frame.
    let mut kept_by: HashMap<String, Vec<usize>> = HashMap::new();
    let mut out = Vec::new();
    for (n, i) in fit.into_iter().enumerate() {
        let group = kept_by.entry(i.structure()).or_default();
        if group
            .iter()
            .any(|&k| cosine(&vecs[k], &vecs[n]) >= opts.near_cosine)
        {
            *report.dropped.entry("near_duplicate").or_default() += 1;
            continue;
        }
        group.push(n);
        out.push(i);
    }
    if let Some(d) = detector {
        for i in &mut out {
            let counts = porteiro_privacy::mask_together(d, &mut [&mut i.request, &mut i.answer]);
            if !counts.is_empty() {
                report.masked_items += 1;
            }
            for (c, n) in counts {
                *report.masked.entry(c.label().to_string()).or_default() += n;
            }
        }
    }
    report.kept = out.len();
    (out, report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn user(q: &str) -> Value {
        json!({"messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": q}]})
    }

    /// A bag-of-letters embedding: equal texts are identical, different ones are not.
    fn embed(qs: &[String]) -> Vec<Vec<f32>> {
        qs.iter()
            .map(|q| {
                let mut v = vec![0f32; 27];
                for c in q.to_lowercase().chars() {
                    let k = if c.is_ascii_lowercase() {
                        (c as u8 - b'a') as usize
                    } else {
                        26
                    };
                    v[k] += 1.0;
                }
                v
            })
            .collect()
    }

    #[test]
    fn each_rule_drops_what_it_says_and_masks_consistently() {
        let a = json!({"role": "assistant", "content": "billing"});
        let chat = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "tell me a joke"}]});
        let items = vec![
            Item::test(
                "ok",
                user("Refund to ana@example.com please"),
                json!({"content": "Sent to ana@example.com"}),
                "stop",
            ),
            Item::test("cut", user("b"), a.clone(), "length"),
            Item::test("empty", user("c"), json!({"content": ""}), "stop"),
            Item::test("chat", chat, a.clone(), "stop"),
            Item::test(
                "dup",
                user("Refund to ana@example.com please"),
                a.clone(),
                "stop",
            ),
            Item::test(
                "near",
                user("refund to ANA@example.com please"),
                a.clone(),
                "stop",
            ),
            Item::test("other", user("Where is my parcel?"), a.clone(), "stop"),
        ];
        let det = Detector::new();
        let (kept, r) = curate(items, &mut embed, Some(&det), &CurateOptions::default());
        let ids: Vec<&str> = kept.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["ok", "other"]);
        assert_eq!(r.input, 7);
        assert_eq!(r.kept, 2);
        for (k, n) in [
            ("truncated", 1),
            ("empty", 1),
            ("conversation", 1),
            ("duplicate", 1),
            ("near_duplicate", 1),
        ] {
            assert_eq!(r.dropped.get(k), Some(&n), "{k}: {:?}", r.dropped);
        }
        assert_eq!(kept[0].query(), "Refund to [EMAIL_1] please");
        assert_eq!(kept[0].answer_text(), "Sent to [EMAIL_1]");
        assert_eq!(r.masked_items, 1);
    }

    #[test]
    fn an_agent_loop_with_tool_results_is_not_a_conversation() {
        let req = json!({"messages": [{"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "3C"}, {"role": "user", "content": "and Bergen?"}],
            "tools": [{"type": "function", "function": {"name": "w"}}]});
        assert_eq!(
            unfit(&Item::test("a", req, json!({"content": "4C"}), "stop")),
            None
        );
        let (kept, r) = curate(Vec::new(), &mut embed, None, &CurateOptions::default());
        assert!(kept.is_empty() && r.input == 0);
    }
}
