//! Persons and names, the detector's second pass (with a first-name list, [`Names`]): listed first
//! names and name words, capitalised words that are no known word, lowercase names, names used
//! attributively, coordinated with a person, repeated, or speaking in a dialogue, and a name after a
//! job title.
//!
//! Imports only the bottom modules and the scan context.

use regex::Regex;

use crate::context::{Pass, ScanContext};
use crate::core::{glued, regex, Category, Finding};
use crate::lists::{
    ATTRIBUTED, COMMON_WORDS, LEGAL_FORMS, LOWER_INTRODUCERS, NAME_VERBS, OCCUPATIONS, ORG_HEADS,
};
use crate::names::Names;
use crate::namewords;
use crate::text::{title_start, words_before};

/// The person rules, compiled once.
pub(crate) struct Persons {
    /// Capitalised words and initials, for the first-name list.
    words: Regex,
    /// Lowercase words, for names written in lowercase.
    lower: Regex,
    /// A name used attributively: "the Castro novel", "the frank freud version".
    attributive: Regex,
    /// A job title before a name, as an honorific is: "Sheriff Kyle Kuefer", "Senior reactor
    /// operator Baader".
    title_name: Regex,
    /// A word that is itself a job or a firm's legal form or head noun ("Trainee", "Ltd"): no name.
    role_word: Regex,
}

impl Persons {
    pub(crate) fn new() -> Self {
        // Capitalised words ("McDowell" whole), initials with a period, and bare initials
        // ("Stephan M Urner").
        // No \b: Unicode word boundaries push the regex engine off its DFA (measured: the
        // backtracker then took 40% of detection); the callers check the neighbours instead.
        let words = regex(r"Ma?c\p{Lu}[\p{Ll}'’\-]+|\p{Lu}[\p{Ll}'’\-]+|\p{Lu}\.|\p{Lu}");
        Self {
            words,
            lower: regex(r"\p{Ll}[\p{Ll}'’\-]*\p{Ll}"),
            title_name: regex(&format!(
                concat!(
                    r"(?-u:\b)((?i:{}))[ \t]+(\p{{Lu}}[\p{{Ll}}'’\-]+(?:[ \t]+\p{{Lu}}[\p{{Ll}",
                    r"}'’\-]+)?)(?-u:\b)",
                ),
                *OCCUPATIONS
            )),
            role_word: regex(&format!(
                r"^(?:(?i:{})|{}|{})$",
                *OCCUPATIONS, *LEGAL_FORMS, *ORG_HEADS
            )),
            attributive: regex(&format!(
                concat!(
                    r"(?-u:\b)[Tt]he[ \t]+(\p{{Lu}}[\p{{Ll}}'’\-]+(?:[ \t]+\p{{Lu}}[\p{{Ll}}'’",
                    r"\-]+)?|\p{{Ll}}+[ \t]+\p{{Ll}}+)[ \t]+({})(?-u:\b)",
                ),
                *ATTRIBUTED
            )),
        }
    }

