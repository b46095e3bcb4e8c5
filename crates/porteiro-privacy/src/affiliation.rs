//! Affiliations, a quasi-identifier (opt-in with the rest of [`crate::quasi`]): the organisation a
//! person works for and their job title. Neither names anyone alone, but "the midwife at
//! Allstate" narrows a person down as a date of birth does.
//!
//! No list of firms: an organisation is found by what ends its name (a legal form or a head noun:
//! "Civic Impulse LLC", "Golden Helix Orchestra") or by the context around it ("works for X",
//! "Dudek of X", "X's Parker Suknović", "the X website"). A job title ends in an occupation noun
//! and is found in context ("as a dairy scientist", "Godina, the technical writer,") or on its own
//! line of a contact card (name line, title and firm lines, then the address or phone).

use regex::Regex;

use crate::context::{Pass, ScanContext};
use crate::core::{glued, regex, Category, Finding};
use crate::lists::{
    FUNCTION_WORDS, LEGAL_FORMS, NOT_IN_TITLES, OCCUPATIONS, ORG_HEADS, ORG_NOUNS, ORG_PARTS,
};
use crate::text::title_start;

/// A word of an organisation's name: capitalised, or a number ("3 Round Stones Inc").
const CAP_WORD: &str = r"(?:(?:\p{Lu}\.){2,}|\p{Lu}[\p{L}\d'’&\-]*|\d+)";

/// At most this many words before an organisation's head noun, or in a run found by context.
const MAX_RUN: usize = 5;

/// Organisation and job-title rules.
pub struct Affiliation {
    /// A capitalised run ending in a legal form or head noun; a lowercase one ending in a legal form.
    headed: Regex,
    /// Runs found by the words before them (employment, corporate events) or after them ("is the
    /// brainchild of"): the name must end its noun phrase and be no heading. Group 1.
    org_ended: Vec<Regex>,
    /// Runs found by the nouns after them or by a fixed frame ("her X resignation letter", "the
    /// X website", "the address of X", "X is an investment bank"). Group 1.
    org_context: Vec<Regex>,
    /// Job titles found by the words before them; group 1 is the title.
    title_context: Vec<Regex>,
    /// Text right after a person: "of X", "from X", ", the X,".
    after_person: Regex,
    after_person_title: Regex,
    /// Text right before a person: "X's ", "X songwriter ", "songwriter ".
    before_person: Regex,
    /// Lists around an organisation: "Bekins, Enervee Corporation and Civic Insight".
    list_before: Regex,
    list_after: Regex,
    /// In texts without capitals: the words after an employment or corporate-event phrase
    /// ("i work for rapid cycle solutions"), up to the next function word.
    lower_context: Regex,
    /// A line's text ends in an occupation noun.
    occupation_end: Regex,
}

impl Default for Affiliation {
    fn default() -> Self {
        Self::new()
    }
}

