//! Street addresses beyond the structured rules: a place and a postal code inside a sentence, and
//! in a text without capitals a street between two numbers (with a first-name list, which knows
//! which words are no known words); then the merges that make one address of its pieces (a
//! building number before it, pieces apart only by spaces or commas, the postal code and the town
//! lines closing an address block).
//!
//! Imports only the bottom modules and the scan context.

use regex::Regex;

use crate::context::{Pass, ScanContext};
use crate::core::{regex, Category, Finding};
use crate::namewords;

/// Postal codes: "62488", "53-320", "340 12", "3610-114", Canada's "B0J 2H0", the UK's "SW1A 1AA".
const POSTAL: &str =
    r"\d{2,5}(?:[ \-]\d{2,4})?|[A-Z]\d[A-Z] ?\d[A-Z]\d|[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}";

/// Addresses found inside sentences with the help of the first-name list's lexicon (the pass after
/// the persons).
pub(crate) struct InSentences {
    /// "in ⟨place⟩ ⟨postal code⟩" inside a sentence.
    place_postal: Regex,
    /// Number, lowercase words, number: a street in a text without capitals.
    lower_address: Regex,
}

impl InSentences {
    pub(crate) fn new() -> Self {
        Self {
            place_postal: regex(concat!(
                r"(?-u:\b)(?:in|at|from|near|em|de|of)[ \t]+((?:[\p{L}'’.\-]+[ \t]+){1,4}?",
                r")(\d{5}-\d{3}|\d{4}-\d{3}|\d{3} \d{2}|\d{4,5})(?-u:\b)",
            )),
            lower_address: regex(
                r"(?-u:\b)\d{1,6}[ \t]+((?:[\p{Ll}'.\-]+[ \t]+){1,4})\d{1,5}[a-z]?(?-u:\b)",
            ),
        }
    }
}

impl Pass for InSentences {
    /// Nothing without a first-name list.
    fn run(&self, cx: &mut ScanContext) {
        let Some(names) = cx.names else {
            return;
        };
        let (text, all_lower) = (cx.text, cx.all_lower);
        let cands = &mut cx.found;
        // A place and a postal code inside a sentence ("in Bjert 6091", "in Quinta de São
        // Tiago 3610-114"): the place must hold a word that is no known word or a name word,
        // or be two or more words in capitals ("in CABBAGE TREE CREEK 1421"), so "in Windows
        // 2000" is not one.
        let mut at = 0;
        while let Some(c) = self.place_postal.captures_at(text, at) {
            let (Some(place), Some(code)) = (c.get(1), c.get(2)) else {
                break;
            };
            let after = &text[code.end()..];
            let words: Vec<&str> = place.as_str().split_whitespace().collect();
            let shaped = words.iter().all(|w| {
                all_lower
                    || w.starts_with(char::is_uppercase)
                    || matches!(*w, "de" | "da" | "do" | "dos" | "das" | "di" | "del" | "la")
            });
            let mut cap = String::new();
            let evidence = words.iter().any(|w| {
                let w = w.trim_matches(|c: char| !c.is_alphabetic());
                cap.clear();
                namewords::push_capitalised(&mut cap, w);
                w.chars().nth(2).is_some() && (names.is_unknown(w) || names.contains(&cap))
            }) || (words.len() >= 2
                && words.iter().all(|w| {
                    w.chars().filter(|c| c.is_alphabetic()).count() >= 3
                        && !w.chars().any(char::is_lowercase)
                }));
            // A year is no postal code here ("from April 2020").
            let year = code.len() == 4 && matches!(code.as_str().parse::<u16>(), Ok(1900..=2099));
            let number_goes_on = year
                || after.starts_with('%')
                || (after.starts_with(['.', ','])
                    && after[1..].starts_with(|c: char| c.is_ascii_digit()));
            if shaped && evidence && !number_goes_on {
                cands.push(Finding {
                    category: Category::Address,
                    start: place.start(),
                    end: code.end(),
                });
                at = code.end();
            } else {
                at = place.start();
            }
        }
        if all_lower {
            // Without capitals: a building number, words of which one is no known word, and a
            // number ("255 hersnapvej 18"; not "between 10 and 20").
            for c in self.lower_address.captures_iter(text) {
                let street = c.get(1).map_or("", |g| g.as_str());
                if street.split_whitespace().any(|w| {
                    let w = w.trim_matches(|c: char| !c.is_alphabetic());
                    w.chars().nth(3).is_some() && names.is_unknown(w)
                }) {
                    let Some(m) = c.get(0) else {
                        continue;
                    };
                    cands.push(Finding {
                        category: Category::Address,
                        start: m.start(),
                        end: m.end(),
                    });
                }
            }
        }
    }
}

/// The merges that make one address of its pieces (the pass after the quasi-identifiers).
pub(crate) struct Blocks {
    /// A place name and a postal code ending a line.
    postal_line: Regex,
    /// A postal code alone on its line.
    postal_alone: Regex,
}