    /// Names written in lowercase. Anywhere: a listed first name or name word followed by a name
    /// word, optionally with an initial between ("follow up with patricia desrosiers", "benjamin a
    /// seiler"); a first name introduced ("my name is vitoria"); a list of three or more words
    /// mostly first names ("silvana, adam, chad and caleb"). In a text with no capital at all,
    /// where capitals give no hint, also a name word or an unknown word alone, and a first name
    /// addressed, speaking or owning something, as at a sentence's start.
    fn scan_lowercase_names(
        &self,
        names: &Names,
        text: &str,
        all_lower: bool,
        out: &mut Vec<Finding>,
    ) {
        // One buffer for the capitalised forms: no allocation per word.
        let mut cap = String::new();
        // The previous word: (start, end, may start a name, is a name word).
        let mut prev: Option<(usize, usize, bool, bool)> = None;
        // The current list ("a, b and c"): (start, end, first name, name-like).
        let mut run: Vec<(usize, usize, bool, bool)> = Vec::new();
        let flush = |run: &mut Vec<(usize, usize, bool, bool)>, out: &mut Vec<Finding>| {
            let firsts = run.iter().filter(|w| w.2).count();
            if run.len() >= 3 && 3 * firsts >= 2 * run.len() {
                for &(s, e, _, _) in run.iter().filter(|w| w.3) {
                    out.push(Finding {
                        category: Category::Person,
                        start: s,
                        end: e,
                    });
                }
            }
            run.clear();
        };
        for m in self.lower.find_iter(text) {
            if glued(text, m.start(), m.end()) {
                prev = None;
                flush(&mut run, out);
                continue;
            }
            let w = m.as_str();
            if matches!(w, "and" | "e") {
                // Joins a list; the gap check below sees it.
                continue;
            }
            let stem = possessive_stem(w);
            let (s, e) = (m.start(), m.start() + stem.len());
            cap.clear();
            namewords::push_capitalised(&mut cap, stem);
            // Without a capital, a first name that is also a common word ("will", "are") is taken
            // for the word.
            let first = names.is_first_name(&cap) && !names.is_common(stem);
            let word = names.is_name_word(&cap);
            let unknown = all_lower && stem.chars().nth(3).is_some() && names.unknown_name(stem);
            if let Some((ps, pe, true, prev_word)) = prev {
                // A first name continues a name word ("naomi ryan"), not an unknown word ("csv file").
                let pair = word || unknown || (all_lower && first && prev_word);
                if initial_gap(&text[pe..s]) && pair {
                    out.push(Finding {
                        category: Category::Person,
                        start: ps,
                        end: e,
                    });
                }
            }
            let before = text[..s].trim_end();
            let introduced = LOWER_INTRODUCERS.iter().any(|i| before.ends_with(i));
            // Alone, a name word must be rare as a word ("bertram" 3.0, not "python" 3.8).
            let rare_word = word && names.zipf(stem) < 3.0;
            let alone = all_lower && (rare_word || unknown || (first && marked(&text[e..])));
            if alone || (introduced && (first || word)) {
                // An introduced name takes the next word too unless it is a common word or a
                // joiner ("my name is joão silva", not "... mark and i").
                let next = text[e..].strip_prefix(' ').map(|r| {
                    r.split(|c: char| !(c.is_alphabetic() || matches!(c, '\'' | '’' | '-')))
                        .next()
                        .unwrap_or("")
                });
                let end = match next {
                    Some(w)
                        if introduced
                            && !w.is_empty()
                            && !w.chars().any(char::is_uppercase)
                            && !matches!(w, "and" | "e" | "or" | "ou")
                            && !names.is_common(w) =>
                    {
                        e + 1 + w.len()
                    }
                    _ => e,
                };
                out.push(Finding {
                    category: if first || word {
                        Category::Person
                    } else {
                        Category::Name
                    },
                    start: s,
                    end,
                });
            }
            match prev {
                Some((_, pe, _, _))
                    if matches!(&text[pe..s], ", " | " and " | ", and " | " e ") => {}
                _ => flush(&mut run, out),
            }
            run.push((s, e, first, first || word || unknown));
            prev = Some((s, e, first || word || unknown, word));
        }
        flush(&mut run, out);
    }

