//! Word lists kept as data files (`data/*.txt`): one entry per line, lines starting with `#` are
//! comments. Each is compiled in with `include_str!` and parsed once, on first use. Lists of
//! regular-expression alternatives are joined with `|` for the patterns that hold them.
//!
//! Imports no other module of the crate.

use std::sync::LazyLock;

/// The entries of a list file: its lines, trimmed, without empty lines and comments.
fn entries(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// A list of regular-expression alternatives, joined: `a|b|c`.
fn alternatives(text: &str) -> String {
    entries(text).join("|")
}

type List = LazyLock<Vec<&'static str>>;
type Alternatives = LazyLock<String>;

// Words.

/// Listed as first names somewhere, but far more often ordinary capitalised words in a request.
pub(crate) static COMMON_WORDS: List =
    LazyLock::new(|| entries(include_str!("../data/common_words.txt")));
/// Words that make a capitalised first word a person when they follow it.
pub(crate) static NAME_VERBS: List =
    LazyLock::new(|| entries(include_str!("../data/name_verbs.txt")));
/// Words after which a lowercase first name is introduced as one.
pub(crate) static LOWER_INTRODUCERS: List =
    LazyLock::new(|| entries(include_str!("../data/lower_introducers.txt")));
/// Words that follow "I am", "hello", "from" capitalised without being names.
pub(crate) static NOT_NAMES: List =
    LazyLock::new(|| entries(include_str!("../data/not_names.txt")));
/// Function words that no job title holds before its noun.
pub(crate) static NOT_IN_TITLES: List =
    LazyLock::new(|| entries(include_str!("../data/not_in_titles.txt")));
/// Words that end a name found by context.
pub(crate) static FUNCTION_WORDS: List =
    LazyLock::new(|| entries(include_str!("../data/function_words.txt")));
/// States and provinces.
pub(crate) static REGIONS: List = LazyLock::new(|| entries(include_str!("../data/regions.txt")));

// Regular-expression alternatives.

/// Occupation nouns that end a job title.
pub(crate) static OCCUPATIONS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/occupations.txt")));
/// Legal forms that end an organisation's name.
pub(crate) static LEGAL_FORMS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/legal_forms.txt")));
/// Nouns that end an organisation's name.
pub(crate) static ORG_HEADS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/org_heads.txt")));
/// Nouns naming what an organisation is.
pub(crate) static ORG_NOUNS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/org_nouns.txt")));
/// What belongs to an organisation.
pub(crate) static ORG_PARTS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/org_parts.txt")));
/// Nationalities and ethnic, religious and political groups.
pub(crate) static GROUPS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/groups.txt")));
/// Nouns after which a name is a person's, used attributively.
pub(crate) static ATTRIBUTED: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/attributed.txt")));
/// Street words after the street's name in English.
pub(crate) static STREET_SUFFIXES: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/street_suffixes.txt")));
/// Street words glued to the end of the street's name.
pub(crate) static STREET_ENDINGS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/street_endings.txt")));
/// Street words before the street's name.
pub(crate) static STREET_WORDS_BEFORE: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/street_words_before.txt")));
/// Words before the number of a flat or suite.
pub(crate) static UNIT_WORDS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/unit_words.txt")));
/// Weekdays.
pub(crate) static WEEKDAYS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/weekdays.txt")));
/// Month names.
pub(crate) static MONTH_NAMES: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/month_names.txt")));
/// Months and their abbreviations.
pub(crate) static MONTH_ABBREVIATIONS: Alternatives =
    LazyLock::new(|| alternatives(include_str!("../data/month_abbreviations.txt")));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_blank_lines_are_no_entries() {
        let text = "# a list\n\nalpha\n  beta gamma  \n# more\ndelta\n";
        assert_eq!(entries(text), ["alpha", "beta gamma", "delta"]);
        assert_eq!(alternatives(text), "alpha|beta gamma|delta");
    }

    #[test]
    fn every_list_has_entries_and_no_stray_separator() {
        for list in [
            &COMMON_WORDS,
            &NAME_VERBS,
            &LOWER_INTRODUCERS,
            &NOT_NAMES,
            &NOT_IN_TITLES,
            &FUNCTION_WORDS,
            &REGIONS,
        ] {
            assert!(!list.is_empty());
        }
        for alt in [
            &OCCUPATIONS,
            &LEGAL_FORMS,
            &ORG_HEADS,
            &ORG_NOUNS,
            &ORG_PARTS,
            &GROUPS,
            &ATTRIBUTED,
            &STREET_SUFFIXES,
            &STREET_ENDINGS,
            &STREET_WORDS_BEFORE,
            &UNIT_WORDS,
            &WEEKDAYS,
            &MONTH_NAMES,
            &MONTH_ABBREVIATIONS,
        ] {
            assert!(!alt.is_empty() && !alt.contains("||") && !alt.ends_with('|'));
            assert!(regex::Regex::new(&format!("^(?:{})$", alt.as_str())).is_ok());
        }
    }
}