impl Blocks {
    pub(crate) fn new() -> Self {
        Self {
            postal_alone: regex(&format!(r"(?m)^[ \t>]*({POSTAL})[ \t]*$")),
            postal_line: regex(&format!(
                concat!(
                    r"(?m)\p{{L}}[\p{{L}}.\-]+(?:[ \t]+\([\p{{L}} ]+\))?,?[ \t]+((?:[A-Z]{{2,3",
                    r"}}[ \t]+)?(?:{POSTAL}))[ \t]*$",
                ),
                POSTAL = POSTAL
            )),
        }
    }
}

impl Pass for Blocks {
    fn run(&self, cx: &mut ScanContext) {
        let text = cx.text;
        let cands = std::mem::take(&mut cx.found);
        let mut cands = cands;
        // A building number just before an address is part of it ("233 Erzsébet tér 19.").
        for f in cands.iter_mut().filter(|f| f.category == Category::Address) {
            let head = text[..f.start].trim_end_matches([' ', '\t']);
            let num = head.trim_end_matches(|c: char| c.is_ascii_digit());
            if head.len() < f.start
                && (1..=6).contains(&(head.len() - num.len()))
                && !num.chars().next_back().is_some_and(char::is_alphanumeric)
            {
                f.start = num.len();
            }
        }
        // Pieces of one address that overlap or are apart only by spaces, line breaks or commas are
        // one address ("3482 Via Franscini 71" + "Suite 838").
        cands.sort_by_key(|f| (f.category != Category::Address, f.start));
        let mut merged: Vec<Finding> = Vec::with_capacity(cands.len());
        for f in cands {
            match merged.last_mut() {
                Some(m)
                    if m.category == Category::Address
                        && f.category == Category::Address
                        && text[m.end..f.start.max(m.end)]
                            .chars()
                            .all(|c| c.is_whitespace() || c == ',') =>
                {
                    m.end = m.end.max(f.end);
                }
                _ => merged.push(f),
            }
        }
        let mut cands = merged;
        // A postal code ending a line that names a place ("Estonia 62488", "Wrocław 53-320"), or
        // alone on its line, in a text that holds a street address: the last line of an address
        // block.
        if cands.iter().any(|f| f.category == Category::Address) {
            for c in self
                .postal_line
                .captures_iter(text)
                .chain(self.postal_alone.captures_iter(text))
            {
                if let Some(g) = c.get(1) {
                    cands.push(Finding {
                        category: Category::Address,
                        start: g.start(),
                        end: g.end(),
                    });
                }
            }
        }
        extend_address_blocks(text, &mut cands);
        cx.found = cands;
    }
}