    /// Persons and names; `all_lower`: the text has no capital at all.
    fn scan_names(&self, names: &Names, text: &str, all_lower: bool, out: &mut Vec<Finding>) {
        self.scan_lowercase_names(names, text, all_lower, out);
        // A possessive's "'s" is not part of the name ("Matej's address").
        let words: Vec<(usize, usize)> = self
            .words
            .find_iter(text)
            .filter(|m| !glued(text, m.start(), m.end()) && !identifier(text, m.start(), m.end()))
            .map(|m| (m.start(), m.start() + possessive_stem(m.as_str()).len()))
            .collect();
        // A bare capital ("I", "A", the "M" of "Stephan M Urner"): one character, no period.
        let bare =
            |(s, e): (usize, usize)| e - s == text[s..].chars().next().map_or(0, char::len_utf8);
        // A capitalised word that is no English or Portuguese word ("Dzhambek"); not an initial.
        let unknown = |(s, e): (usize, usize)| {
            let w = &text[s..e];
            namewords::name_shaped(w) && names.unknown_name(w)
        };
        let mut i = 0;
        while i < words.len() {
            let (s, e) = words[i];
            let listed = names.contains(&text[s..e]);
            if !listed && !unknown(words[i]) {
                i += 1;
                continue;
            }
            // Extend over following capitalised words or initials separated by one space; a bare
            // capital ("I", "A") only between two of them.
            let joined = |k: usize| k + 1 < words.len() && &text[words[k].1..words[k + 1].0] == " ";
            let mut j = i;
            // Not over a word of an address that follows ("Mrs. Barbara Yudina Apt. 675").
            while joined(j)
                && j - i < 3
                && !COMMON_WORDS.contains(&&text[words[j + 1].0..words[j + 1].1])
                && (!bare(words[j + 1]) || (joined(j + 1) && !bare(words[j + 2])))
            {
                j += 1;
            }
            let end = words[j].1;
            let sentence_start = starts_sentence(text, s);
            // A listed first name alone at a sentence's start may be an ordinary word ("Mark the
            // date"); a name word or an unknown word may not, nor a name addressed or owning
            // something ("Leif, ...", "Nicole: ...", "Matej's address").
            // A listed first name that is a common word ("You", "In", "To") is no evidence: a run
            // needs a word that is ("To Hate", "My Baby" are titles, "Will Smith" a person).
            let evidence = |&(a, b): &(usize, usize)| {
                let w = &text[a..b];
                (names.contains(w) && !names.is_common(w)) || unknown((a, b))
            };
            let alone_at_start = j == i && sentence_start;
            if words[i..=j].iter().any(evidence)
                && (!alone_at_start
                    || marked(&text[end..])
                    || !listed
                    || names.is_name_word(&text[s..e]))
            {
                // A person when a listed name is in it; else an unknown name ("Ushurma Dratchev").
                let person = words[i..=j]
                    .iter()
                    .any(|&(a, b)| names.contains(&text[a..b]));
                out.push(Finding {
                    category: if person {
                        Category::Person
                    } else {
                        Category::Name
                    },
                    start: s,
                    end,
                });
            }
            i = j + 1;
        }
        // A name used attributively, before a noun that belongs to a person: "the Castro novel",
        // "the Obama administration"; in a text without capitals, a first name and a rare word
        // before a work ("the frank freud version").
        let mut cap = String::new();
        for c in self.attributive.captures_iter(text) {
            let (Some(g), Some(noun)) = (c.get(1), c.get(2)) else {
                continue;
            };
            let v = g.as_str();
            let person = if v.starts_with(char::is_uppercase) {
                !matches!(
                    noun.as_str(),
                    "version" | "recording" | "album" | "song" | "book" | "film" | "movie"
                ) && v
                    .split_whitespace()
                    .all(|w| names.zipf(w) < 5.0 && !COMMON_WORDS.contains(&w))
            } else {
                let mut ws = v.split_whitespace();
                let (a, b) = (ws.next().unwrap_or(""), ws.next().unwrap_or(""));
                cap.clear();
                namewords::push_capitalised(&mut cap, a);
                all_lower
                    && names.is_first_name(&cap)
                    && !names.is_common(a)
                    && b.chars().nth(2).is_some()
                    && names.zipf(b) < 4.0
            };
            if person && !out.iter().any(|f| f.start < g.end() && g.start() < f.end) {
                out.push(Finding {
                    category: Category::Person,
                    start: g.start(),
                    end: g.end(),
                });
            }
        }
        // Capitalised words coordinated with a person ("Morrison, Rogers and Torres") are people
        // too: runs of words joined by ", ", " and ", " e ", " & ", over the words already found.
        let joiner = |gap: &str| matches!(gap, ", " | " and " | ", and " | " e " | " & ");
        let mut k = 0;
        while k < words.len() {
            let mut last = k;
            while last + 1 < words.len() && joiner(&text[words[last].1..words[last + 1].0]) {
                last += 1;
            }
            let (s0, e0) = (words[k].0, words[last].1);
            if last > k
                && out
                    .iter()
                    .any(|f| f.category == Category::Person && f.start < e0 && s0 < f.end)
            {
                // Not a common word opening a sentence before a name ("Today, Adrian ...").
                for &(s, e) in &words[k..=last] {
                    let opener = starts_sentence(text, s) && names.is_common(&text[s..e]);
                    if !bare((s, e)) && !opener {
                        out.push(Finding {
                            category: Category::Person,
                            start: s,
                            end: e,
                        });
                    }
                }
            }
            k = last + 1;
        }
        // A word of a name found once is the same name elsewhere in the text ("the verses from Yuri
        // Bulgakov ... early Bulgakov").
        let spans: Vec<&Finding> = out
            .iter()
            .filter(|f| matches!(f.category, Category::Person | Category::Name))
            .collect();
        let found: Vec<(&str, Category)> = words
            .iter()
            .filter_map(|&(s, e)| {
                let f = spans.iter().find(|f| f.start <= s && e <= f.end)?;
                Some((&text[s..e], f.category))
            })
            .collect();
        let mut again = Vec::new();
        for &(s, e) in words.iter().filter(|_| !found.is_empty()) {
            let w = &text[s..e];
            let Some(&(_, category)) = found.iter().find(|(x, _)| *x == w) else {
                continue;
            };
            if namewords::name_shaped(w)
                && !names.is_common(w)
                && !out.iter().any(|f| f.start < e && s < f.end)
            {
                again.push(Finding {
                    category,
                    start: s,
                    end: e,
                });
            }
        }
        out.extend(again);
        // The speakers of a dialogue ("Leverett: What a wife.\nDanielle: Remember me?"): a
        // capitalised word opening a line before a colon is a person when another such is one.
        let line_start = |s: usize| {
            text[..s]
                .trim_end_matches([' ', '\t', '>'])
                .chars()
                .next_back()
                .is_none_or(|c| c == '\n')
        };
        let speakers: Vec<(usize, usize)> = words
            .iter()
            .copied()
            .filter(|&(s, e)| {
                text[e..].starts_with(':')
                    && line_start(s)
                    && e - s > 2
                    && !names.is_common(&text[s..e])
            })
            .collect();
        let is_person = |&(s, e): &(usize, usize)| {
            out.iter()
                .any(|f| f.category == Category::Person && f.start == s && f.end == e)
        };
        if speakers.len() >= 2 && speakers.iter().any(is_person) {
            for &(s, e) in &speakers {
                if !out.iter().any(|f| f.start < e && s < f.end) {
                    out.push(Finding {
                        category: Category::Person,
                        start: s,
                        end: e,
                    });
                }
            }
        }
    }

