//! Precision and recall of the detectors on a labelled corpus in presidio-evaluator's format
//! (`[{"full_text", "spans": [{"entity_type", "start_position", "end_position"}]}]`, offsets in
//! characters). A detection counts when it overlaps a gold span of the matching type.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::detect::{Category, Detector, Finding};

#[derive(Debug, Deserialize)]
pub struct Sample {
    pub full_text: String,
    pub spans: Vec<GoldSpan>,
}

#[derive(Debug, Deserialize)]
pub struct GoldSpan {
    pub entity_type: String,
    pub start_position: usize,
    pub end_position: usize,
}

pub fn read_corpus(path: &Path) -> Result<Vec<Sample>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a presidio corpus: {e}", path.display()))
}

/// The corpus's entity types each category answers for, joined by `+`.
pub fn gold_type(c: Category) -> Option<&'static str> {
    Some(match c {
        Category::Email => "EMAIL_ADDRESS",
        Category::Phone => "PHONE_NUMBER",
        Category::CreditCard => "CREDIT_CARD",
        Category::Iban => "IBAN_CODE",
        Category::UsSsn => "US_SSN",
        Category::IpAddress => "IP_ADDRESS",
        Category::Person => "PERSON",
        // A postal code is part of a postal address.
        Category::Address => "STREET_ADDRESS+ZIP_CODE",
        Category::IdNumber => "US_DRIVER_LICENSE",
        // Only dates of birth are personal data here; the corpus labels every date.
        Category::DateOfBirth => "DATE_TIME",
        Category::Url => "DOMAIN_NAME",
        Category::Date => "DATE_TIME",
        Category::Age => "AGE",
        Category::Location => "GPE",
        Category::Group => "NRP",
        Category::Title => "TITLE",
        Category::Organization => "ORGANIZATION",
        _ => return None,
    })
}

/// What a category's row compares against when the corpus has no type for it: any labelled value.
pub const ANY_TYPE: &str = "(any)";

#[derive(Debug, Clone, Serialize, Default)]
pub struct Row {
    /// Our category (or `-` for a corpus type no detector covers).
    pub category: String,
    /// The corpus type it answers for, or [`ANY_TYPE`]: then a prediction is correct when it
    /// overlaps a labelled value of any type (the name detector: people, places, organisations).
    pub gold_type: String,
    pub gold: usize,
    pub predicted: usize,
    /// Predictions overlapping a gold span of the matching type.
    pub correct: usize,
    /// Gold spans overlapped by a prediction of the matching category.
    pub found: usize,
    /// Gold spans overlapped by any prediction (what masking hides).
    pub covered: usize,
    /// Predictions that overlap no labelled value of any type (false alarms on ordinary text, as
    /// opposed to masking another kind of personal data under the wrong type).
    pub outside: usize,
}

impl Row {
    pub fn precision(&self) -> Option<f64> {
        (self.predicted > 0).then(|| self.correct as f64 / self.predicted as f64)
    }
    pub fn recall(&self) -> Option<f64> {
        (self.gold > 0).then(|| self.found as f64 / self.gold as f64)
    }
    pub fn covered_share(&self) -> Option<f64> {
        (self.gold > 0).then(|| self.covered as f64 / self.gold as f64)
    }
}

fn char_to_byte(text: &str) -> Vec<usize> {
    let mut v: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    v.push(text.len());
    v
}

/// Whether a row of corpus type(s) `row` answers for the corpus type `t`.
fn answers(row: &str, t: &str) -> bool {
    row == ANY_TYPE || row.split('+').any(|x| x == t)
}