impl Affiliation {
    pub fn new() -> Self {
        let (legal_forms, org_heads) = (LEGAL_FORMS.as_str(), ORG_HEADS.as_str());
        let (org_nouns, org_parts) = (ORG_NOUNS.as_str(), ORG_PARTS.as_str());
        let occupations = OCCUPATIONS.as_str();
        let run = format!(
            r"{CAP_WORD}(?:[ \t]+(?:(?:and|And|&|of|for|de)[ \t]+)?{CAP_WORD}){{0,{}}}",
            MAX_RUN - 1
        );
        let occ = format!(r"(?:[\p{{L}}'’\-]+[ \t]+){{0,3}}(?i:{occupations})");
        let re = regex;
        Self {
            headed: re(&format!(
                concat!(
                    r"(?-u:\b)(?:((?:{CAP_WORD}[ \t]+(?:(?:and|And|&|of)[ \t]+)?){{1,{MAX_RUN}",
                    r"}}(?:{legal_forms}))|((?:{CAP_WORD}[ \t]+(?:(?:and|And|",
                    r"&|of)[ \t]+)?){{1,{MAX_RUN}}}(?:{org_heads}))|((?:[\p{{Ll}}\d][\p{{L}}\d",
                    r"\-]*[ \t]+){{1,2}}(?:inc|llc|ltd|corp|gmbh)\.?))(?:[^\p{{L}}\d]|",
                    r"$)",
                ),
                CAP_WORD = CAP_WORD,
                MAX_RUN = MAX_RUN,
                legal_forms = legal_forms,
                org_heads = org_heads
            )),
            org_ended: vec![
                // Employment: "works for X", "a year at X", "joined X".
                re(&format!(
                    concat!(
                        r"(?-u:\b)(?:[Ww]ork(?:s|ed|ing)?|[Ee]mployed|[Ii]ntern(?:ed)?|",
                        r"[Hh]ired|[Qq]uit|[Tt]rabalh[a-zâ]*)[ \t]+(?:for|at|by|na|",
                        r"no|em|para)[ \t]+({run})",
                    ),
                    run = run
                )),
                re(&format!(
                    concat!(
                        r"(?-u:\b)(?:[Jj]oin(?:ed|s|ing)?|(?:[Yy]ear|[Mm]onth|[Ww]eek)s?[ \t]+at|",
                        r"[Ss]tint[ \t]+at|[Cc]areer[ \t]+at|[Ii]nternship[ \t]+at|",
                        r"[Jj]ob[ \t]+at|[Pp]osition[ \t]+at)[ \t]+({run})",
                    ),
                    run = run
                )),
                // Corporate events and cover letters: "later became X", "recorded for X",
                // "acquired by X", "X is the brainchild of", "looking to support X".
                re(&format!(
                    concat!(
                        r"(?-u:\b)(?:became|renamed(?:[ \t]+(?:to|as))?|merged[ \t]+with|",
                        r"acquired[ \t]+by|bought[ \t]+by|subsidiary[ \t]+of|division[ \t]+of|",
                        r"(?:co-?)?founded|recorded[ \t]+(?:for|with)|released[ \t]+by|",
                        r"signed[ \t]+(?:to|with)|[Ll]ooking[ \t]+to[ \t]+(?:support|",
                        r"join|help))[ \t]+({run})",
                    ),
                    run = run
                )),
                re(&format!(
                    concat!(
                        r"({run})[ \t]+(?:is|was)[ \t]+the[ \t]+(?:brainchild|creation|",
                        r"project)[ \t]+of(?-u:\b)",
                    ),
                    run = run
                )),
            ],
            org_context: vec![
                // Attributively before what an employer gives: "her Uber resignation letter".
                re(&format!(
                    concat!(
                        r"(?-u:\b)(?:my|his|her|their|our|your)[ \t]+({run})[ \t]+(?:resignation|",
                        r"job|salary|badge|colleagues|coworkers|co-workers|employer|",
                        r"boss|internship|interview|payroll|paycheck|contract|onboarding|",
                        r"layoff|severance)(?-u:\b)",
                    ),
                    run = run
                )),
                // "the address of X is", "the CEO of X".
                re(&format!(
                    concat!(
                        r"(?-u:\b)(?:[Aa]ddress|[Hh]eadquarters|CEO|[Ff]ounders?|",
                        r"[Ee]mployees?)[ \t]+of[ \t]+({run})",
                    ),
                    run = run
                )),
                // "the X office", "the X website".
                re(&format!(
                    r"(?-u:\b)[Tt]he[ \t]+({run})[ \t]+(?i:{org_parts})(?-u:\b)"
                )),
                // "X is an American multinational investment bank".
                re(&format!(
                    concat!(
                        r"({run})[ \t]+(?:is|was)[ \t]+(?:an?|um|uma)[ \t]+(?:[\p{{L}}\-]+[ \t]+){",
                        r"{0,4}}(?:{org_nouns})(?:[^\p{{L}}]|$)",
                    ),
                    run = run,
                    org_nouns = org_nouns
                )),
            ],
            title_context: vec![
                // "worked for NATO as Passenger booking clerk", "a job as a nurse".
                re(&format!(
                    concat!(
                        r"(?-u:\b)(?:[Ww]ork(?:s|ed|ing)?|[Ee]mployed|[Hh]ired|[Jj]obs?|",
                        r"[Pp]osition|[Rr]ole|[Cc]areer|[Ss]erv(?:e|es|ed|ing))(?-u:\b)[^\n;:!?]{{",
                        r"0,60}}?(?-u:\b)as[ \t]+(?:an?[ \t]+|the[ \t]+)?({occ})(?-u:\b)",
                    ),
                    occ = occ
                )),
                // "I'm a dairy scientist", "she is an X-ray technician", "sou engenheira".
                re(&format!(
                    concat!(
                        r"(?-u:\b)(?:I[ \t]+am|I'm|I’m|I[ \t]+was|[Hh]e[ \t]+is|[Ss]he[ \t]+is|",
                        r"[Hh]e's|[Ss]he's|[Hh]e[ \t]+was|[Ss]he[ \t]+was|[Ss]ou|",
                        r"[Ee]ra)[ \t]+(?:an?|um|uma)?[ \t]*({occ})(?-u:\b)",
                    ),
                    occ = occ
                )),
            ],
            after_person: re(&format!(r"^[ \t]+(?:of|from|at)[ \t]+({run})")),
            after_person_title: re(&format!(
                r"^,[ \t]+(?:the|our|a|an|my|his|her|their)[ \t]+({occ}),"
            )),
            before_person: re(&format!(
                concat!(
                    r"(?:(?-u:\b)({run})(?:'s|’s|'|’)[ \t]+|(?-u:\b)(?:({run})[ \t]+)?((?i:{oc",
                    r"cupations}))[ \t]+)$",
                ),
                run = run,
                occupations = occupations
            )),
            list_before: re(&format!(r"(?-u:\b)({run})(?:,[ \t]+|,?[ \t]+and[ \t]+)$")),
            list_after: re(&format!(r"^(?:,[ \t]+|,?[ \t]+and[ \t]+)({run})")),
            lower_context: re(concat!(
                r"(?-u:\b)(?:work(?:s|ed|ing)?[ \t]+(?:for|at)|employed[ \t]+(?:by|",
                r"at)|later[ \t]+became|recorded[ \t]+for|looking[ \t]+to[ \t]+support)[ \",
                r"t]+((?:[\p{Ll}\d][\p{L}\d'&\-]*)(?:[ \t]+[\p{Ll}\d][\p{L}\d'&\-]*){0,3})",
            )),
            occupation_end: re(&format!(r"(?i:{occupations})$")),
        }
    }