    /// A name after a job title is a person's, as after an honorific ("Sheriff Kyle Kuefer",
    /// "Accounting clerk Baker"): a first name, a name word or an unknown word; or, after a title
    /// written with a capital, any word rarer than Zipf 4.5 ("Baker" 4.4, not "Tools"). With the
    /// quasi-identifiers on, the title (up to three words before its occupation noun) too.
    fn scan_title_names(&self, names: &Names, text: &str, quasi: bool, out: &mut Vec<Finding>) {
        for c in self.title_name.captures_iter(text) {
            let (Some(t), Some(n)) = (c.get(1), c.get(2)) else {
                continue;
            };
            if identifier(text, n.start(), n.end())
                || n.as_str()
                    .split_whitespace()
                    .any(|w| self.role_word.is_match(w))
            {
                continue;
            }
            let from = words_before(text, t.start(), 3);
            let start = title_start(&text[from..t.end()]).map_or(t.start(), |i| from + i);
            let capital = text[start..].starts_with(char::is_uppercase);
            let words = || n.as_str().split_whitespace();
            let named = words()
                .all(|w| names.is_first_name(w) || names.is_name_word(w) || names.is_unknown(w))
                || (capital && words().all(|w| names.zipf(w) < 4.5));
            if named {
                out.push(Finding {
                    category: Category::Person,
                    start: n.start(),
                    end: n.end(),
                });
                if quasi {
                    out.push(Finding {
                        category: Category::Title,
                        start,
                        end: t.end(),
                    });
                }
            }
        }
    }
}