/// The lines between two pieces of one address block are part of it: the town and region lines
/// of "28245 Puruntie 82 Apt. 595 / LAPPEENRANTA / SK / 53650", or "Aalborg" before "NO 9100". Up
/// to three short lines (four words at most, no label).
fn extend_address_blocks(text: &str, cands: &mut Vec<Finding>) {
    let mut addresses: Vec<(usize, usize)> = cands
        .iter()
        .filter(|f| f.category == Category::Address)
        .map(|f| (f.start, f.end))
        .collect();
    addresses.sort_unstable();
    let short = |l: &str| {
        let l = l.trim();
        l.split_whitespace().count() <= 4
            && l.len() <= 40
            && !l.contains([':', '?', '!', ';'])
            && !l.ends_with('.')
    };
    // Chains of pieces that overlap or are apart only by such lines.
    let mut chain: Option<(usize, usize, bool)> = None;
    for (s, e) in addresses {
        chain = match chain {
            Some((cs, ce, grew)) if s <= ce => Some((cs, ce.max(e), grew)),
            Some((cs, ce, grew)) => {
                let gap = &text[ce..s];
                let lines = gap.split('\n').count();
                if (2..=4).contains(&lines) && gap.split('\n').all(short) {
                    Some((cs, e, true))
                } else {
                    if grew {
                        cands.push(Finding {
                            category: Category::Address,
                            start: cs,
                            end: ce,
                        });
                    }
                    Some((s, e, false))
                }
            }
            None => Some((s, e, false)),
        };
    }
    if let Some((s, e, true)) = chain {
        cands.push(Finding {
            category: Category::Address,
            start: s,
            end: e,
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::{has, lexicon_detector, none_of, of};
    use crate::Category;

    /// A building number, the street's name and its number, ending the line or a clause.
    #[test]
    fn continental_order_behind_a_building_number() {
        has(
            "Kevin had given Alma his address: 5049 Harjukuja 54, SEINÄJOKI",
            Category::Address,
            "5049 Harjukuja 54",
        );
        has(
            "Tilly lives at 10252 Μεγάλη Άμμος 184\n",
            Category::Address,
            "10252 Μεγάλη Άμμος 184",
        );
    }

    #[test]
    fn pieces_of_one_address_are_one_finding() {
        // Pieces of one address are one finding.
        has(
            "Billing: 3482 Via Franscini 71 Suite 838\nTujetsch",
            Category::Address,
            "3482 Via Franscini 71 Suite 838",
        );
    }

    #[test]
    fn us_military_addresses() {
        has(
            "Meet me at PSC 1437, Box 3833\nAPO AA 66791",
            Category::Address,
            "PSC 1437, Box 3833\nAPO AA 66791",
        );
        has(
            "Ship to USNS Lopez FPO AE 12345.",
            Category::Address,
            "USNS Lopez FPO AE 12345",
        );
    }

    #[test]
    fn two_building_numbers_before_a_street() {
        // Two building numbers, and the postal code closing an address block (only with an address).
        has(
            "The restaurant is at 17151 2450 Crown St",
            Category::Address,
            "17151 2450 Crown St",
        );
    }

    /// The town and region lines between pieces of an address are part of it; a sentence between is
    /// not (the postal code alone still closes the block).
    #[test]
    fn address_blocks_take_their_town_and_region_lines() {
        // The town and region lines between are part of the block; a sentence between is not.
        has(
            "William Hughes\n\n20789 Allika 46\nSuite 501\nRiisa\n\nEstonia 62488",
            Category::Address,
            "20789 Allika 46\nSuite 501\nRiisa\n\nEstonia 62488",
        );
        has(
            "Billing: 28245 Puruntie 82 Apt. 595\n   LAPPEENRANTA\n    SK\n    53650",
            Category::Address,
            "28245 Puruntie 82 Apt. 595\n   LAPPEENRANTA\n    SK\n    53650",
        );
        has(
            "Mrs. Barbara Yudina Apt. 675 62314 Mellemvej 32\nAalborg NO 9100",
            Category::Address,
            "Apt. 675 62314 Mellemvej 32\nAalborg NO 9100",
        );
        has(
            concat!(
                "Send it to 17151 2450 Crown St.\nWe will all be there by the end of the ",
                "week.\nEstonia 62488",
            ),
            Category::Address,
            "62488",
        );
    }

    #[test]
    fn street_words_before_the_name_and_post_boxes() {
        // Street words before the name, a building number before a found address, post boxes, a
        // postal code after a lowercase place.
        has(
            "The bus drops you off at 8116 56 rue La Boétie St.",
            Category::Address,
            "8116 56 rue La Boétie St.",
        );
        has(
            "Ken N. Fukuda\n\n3037 ul. Północna 73\n Apt. 946",
            Category::Address,
            "3037 ul. Północna 73\n Apt. 946",
        );
        has(
            "The bus station is on P.O. Box 104",
            Category::Address,
            "P.O. Box 104",
        );
        has(
            "688 Rue du Centre 320\napt. 169\nbelgium 97466",
            Category::Address,
            "688 Rue du Centre 320\napt. 169\nbelgium 97466",
        );
    }

    #[test]
    fn postal_codes_labelled_or_closing_a_block() {
        // Postal codes: labelled, or alone on the last line of an address block.
        has("ZIP: 394 13", Category::Address, "394 13");
        has("my zip code is 35350", Category::Address, "35350");
        has("CEP: 01310-100", Category::Address, "01310-100");
        has(
            "Billing: 03262 2437 Main St Suite 442\n   Mill Village\n    NS\n    B0J 2H0",
            Category::Address,
            "03262 2437 Main St Suite 442\n   Mill Village\n    NS\n    B0J 2H0",
        );
    }

    #[test]
    fn counts_years_and_versions_are_no_addresses() {
        none_of("Total\n 2024", Category::Address);
        none_of("Upgrade to Windows 2000\nor Office 2019", Category::Address);
        none_of("We sent 3 via email and 2 by post.", Category::Address);
        none_of("I bought 3 Apples for 4.", Category::Address);
        none_of(
            "We sold 12 units in 2023 and 14 in 2024.",
            Category::Address,
        );
    }

    #[test]
    fn english_and_portuguese_street_addresses() {
        has(
            "prontuário nº 778812-3",
            Category::MedicalRecord,
            "778812-3",
        );
        has(
            "lives at 221 Baker Street, Apt 2",
            Category::Address,
            "221 Baker Street, Apt 2",
        );
    }

    #[test]
    fn lowercase_addresses_need_an_unknown_word() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // Lowercase addresses need an unknown word between the numbers.
        assert_eq!(
            of("it is at 255 hersnapvej 18, near", Category::Address),
            ["255 hersnapvej 18"]
        );
        assert!(of("between 10 and 20", Category::Address).is_empty());
    }

    #[test]
    fn a_place_and_a_postal_code_inside_a_sentence() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // A place with an unknown word or a name, and a postal code, inside a sentence; not a
        // known word and a number, nor a year.
        assert_eq!(
            of("to support it in Bjert 6091 in", Category::Address),
            ["Bjert 6091"]
        );
        assert_eq!(
            of("in Quinta de Mark 3610-114.", Category::Address),
            ["Quinta de Mark 3610-114"]
        );
        assert!(of("it ran in Windows 2000", Category::Address).is_empty());
        assert!(of("it ran from Mark 2020", Category::Address).is_empty());
    }
}