/// The labelled spans of `s` as (type, byte range), spans outside the text or empty left out.
fn gold_spans(s: &Sample) -> Vec<(&str, (usize, usize))> {
    let pos = char_to_byte(&s.full_text);
    s.spans
        .iter()
        .filter_map(|g| {
            let (a, b) = (*pos.get(g.start_position)?, *pos.get(g.end_position)?);
            (a < b).then_some((g.entity_type.as_str(), (a, b)))
        })
        .collect()
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// One row per category with a corpus type, then one per corpus type with no detector.
pub fn evaluate(det: &Detector, corpus: &[Sample]) -> Vec<Row> {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut uncovered: BTreeMap<String, Row> = BTreeMap::new();
    for c in Category::ALL {
        rows.insert(
            c.name().to_string(),
            Row {
                category: c.name().into(),
                gold_type: gold_type(c).unwrap_or(ANY_TYPE).into(),
                ..Row::default()
            },
        );
    }
    for s in corpus {
        let gold = gold_spans(s);
        let found: Vec<Finding> = det.scan(&s.full_text);
        for f in &found {
            let Some(row) = rows.get_mut(f.category.name()) else {
                continue;
            };
            row.predicted += 1;
            if gold
                .iter()
                .any(|(t, span)| answers(&row.gold_type, t) && overlaps(*span, (f.start, f.end)))
            {
                row.correct += 1;
            }
            if !gold
                .iter()
                .any(|(_, span)| overlaps(*span, (f.start, f.end)))
            {
                row.outside += 1;
            }
        }
        for (t, span) in &gold {
            let covered = found.iter().any(|f| overlaps(*span, (f.start, f.end)));
            // Every row answering for the type counts it (date and date_of_birth share DATE_TIME).
            let mut hit: Vec<&mut Row> = rows
                .values_mut()
                .filter(|r| r.gold_type != ANY_TYPE && answers(&r.gold_type, t))
                .collect();
            if hit.is_empty() {
                hit.push(uncovered.entry(t.to_string()).or_insert_with(|| Row {
                    category: "-".into(),
                    gold_type: t.to_string(),
                    ..Row::default()
                }));
            }
            for row in hit {
                row.gold += 1;
                row.covered += covered as usize;
                if row.category != "-"
                    && found.iter().any(|f| {
                        f.category.name() == row.category && overlaps(*span, (f.start, f.end))
                    })
                {
                    row.found += 1;
                }
            }
        }
    }
    // Categories the corpus has no type for still report how often they fire (those that never do
    // are left out).
    let mut out: Vec<Row> = rows
        .into_values()
        .filter(|r| r.gold_type != ANY_TYPE || r.predicted > 0)
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.gold));
    out.extend(uncovered.into_values());
    out
}

/// A labelled value no detector masked (`missed`, with its corpus type), or a finding on no
/// labelled value (`false_alarm`, with our category).
#[derive(Debug, Clone, Serialize)]
pub struct Error {
    pub kind: &'static str,
    #[serde(rename = "type")]
    pub kind_of_value: String,
    pub value: String,
    pub text: String,
}

/// The misses and false alarms of `det` on `corpus`.
pub fn errors(det: &Detector, corpus: &[Sample]) -> Vec<Error> {
    let mut out = Vec::new();
    for s in corpus {
        let found = det.scan(&s.full_text);
        let gold = gold_spans(s);
        let error = |kind, t: &str, (a, b): (usize, usize)| Error {
            kind,
            kind_of_value: t.to_string(),
            value: s.full_text[a..b].to_string(),
            text: s.full_text.clone(),
        };
        for &(t, span) in &gold {
            if !found.iter().any(|f| overlaps(span, (f.start, f.end))) {
                out.push(error("missed", t, span));
            }
        }
        for f in &found {
            if !gold
                .iter()
                .any(|(_, span)| overlaps(*span, (f.start, f.end)))
            {
                out.push(error("false_alarm", f.category.name(), (f.start, f.end)));
            }
        }
    }
    out
}

/// A markdown table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let pct = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{:.1}%", v * 100.0));
    let mut s = String::from(concat!(
        "| category | corpus type | gold | predicted | precision | recall ",
        "| masked by any detector | on no labelled value |\n",
        "|---|---|---|---|---|---|---|---|\n",
    ));
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.category,
            r.gold_type,
            r.gold,
            r.predicted,
            pct(r.precision()),
            pct(r.recall()),
            pct(r.covered_share()),
            r.outside,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_overlaps_by_type_in_characters() {
        // "é" makes character and byte offsets differ.
        let corpus: Vec<Sample> = serde_json::from_str(
            r#"[{"full_text": "Zoé: mail zoe@example.com, card 4111 1111 1111 1111, ref 12345",
                 "spans": [{"entity_type": "EMAIL_ADDRESS", "start_position": 10, "end_position": 25},
                           {"entity_type": "PERSON", "start_position": 0, "end_position": 3},
                           {"entity_type": "CREDIT_CARD", "start_position": 32, "end_position": 51}]}]"#,
        )
        .unwrap();
        let rows = evaluate(&Detector::new(), &corpus);
        let get = |c: &str| rows.iter().find(|r| r.category == c).unwrap();
        assert_eq!(
            (get("email").gold, get("email").found, get("email").correct),
            (1, 1, 1)
        );
        assert_eq!(get("credit_card").recall(), Some(1.0));
        assert_eq!((get("person").gold, get("person").found), (1, 0));
        assert!(table(&rows)
            .contains("| email | EMAIL_ADDRESS | 1 | 1 | 100.0% | 100.0% | 100.0% | 0 |"));
    }
}