impl Pass for Persons {
    /// Persons and names, then names after job titles; nothing without a first-name list.
    fn run(&self, cx: &mut ScanContext) {
        let Some(names) = cx.names else {
            return;
        };
        self.scan_names(names, cx.text, cx.all_lower, &mut cx.found);
        self.scan_title_names(names, cx.text, cx.quasi, &mut cx.found);
    }
}

/// Whether a word at `s` opens a sentence (or the text, a line, a quote after a colon).
fn starts_sentence(text: &str, s: usize) -> bool {
    text[..s]
        .trim_end_matches([' ', '"', '\'', '('])
        .chars()
        .next_back()
        .is_none_or(|c| matches!(c, '.' | '!' | '?' | '\n' | ':'))
}

/// Whether the word at `s..e` is a name in code: called or qualified right after it ("Tab(",
/// "Core::", "Tab.open") or declared ("class Tab", "struct Sender").
fn identifier(text: &str, s: usize, e: usize) -> bool {
    let after = &text[e..];
    let called = after.starts_with(['(', '<', '['])
        || after.starts_with("::")
        || after
            .strip_prefix('.')
            .is_some_and(|a| a.starts_with(|c: char| c.is_alphabetic() || c == '_'));
    let before = text[..s].trim_end_matches(' ');
    let declared = before.len() < s
        && [
            "class",
            "struct",
            "enum",
            "trait",
            "interface",
            "def",
            "fn",
            "new",
            "type",
            "impl",
        ]
        .iter()
        .any(|k| {
            before.ends_with(k)
                && !before[..before.len() - k.len()]
                    .chars()
                    .next_back()
                    .is_some_and(char::is_alphanumeric)
        });
    called || declared
}

/// `w` without a possessive "'s" ("Matej's" → "Matej").
fn possessive_stem(w: &str) -> &str {
    w.strip_suffix("'s")
        .or_else(|| w.strip_suffix("’s"))
        .unwrap_or(w)
}

/// The gap between a first name and a last name: a space, or an initial ("a", "t.") between spaces.
fn initial_gap(gap: &str) -> bool {
    if gap == " " {
        return true;
    }
    let Some(mid) = gap.strip_prefix(' ').and_then(|g| g.strip_suffix(' ')) else {
        return false;
    };
    let mid = mid.strip_suffix('.').unwrap_or(mid);
    let mut c = mid.chars();
    c.next().is_some_and(char::is_alphabetic) && c.next().is_none()
}

/// Whether what follows a word marks it as a person: addressed ("Leif, ..."), speaking ("Nicole:"),
/// owning something ("Matej's") or doing something ("Kevin had given ...").
fn marked(after: &str) -> bool {
    after.starts_with([',', ':'])
        || after.starts_with("'s")
        || after.starts_with("’s")
        || after
            .strip_prefix(' ')
            .and_then(|a| a.split(|c: char| !c.is_alphabetic()).next())
            .is_some_and(|w| NAME_VERBS.contains(&w))
}

#[cfg(test)]
mod tests {
    use crate::detect::{Detector, Names};
    use crate::testutil::{lexicon_detector, of, sentence_start_detector};
    use crate::Category;

    /// A first name alone at a sentence's start counts only when addressed, speaking, owning something
    /// or doing something.
    #[test]
    fn a_first_name_alone_at_a_sentence_start_needs_a_mark() {
        let det = sentence_start_detector();
        let persons = |text: &str| of(&det, text, Category::Person);
        assert!(persons("Mark the date in the calendar.").is_empty());
        assert_eq!(persons("Mark, call me."), ["Mark"]);
        assert_eq!(persons("Nicole: remember me?"), ["Nicole"]);
        assert_eq!(persons("Nicole's address changed."), ["Nicole"]);
        assert_eq!(persons("Mark had given it back."), ["Mark"]);
    }