    /// Appends the organisations and job titles in `text`. `found`: what the other detectors
    /// found (persons and contact details anchor the context rules and the contact cards).
    /// `lines`: the text's [`crate::context::content_lines`].
    pub fn scan(
        &self,
        text: &str,
        lines: &[(usize, usize)],
        all_lower: bool,
        found: &[Finding],
        out: &mut Vec<Finding>,
    ) {
        let push = |category, s: usize, e: usize, out: &mut Vec<Finding>| {
            let e = s + trim_possessive(&text[s..e]).len();
            if s < e && !glued(text, s, e) {
                out.push(Finding {
                    category,
                    start: s,
                    end: e,
                });
            }
        };
        for c in self.headed.captures_iter(text) {
            if let Some(g) = c.get(1).or_else(|| c.get(3)) {
                push(Category::Organization, g.start(), g.end(), out);
            }
            if let Some(g) = c.get(2).filter(|g| !heading(text, g.start(), g.end())) {
                push(Category::Organization, g.start(), g.end(), out);
            }
        }
        // After "works for", a name ends its noun phrase ("work for Arabic languages").
        let ended =
            |g: &regex::Match| !(noun_follows(text, g.end()) || heading(text, g.start(), g.end()));
        for (rules, must_end) in [(&self.org_ended, true), (&self.org_context, false)] {
            for re in rules {
                for c in re.captures_iter(text) {
                    if let Some(g) = c.get(1).filter(|g| !must_end || ended(g)) {
                        push(Category::Organization, g.start(), g.end(), out);
                    }
                }
            }
        }
        if all_lower {
            for c in self.lower_context.captures_iter(text) {
                let Some(g) = c.get(1) else { continue };
                let mut end = g.start();
                let mut at = g.start();
                for w in g.as_str().split_whitespace() {
                    if FUNCTION_WORDS.contains(&w) || NOT_IN_TITLES.contains(&w) {
                        break;
                    }
                    at += text[at..].find(w).unwrap_or(0);
                    end = at + w.len();
                    at = end;
                }
                push(Category::Organization, g.start(), end, out);
            }
        }
        for re in &self.title_context {
            for c in re.captures_iter(text) {
                if let Some(g) = c.get(1) {
                    if let Some(i) = title_start(g.as_str()) {
                        push(Category::Title, g.start() + i, g.end(), out);
                    }
                }
            }
        }
        for p in found.iter().filter(|f| f.category == Category::Person) {
            let after = &text[p.end..];
            if let Some(g) = (self.after_person.captures(after).and_then(|c| c.get(1)))
                .filter(|g| !noun_follows(text, p.end + g.end()))
            {
                push(
                    Category::Organization,
                    p.end + g.start(),
                    p.end + g.end(),
                    out,
                );
            }
            if let Some(g) = (self
                .after_person_title
                .captures(after)
                .and_then(|c| c.get(1)))
            .filter(|g| title_start(g.as_str()) == Some(0))
            {
                push(Category::Title, p.end + g.start(), p.end + g.end(), out);
            }
            // Only the last stretch before the person can matter.
            let from = window_start(text, p.start, 120);
            if let Some(c) = self.before_person.captures(&text[from..p.start]) {
                for (i, category) in [
                    (1, Category::Organization),
                    (2, Category::Organization),
                    (3, Category::Title),
                ] {
                    if let Some(g) = c.get(i) {
                        push(category, from + g.start(), from + g.end(), out);
                    }
                }
            }
        }
        self.scan_cards(text, lines, found, out);
        // The other members of a list holding an organisation are organisations.
        let orgs: Vec<(usize, usize)> = out
            .iter()
            .filter(|f| f.category == Category::Organization)
            .map(|f| (f.start, f.end))
            .collect();
        for (s, e) in orgs {
            if let Some(g) = self.list_after.captures(&text[e..]).and_then(|c| c.get(1)) {
                push(Category::Organization, e + g.start(), e + g.end(), out);
            }
            let from = window_start(text, s, 120);
            if let Some(g) = self
                .list_before
                .captures(&text[from..s])
                .and_then(|c| c.get(1))
            {
                push(
                    Category::Organization,
                    from + g.start(),
                    from + g.end(),
                    out,
                );
            }
        }
    }