    /// A name word (rare as an ordinary word) counts at a sentence's start anyway.
    #[test]
    fn name_words_count_at_a_sentence_start() {
        let det = sentence_start_detector();
        let persons = |text: &str| of(&det, text, Category::Person);
        assert_eq!(persons("Christiansen wrote it."), ["Christiansen"]);
        assert_eq!(
            persons("We met Christiansen and Mark today."),
            ["Christiansen", "Mark"]
        );
    }

    #[test]
    fn lowercase_words_in_a_text_with_capitals_are_no_names() {
        let det = sentence_start_detector();
        let persons = |text: &str| of(&det, text, Category::Person);
        // Lowercase inside a text with capitals: the capitals would have marked a name.
        assert!(persons("Then christiansen wrote it.").is_empty());
        assert!(persons("Please mark the christiansen file").is_empty());
    }

    #[test]
    fn bare_initials_only_between_names() {
        let det = sentence_start_detector();
        let persons = |text: &str| of(&det, text, Category::Person);
        // A verb after a first name at a sentence's start; bare initials only between names.
        assert_eq!(
            persons("Write to Mark M Christiansen today."),
            ["Mark M Christiansen"]
        );
        assert_eq!(persons("Then Mark I think left."), ["Mark"]);
    }

    #[test]
    fn names_coordinated_with_a_person() {
        let det = sentence_start_detector();
        let persons = |text: &str| of(&det, text, Category::Person);
        // Coordinated with a person, and after a speech verb.
        assert_eq!(
            persons("Our founders: Morrison, Mark and Torres."),
            ["Morrison", "Mark", "Torres"]
        );
        assert!(persons("Our founders: Morrison and Torres.").is_empty());
    }

    #[test]
    fn a_lowercase_first_name_before_a_name_word() {
        let det = sentence_start_detector();
        let persons = |text: &str| of(&det, text, Category::Person);
        // Lowercase: a first name followed by a name word.
        assert_eq!(
            persons("follow up with nicole christiansen soon"),
            ["nicole christiansen"]
        );
    }

    #[test]
    fn first_names_listed_without_their_accents() {
        let det = sentence_start_detector();
        let persons = |text: &str| of(&det, text, Category::Person);
        // A capitalised first name listed without its accents.
        assert_eq!(persons("Please correct it to Fábio."), ["Fábio"]);
        assert!(persons("please correct it to fábio.").is_empty());
    }

    #[test]
    fn a_job_title_before_a_name_works_as_an_honorific() {
        let det = sentence_start_detector();
        let persons = |text: &str| of(&det, text, Category::Person);
        // A job title before a name works as an honorific; a role or a firm is no name.
        assert_eq!(persons("Ask Sheriff Mark today."), ["Mark"]);
        assert_eq!(persons("For Accounting clerk Xyzzyq, see"), ["Xyzzyq"]);
        assert!(persons("Process Engineer Trainee (3 months)").is_empty());
        assert!(persons("The Shepherd Ltd. Orchestra").is_empty());
    }

    /// Capitalised words that are no known word are names; with a listed name in them, persons.
    #[test]
    fn capitalised_unknown_words_are_names() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // Capitalised unknown words, alone, joined, at a sentence's start.
        assert_eq!(
            of("Dzhambek is from Areavibes.", Category::Name),
            ["Dzhambek", "Areavibes"]
        );
        assert_eq!(
            of("We met Ushurma Dratchev at noon.", Category::Name),
            ["Ushurma Dratchev"]
        );
        // With a listed name in it, a person.
        assert_eq!(
            of("We met Nicole Dolgorukova at noon.", Category::Person),
            ["Nicole Dolgorukova"]
        );
        assert!(of("We met at noon.", Category::Name).is_empty());
    }

    #[test]
    fn a_first_name_that_is_a_common_word_is_no_evidence() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // A first name that is a common word is no evidence of a person on its own.
        assert!(of("We met To Are at noon.", Category::Person).is_empty());
        assert!(of("We met To at noon.", Category::Person).is_empty());
        assert_eq!(
            of("We met To Christiansen at noon.", Category::Person),
            ["To Christiansen"]
        );
    }

    #[test]
    fn unknown_words_as_names_can_be_turned_off() {
        let off = Detector::new().with_names(
            Names::from_nam_dict("")
                .with_lexicon(crate::namewords::Lexicon {
                    name_words: Default::default(),
                    known: [("is", 6.0), ("from", 6.0)]
                        .map(|(w, z)| (w.to_string(), z))
                        .into(),
                })
                .with_unknown_names(false),
        );
        assert!(off.scan("Dzhambek is from Areavibes.").is_empty());
    }

    #[test]
    fn texts_without_capitals_name_words_and_unknown_words_alone() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // No capital anywhere: a name word or an unknown word alone, an introduced first name, a
        // list of first names, a first name before a colon; not common words that are names too.
        assert_eq!(
            of("the work of christiansen", Category::Person),
            ["christiansen"]
        );
        assert_eq!(of("early samoylova work", Category::Name), ["samoylova"]);
        // A capital somewhere: lowercase words alone stay words.
        assert!(of("I met samoylova early", Category::Name).is_empty());
    }

    #[test]
    fn texts_without_capitals_introduced_first_names() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        assert_eq!(of("my name is mark", Category::Person), ["mark"]);
        assert_eq!(
            of("my name is mark bulgak", Category::Person),
            ["mark bulgak"]
        );
        assert_eq!(of("my name is mark and i", Category::Person), ["mark"]);
    }

    #[test]
    fn texts_without_capitals_lists_speakers_and_initials() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        assert_eq!(
            of("they had 3: adam, donna and brian.", Category::Person),
            ["adam", "donna", "brian"]
        );
        assert_eq!(of("danielle: what a wife", Category::Person), ["danielle"]);
        assert!(of("are you on to redeem will", Category::Person).is_empty());
        assert_eq!(
            of("nicole d. christiansen lives", Category::Person),
            ["nicole d. christiansen"]
        );
    }

    #[test]
    fn a_name_found_once_is_found_again() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // A name found once is the same name later in the text.
        assert_eq!(
            of(
                "The tales of Mark Bulgak. Early Bulgak is best.",
                Category::Person
            ),
            ["Mark Bulgak", "Bulgak"]
        );
    }

    #[test]
    fn dialogue_speakers_when_one_is_a_person() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // Dialogue speakers, when one is a person.
        assert_eq!(
            of(
                "Leverett: What a wife.\nDanielle: Remember me?",
                Category::Person
            ),
            ["Leverett", "Danielle"]
        );
        assert!(of("Address: 5 Main St\nNote: by noon", Category::Person).is_empty());
        assert_eq!(
            of("You: help me\nNicole: help you\nAdam: ok", Category::Person),
            ["Nicole", "Adam"]
        );
    }

    #[test]
    fn names_used_attributively() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // A name used attributively.
        assert_eq!(
            of("Unlike the Castro novel, it", Category::Person),
            ["Castro"]
        );
        assert!(of("Unlike the Windows version, it", Category::Person).is_empty());
        assert_eq!(
            of("the frank freud version", Category::Person),
            ["frank freud"]
        );
        assert!(of("the frank windows version", Category::Person).is_empty());
    }

    #[test]
    fn interjections_openers_and_code_are_no_persons() {
        let det = lexicon_detector();
        let of = |text: &str, c: Category| of(&det, text, c);
        // Interjections, common words opening a sentence, names in code, common-word speakers and
        // a first name after an unknown word in lowercase are no persons.
        assert!(of("Hi, can you help", Category::Person).is_empty());
        assert_eq!(of("Today, Mark focuses", Category::Person), ["Mark"]);
        assert!(of("class Tab(Base): Tab.open()", Category::Person).is_empty());
        assert!(of("help load csv file to it", Category::Person).is_empty());
    }
}