    /// Whether the line `s..e` is only a person's name: each word is in a person or name finding,
    /// a particle ("van de"), an initial ("M.") or an honorific ("Dr.").
    fn name_line(&self, text: &str, s: usize, e: usize, found: &[Finding]) -> bool {
        let named = |ws: usize, we: usize| {
            found.iter().any(|f| {
                matches!(f.category, Category::Person | Category::Name)
                    && f.start <= ws
                    && f.end >= we
            })
        };
        let mut any = false;
        let mut at = s;
        for w in text[s..e].split_whitespace() {
            let ws = at + text[at..e].find(w).unwrap_or(0);
            let we = ws + w.len();
            at = we;
            let particle = matches!(
                w,
                "van"
                    | "von"
                    | "de"
                    | "da"
                    | "do"
                    | "dos"
                    | "das"
                    | "der"
                    | "den"
                    | "del"
                    | "di"
                    | "la"
                    | "le"
                    | "y"
                    | "e"
            );
            let initial = w.chars().count() <= 2 && w.starts_with(char::is_uppercase);
            let title = found
                .iter()
                .any(|f| f.category == Category::Title && f.start <= ws && f.end >= we);
            if named(ws, we) {
                any = true;
            } else if !(title || particle || initial) {
                return false;
            }
        }
        any
    }

    /// Contact cards: a line holding only a person's name, then (within a few lines) an address,
    /// phone, e-mail or web address. The short lines in between are the person's job title and
    /// organisation ("Janka M. Szász / Network and computer systems administrator / Phone: …").
    /// A text's first line right above an address is the addressee firm ("Amazon Web Services /
    /// 9092 Avda. …").
    fn scan_cards(
        &self,
        text: &str,
        lines: &[(usize, usize)],
        found: &[Finding],
        out: &mut Vec<Finding>,
    ) {
        if lines.len() < 3 {
            return;
        }
        let touches = |s: usize, e: usize, pred: &dyn Fn(Category) -> bool| {
            found
                .iter()
                .any(|f| pred(f.category) && f.start < e && f.end > s)
        };
        let contact = |c: Category| {
            matches!(
                c,
                Category::Address | Category::Phone | Category::Email | Category::Url
            )
        };
        // Lines holding a person, a contact detail or a date are no title or firm lines; a place or
        // a name inside one is (the line is taken whole).
        let strong = |c: Category| {
            !matches!(
                c,
                Category::Name
                    | Category::Location
                    | Category::Group
                    | Category::Title
                    | Category::Organization
            )
        };
        // A short line that is no label ("Phone:") and no sentence.
        let short = |s: usize, e: usize| {
            let l = &text[s..e];
            l.split_whitespace().count() <= 8
                && l.len() <= 80
                && !l.ends_with([':', '?', '!'])
                && !l.contains(": ")
                && l.chars().any(char::is_alphabetic)
        };
        let classify = |s: usize, e: usize| {
            let l = text[s..e].trim_end_matches(['.', ',']);
            if self.occupation_end.is_match(l) {
                Category::Title
            } else {
                Category::Organization
            }
        };
        for (i, &(s, e)) in lines.iter().enumerate() {
            if !self.name_line(text, s, e, found) {
                continue;
            }
            let window = &lines[i + 1..lines.len().min(i + 7)];
            let Some(k) = window.iter().position(|&(s, e)| touches(s, e, &contact)) else {
                continue;
            };
            for &(s, e) in &window[..k] {
                if short(s, e) && !touches(s, e, &strong) {
                    out.push(Finding {
                        category: classify(s, e),
                        start: s,
                        end: e,
                    });
                }
            }
        }
        let (s, e) = lines[0];
        if short(s, e)
            && text[s..e].split_whitespace().count() <= 5
            && !text[s..e].ends_with(['.', ','])
            && text[s..e].starts_with(|c: char| c.is_uppercase() || c.is_ascii_digit())
            && !touches(s, e, &strong)
            && touches(lines[1].0, lines[1].1, &|c| c == Category::Address)
        {
            out.push(Finding {
                category: classify(s, e),
                start: s,
                end: e,
            });
        }
    }
}

impl Pass for Affiliation {
    /// Organisations and job titles, the last pass (they lean on the persons and addresses found
    /// before): read against the findings so far, appended after them.
    fn run(&self, cx: &mut ScanContext) {
        let mut more = Vec::new();
        let lines = cx.lines.get(cx.text);
        self.scan(cx.text, lines, cx.all_lower, &cx.found, &mut more);
        cx.found.extend(more);
    }
}

/// Whether a lowercase content word follows `at`: the name before it is used as an adjective
/// ("for Arabic languages"), not as an organisation's name.
fn noun_follows(text: &str, at: usize) -> bool {
    let rest = text[at..].trim_start_matches([' ', '\t']);
    let w: String = rest.chars().take_while(|c| c.is_alphabetic()).collect();
    w.starts_with(char::is_lowercase) && !FUNCTION_WORDS.contains(&w.as_str())
}

/// Whether `s..e` is a heading, not an organisation: the whole line, or a line in title case
/// ("Types of Information Systems"), or "The" and the noun alone ("The Capital of India").
fn heading(text: &str, s: usize, e: usize) -> bool {
    let ls = text[..s].rfind('\n').map_or(0, |i| i + 1);
    let le = text[e..].find('\n').map_or(text.len(), |i| e + i);
    let line = &text[ls..le];
    fn body(t: &str) -> &str {
        t.trim_matches(|c: char| !c.is_alphanumeric())
    }
    if body(line) == body(&text[s..e]) {
        return true;
    }
    let words: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.chars().any(char::is_alphabetic))
        .collect();
    let caps = words
        .iter()
        .filter(|w| w.starts_with(char::is_uppercase))
        .count();
    let short = [
        "of", "and", "for", "in", "the", "to", "a", "on", "with", "&",
    ];
    let small = words.iter().filter(|w| short.contains(w)).count();
    if words.len() >= 3 && caps + small == words.len() && !line.trim_end().ends_with('.') {
        return true;
    }
    text[s..e].split_whitespace().count() == 2 && text[s..e].starts_with("The ")
}

/// Where a look-back of about `len` bytes before `at` starts: after a space, so no word is cut.
fn window_start(text: &str, at: usize, len: usize) -> usize {
    if at <= len {
        return 0;
    }
    let mut from = at - len;
    while !text.is_char_boundary(from) {
        from += 1;
    }
    text[from..at]
        .find(char::is_whitespace)
        .map_or(at, |i| from + i + 1)
}

/// "Reed Elsevier's" names Reed Elsevier.
fn trim_possessive(v: &str) -> &str {
    ["'s", "’s", "'", "’"]
        .iter()
        .find_map(|p| v.strip_suffix(p))
        .unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quasi::{Places, Quasi};
    use Category::*;

    fn found(text: &str) -> Vec<(Category, String)> {
        crate::Detector::new()
            .with_quasi(Quasi::new(Places::default()))
            .scan(text)
            .into_iter()
            .filter(|f| matches!(f.category, Organization | Title))
            .map(|f| (f.category, f.value(text).to_string()))
            .collect()
    }

    #[test]
    fn organisations_by_legal_form_or_head_noun() {
        assert_eq!(
            found("Hill Inc. is an American bank; see Civic Impulse LLC and 3 Round Stones Inc."),
            [
                (Organization, "Hill Inc.".into()),
                (Organization, "Civic Impulse LLC".into()),
                (Organization, "3 Round Stones Inc.".into())
            ]
        );
        assert_eq!(
            found("selma is from stillwater supercomputing inc. today"),
            [(Organization, "stillwater supercomputing inc.".into())]
        );
    }

    #[test]
    fn organisations_by_employment_context() {
        assert_eq!(
            found("I used to work for Deloitte as Midwife, but quit."),
            [(Organization, "Deloitte".into()), (Title, "Midwife".into())]
        );
        assert_eq!(
            found("She spent a year at Walk Score in Oslo."),
            [(Organization, "Walk Score".into())]
        );
    }

    #[test]
    fn organisations_by_what_they_are_or_what_belongs_to_them() {
        assert_eq!(
            found("The Propublica office is near; according to the Uber website, yes."),
            [
                (Organization, "Propublica".into()),
                (Organization, "Uber".into())
            ]
        );
        assert_eq!(
            found("Standard And Poors is a design agency based in Lyon."),
            [(Organization, "Standard And Poors".into())]
        );
        assert_eq!(
            found("the first verse of her Allianz resignation letter"),
            [(Organization, "Allianz".into())]
        );
    }

    #[test]
    fn organisations_by_corporate_events() {
        assert_eq!(
            found("Bloomberg is the brainchild of two founders; Waze was acquired by Google."),
            [
                (Organization, "Bloomberg".into()),
                (Organization, "Google".into())
            ]
        );
    }

    #[test]
    fn organisations_in_texts_without_capitals() {
        assert_eq!(
            found(concat!(
                "the version recorded for dun  bradstreet became a hit; i work for rapid ",
                "cycle solutions",
            )),
            [
                (Organization, "dun  bradstreet".into()),
                (Organization, "rapid cycle solutions".into())
            ]
        );
    }

    #[test]
    fn lists_holding_an_organisation() {
        // Lists holding an organisation.
        assert_eq!(
            found("They are Bekins, Enervee Corporation and Civic Insight."),
            [
                (Organization, "Bekins".into()),
                (Organization, "Enervee Corporation".into()),
                (Organization, "Civic Insight".into())
            ]
        );
    }

    #[test]
    fn job_contexts_adjectives_and_headings_are_no_organisations() {
        // Not organisations: a job's context with no name, a lowercase run without a legal form,
        // a name used as an adjective, headings.
        assert!(found("It works as expected, and we work for a living at home.").is_empty());
        assert!(found("the python website and the react team").is_empty());
        assert!(found("It needs to work for Arabic languages; joined date").is_empty());
        assert!(found("Types of Database Systems\nCredit Services").is_empty());
        assert!(found("How Does Rabbitmq Exchange Works for Publishing Messages?").is_empty());
    }

    #[test]
    fn titles_after_a_person() {
        assert_eq!(
            found("Mr. Godina, the Technical writer, said hello."),
            [(Title, "Mr.".into()), (Title, "Technical writer".into())]
        );
    }

    #[test]
    fn titles_after_i_am_or_she_is() {
        assert_eq!(
            found("I'm a dairy scientist and she is an X-ray technician."),
            [
                (Title, "dairy scientist".into()),
                (Title, "X-ray technician".into())
            ]
        );
        assert!(found("I'm a big fan of it; I am sure.").is_empty());
    }

    #[test]
    fn contact_cards_title_and_firm_lines() {
        assert_eq!(
            found("Dr. Janka Szász\n\nNetwork administrator\nHopstop\n\nPhone:\n60-56-85-91"),
            [
                (Title, "Dr.".into()),
                (Title, "Network administrator".into()),
                (Organization, "Hopstop".into())
            ]
        );
        assert_eq!(
            found("Amazon Web Services\n\n9092 Avda. Generalísimo 6 Apt. 868\nPaulista"),
            [(Organization, "Amazon Web Services".into())]
        );
        // A name line followed by prose and no contact details is no card.
        assert_eq!(
            found("Dr. Janka Szász\nWelcome back\nSee you soon"),
            [(Title, "Dr.".into())]
        );
    }
}
