//! Typed PII / PHI / secret detectors. A regular expression only proposes a candidate; each
//! category then validates it (check digits, octet ranges, entropy, a context word nearby), so a
//! random run of digits is not reported as a card number.

use std::net::Ipv6Addr;

use regex::Regex;
use serde::Serialize;

/// What was found. The label is what placeholders and audit records use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Secret,
    Email,
    CreditCard,
    Iban,
    UsSsn,
    Cpf,
    Cnpj,
    IpAddress,
    Phone,
    DateOfBirth,
    MedicalRecord,
    /// Identity document numbers in context: driver's licence, passport, RG, CNH.
    IdNumber,
    Address,
    Person,
    /// A capitalised word that is no English or Portuguese word ("Dzhambek", "Yefremova"): most
    /// likely the name of a person, a place or an organisation.
    Name,
    /// Quasi-identifiers ([`crate::quasi`], opt-in): web addresses, dates, ages, places,
    /// nationalities and religious or political groups, honorifics and job titles.
    Url,
    Date,
    Age,
    Location,
    Group,
    Title,
    /// An organisation a person belongs to ([`crate::affiliation`], opt-in with the quasi-identifiers).
    Organization,
}

impl Category {
    pub const ALL: [Category; 22] = [
        Category::Secret,
        Category::Email,
        Category::CreditCard,
        Category::Iban,
        Category::UsSsn,
        Category::Cpf,
        Category::Cnpj,
        Category::IpAddress,
        Category::Phone,
        Category::DateOfBirth,
        Category::MedicalRecord,
        Category::IdNumber,
        Category::Address,
        Category::Person,
        Category::Name,
        Category::Url,
        Category::Date,
        Category::Age,
        Category::Location,
        Category::Group,
        Category::Title,
        Category::Organization,
    ];

    /// Upper-case label used in placeholders (`[EMAIL_1]`).
    pub fn label(self) -> &'static str {
        match self {
            Category::Secret => "SECRET",
            Category::Email => "EMAIL",
            Category::CreditCard => "CREDIT_CARD",
            Category::Iban => "IBAN",
            Category::UsSsn => "SSN",
            Category::Cpf => "CPF",
            Category::Cnpj => "CNPJ",
            Category::IpAddress => "IP",
            Category::Phone => "PHONE",
            Category::DateOfBirth => "DOB",
            Category::MedicalRecord => "MRN",
            Category::IdNumber => "ID",
            Category::Address => "ADDRESS",
            Category::Person => "PERSON",
            Category::Name => "NAME",
            Category::Url => "URL",
            Category::Date => "DATE",
            Category::Age => "AGE",
            Category::Location => "LOCATION",
            Category::Group => "GROUP",
            Category::Title => "TITLE",
            Category::Organization => "ORG",
        }
    }

    /// Lower-case name used in config, errors and audit records.
    pub fn name(self) -> &'static str {
        match self {
            Category::Secret => "secret",
            Category::Email => "email",
            Category::CreditCard => "credit_card",
            Category::Iban => "iban",
            Category::UsSsn => "us_ssn",
            Category::Cpf => "cpf",
            Category::Cnpj => "cnpj",
            Category::IpAddress => "ip_address",
            Category::Phone => "phone",
            Category::DateOfBirth => "date_of_birth",
            Category::MedicalRecord => "medical_record",
            Category::IdNumber => "id_number",
            Category::Address => "address",
            Category::Person => "person",
            Category::Name => "name",
            Category::Url => "url",
            Category::Date => "date",
            Category::Age => "age",
            Category::Location => "location",
            Category::Group => "group",
            Category::Title => "title",
            Category::Organization => "organization",
        }
    }

    pub fn is_secret(self) -> bool {
        self == Category::Secret
    }

    /// Overlapping candidates keep the stronger kind: secrets, then check-digit validated
    /// numbers, then shape-validated ones, then context rules.
    fn rank(self) -> u8 {
        match self {
            Category::Secret => 5,
            Category::Email | Category::CreditCard | Category::Iban | Category::Cpf => 4,
            Category::Cnpj | Category::UsSsn | Category::IpAddress => 4,
            Category::DateOfBirth | Category::MedicalRecord | Category::IdNumber => 3,
            Category::Url => 3,
            Category::Phone => 2,
            Category::Address | Category::Person => 1,
            Category::Date | Category::Age => 1,
            Category::Name | Category::Location | Category::Group | Category::Title => 0,
            Category::Organization => 0,
        }
    }
}

/// One detected value: byte offsets into the scanned text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub category: Category,
    pub start: usize,
    pub end: usize,
}

impl Finding {
    pub fn value<'a>(&self, text: &'a str) -> &'a str {
        &text[self.start..self.end]
    }
}

pub(crate) type Check = fn(&str, &str, usize, usize) -> bool;

/// A pattern proposing values of one category, and the check that accepts them.
pub(crate) struct Rule {
    pub(crate) category: Category,
    pub(crate) re: Regex,
    /// Capture group holding the value (0 = the whole match).
    pub(crate) group: usize,
    pub(crate) check: Check,
}

impl Rule {
    pub(crate) fn new(category: Category, re: &str, group: usize, check: Check) -> Self {
        Rule {
            category,
            re: Regex::new(re).unwrap_or_else(|e| panic!("detector {category:?}: {e}")),
            group,
            check,
        }
    }

    /// The value's byte range in every match. find_iter is several times cheaper than
    /// captures_iter; the capture group is only resolved for actual matches (from the match start,
    /// so \b sees the real context).
    pub(crate) fn spans<'t>(&'t self, text: &'t str) -> impl Iterator<Item = (usize, usize)> + 't {
        self.re.find_iter(text).filter_map(move |m| {
            if self.group == 0 {
                return Some((m.start(), m.end()));
            }
            self.re
                .captures_at(text, m.start())
                .and_then(|c| c.get(self.group))
                .map(|g| (g.start(), g.end()))
        })
    }
}

/// All detectors, compiled once; `Detector` is cheap to share (`&self` scanning).
pub struct Detector {
    rules: Vec<Rule>,
    names: Option<Names>,
    /// Dates, ages, web addresses and places, when turned on.
    quasi: Option<crate::quasi::Quasi>,
    /// Capitalised words and initials, for the first-name list.
    words: Regex,
    /// Lowercase words, for names written in lowercase.
    lower: Regex,
    /// A place name and a postal code ending a line.
    postal_line: Regex,
    /// Number, lowercase words, number: a street in a text without capitals.
    lower_address: Regex,
    /// A postal code alone on its line.
    postal_alone: Regex,
    /// "in ⟨place⟩ ⟨postal code⟩" inside a sentence.
    place_postal: Regex,
    /// A name used attributively: "the Castro novel", "the frank freud version".
    attributive: Regex,
    /// A job title before a name, as an honorific is: "Sheriff Kyle Kuefer", "Senior reactor
    /// operator Baader".
    title_name: Regex,
    /// A word that is itself a job or a firm's legal form or head noun ("Trainee", "Ltd"): no name.
    role_word: Regex,
}

/// A list of first names (gender-guesser's `nam_dict.txt`: ~45,000 names from many countries), and
/// optionally the lexicon of [`crate::namewords`]: name words (first and last names rare as
/// ordinary words) and the words known to English or Portuguese.
/// A listed name followed by a capitalised word, or a listed name inside a sentence, is a person;
/// a capitalised unknown word is a name.
pub struct Names {
    set: std::collections::HashSet<String>,
    words: std::collections::HashSet<String>,
    known: std::collections::HashMap<String, f32>,
    /// Whether unknown capitalised words are names ([`Category::Name`]).
    unknown_names: bool,
}

impl Names {
    /// Reads `nam_dict.txt` (a name in columns 3..29 after a gender code; `=` lines are aliases).
    pub fn from_nam_dict(text: &str) -> Self {
        let set = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('='))
            .filter_map(|l| {
                l.get(3..)
                    .map(|r| r.split("  ").next().unwrap_or("").trim())
            })
            .filter(|n| n.chars().count() >= 2 && !n.contains('+') && !n.contains(' '))
            .filter(|n| !COMMON_WORDS.contains(n))
            .map(str::to_string)
            .collect();
        Self {
            set,
            words: Default::default(),
            known: Default::default(),
            unknown_names: true,
        }
    }

    /// Whether unknown words count as names (on by default; off leaves them to the other rules).
    pub fn with_unknown_names(mut self, on: bool) -> Self {
        self.unknown_names = on;
        self
    }

    /// Adds the name words and known words (see [`crate::namewords`]).
    pub fn with_lexicon(mut self, lex: crate::namewords::Lexicon) -> Self {
        self.words = lex.name_words;
        self.known = lex.known;
        self
    }

    pub fn load(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self::from_nam_dict(&std::fs::read_to_string(path)?))
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Whether `w` is a listed first name or a name word. A capitalised word also counts when it
    /// is listed without its accents: the list has "Fabio" and not "Fábio", which as a frequent
    /// Portuguese word is no name word either. (Not in lowercase text: Vietnamese "này" is no
    /// "Nay".)
    pub fn contains(&self, w: &str) -> bool {
        self.set.contains(w)
            || self.words.contains(w)
            || (!w.is_ascii()
                && w.starts_with(char::is_uppercase)
                && self.set.contains(&fold_accents(w)))
    }

    /// Whether `w` is on the first-name list.
    pub fn is_first_name(&self, w: &str) -> bool {
        self.set.contains(w)
    }

    /// Whether `w` is a name word: rare enough as an ordinary word to count at a sentence's start.
    pub fn is_name_word(&self, w: &str) -> bool {
        self.words.contains(w)
    }

    /// Whether `w` (letters, with hyphens or apostrophes inside) is no English or Portuguese word:
    /// a part of it between hyphens and apostrophes, two letters or longer, is not a known word.
    /// Always false without a known-word list.
    pub fn is_unknown(&self, w: &str) -> bool {
        if self.known.is_empty() {
            return false;
        }
        let mut low = String::with_capacity(w.len());
        w.split(['-', '\'', '’'])
            .filter(|p| p.chars().nth(1).is_some())
            .any(|p| {
                low.clear();
                low.extend(p.chars().flat_map(char::to_lowercase));
                !self.known.contains_key(&low)
            })
    }

    /// The Zipf frequency of `w` as an English or Portuguese word (0 when unknown or without a
    /// known-word list).
    pub fn zipf(&self, w: &str) -> f32 {
        let low = w.to_lowercase();
        self.known.get(&low).copied().unwrap_or(0.0)
    }

    /// Whether `w` is unknown and unknown words count as names.
    fn unknown_name(&self, w: &str) -> bool {
        self.unknown_names && self.is_unknown(w)
    }

    /// Whether `w` is a common word (Zipf 5.5 or more: "me", "are", "just", "he", "here"; "john"
    /// is 5.4): where nothing but a list says it is a name (alone, or without a capital), it is
    /// taken for the word.
    pub fn is_common(&self, w: &str) -> bool {
        self.zipf(w) >= 5.5
    }
}

/// Listed as first names somewhere, but far more often ordinary capitalised words in a request.
/// Interjections that open a chat message ("Hi, ...", "Okay, ...") are among them.
const COMMON_WORDS: [&str; 56] = [
    "The", "This", "That", "What", "When", "Where", "Who", "How", "Why", "Can", "May", "Will",
    "Please", "Thanks", "Hello", "Dear", "Street", "Road", "Avenue", "Apt", "Suite", "Unit",
    "Office", "Fax", "Phone", "Mobile", "Desk", "Email", "Mail", "Card", "Bank", "Account",
    "Personal", "Info", "Home", "Work", "North", "South", "East", "West", "New", "Rua", "Avenida",
    "Is", "Hi", "Hey", "Ok", "Okay", "Yes", "Yeah", "Sure", "Oh", "Wow", "Sorry", "Oi", "Olá",
];

/// Words that make a capitalised first word a person when they follow it ("Kevin had given ...").
const NAME_VERBS: [&str; 64] = [
    "is", "was", "has", "had", "said", "says", "asked", "told", "shouted", "spent", "lives",
    "lived", "works", "worked", "went", "wrote", "wants", "wanted", "needs", "gave", "got", "came",
    "left", "who", "would", "could", "did", "does", "thinks", "thought", "knows", "knew", "mora",
    "disse", "began", "became", "made", "took", "saw", "met", "found", "felt", "kept", "sent",
    "brought", "bought", "ran", "won", "lost", "paid", "held", "led", "spoke", "loves", "likes",
    "died", "joined", "called", "started", "moved", "married", "tem", "foi", "era",
];

/// Words after which a lowercase first name is introduced as one ("my name is vitoria", "mr.
/// elliott").
const LOWER_INTRODUCERS: [&str; 13] = [
    "mr.", "mrs.", "ms.", "dr.", "sr.", "sra.", "name is", "name:", "call me", "calls me",
    "me chamo", "nome é", "named",
];

const MONTHS: &str = "(?:jan(?:uary|eiro)?|feb(?:ruary)?|fev(?:ereiro)?|mar(?:ch|ço|co)?|apr(?:il)?|abr(?:il)?|may|mai(?:o)?|june?|jun(?:ho)?|july?|jul(?:ho)?|aug(?:ust)?|ago(?:sto)?|sep(?:t(?:ember)?)?|set(?:embro)?|oct(?:ober)?|out(?:ubro)?|nov(?:ember|embro)?|dec(?:ember)?|dez(?:embro)?)\\.?";

fn date_re() -> String {
    format!(
        r"(?:\d{{1,2}}[/.\-]\d{{1,2}}[/.\-]\d{{2,4}}|\d{{4}}-\d{{2}}-\d{{2}}|(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+|de\s+)?)?{m}(?:\s+\d{{1,2}}(?:st|nd|rd|th)?)?,?\s+(?:de\s+)?\d{{4}})",
        m = MONTHS
    )
}

const STREET_EN: &str = r"(?:Street|Str|St|Avenue|Ave|Road|Rd|Lane|Ln|Boulevard|Blvd|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|Ter|Parkway|Pkwy|Circle|Cir|Square|Sq|Highway|Hwy|Alley|Crescent|Close|Row|Trail|Plaza|Route)(?-u:\b)\.?";
const STREET_EU: &str = r"(?:straße|strasse|str\.|katu|tie|gatan|vägen|vej|weg|gade|laan|straat|allee|platz|gasse|veien|gata|utca|ulica|cesta|iela|tee)";
// Lowercase only where the word is unambiguous ("apt. 169", "suite 112", not "unit 4").
const UNIT: &str = r"(?:Apt|apt|Apartment|apartment|Suite|suite|Ste|Unit|Flat|Apto|apto|Sala|Bloco|Casa)\.?\s*#?\s*\d+[A-Za-z]?";
/// Postal codes: "62488", "53-320", "340 12", "3610-114", Canada's "B0J 2H0", the UK's "SW1A 1AA".
const POSTAL: &str =
    r"\d{2,5}(?:[ \-]\d{2,4})?|[A-Z]\d[A-Z] ?\d[A-Z]\d|[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}";

/// Street words that come before the street's name in French, Spanish, Italian and Polish
/// (lowercase only where the word is no ordinary English word: not "via", "place").
const STREET_BEFORE: &str = r"(?:[Rr]ue|[Aa]venue|[Bb]oulevard|[Cc]hemin|[Aa]llée|Place|Quai|Via|Viale|Calle|Carrer|Paseo|C/|[Uu]l\.|[Uu]lica|Al\.)";
/// Nouns after which a name is a person's, used attributively: "the Castro novel", "the Obama
/// administration", "the frank sinatra version". Not "version", "book" or "album" after a capitalised
/// word: "the Windows version", "the Python book".
const ATTRIBUTED: &str = "novels?|novella|biography|memoir|memoirs|administration|family|era|estate|household|brothers|sisters|twins|version|recording|album|song|book|film|movie";
const NAME: &str = r"\p{Lu}[\p{Ll}'’\-]+(?:[ \t]+(?:\p{Lu}\.|(?:da|de|do|dos|das|van|von|del|la)[ \t]+\p{Lu}[\p{Ll}'’\-]+|\p{Lu}[\p{Ll}'’\-]+)){0,3}";

impl Detector {
    pub fn new() -> Self {
        let date = date_re();
        let specs: Vec<(Category, String, usize, Check)> = vec![
            (
                Category::Secret,
                r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----(?s:.*?)-----END (?:[A-Z]+ )*PRIVATE KEY-----".into(),
                0,
                always,
            ),
            (
                Category::Secret,
                r"(?-u:\b)(?:sk-(?:proj-|ant-|live-)?[A-Za-z0-9_\-]{20,}|sk_(?:live|test)_[A-Za-z0-9]{16,}|rk_live_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}|(?:AKIA|ASIA)[0-9A-Z]{16}|xox[abprse]-[A-Za-z0-9\-]{10,}|AIza[0-9A-Za-z_\-]{35}|glpat-[A-Za-z0-9_\-]{20,})".into(),
                0,
                always,
            ),
            (
                Category::Secret,
                r"(?-u:\b)eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}".into(),
                0,
                always,
            ),
            (
                Category::Secret,
                r#"(?i)(?-u:\b)(?:api[_\-\s]?key|apikey|secret(?:[_\-]?key)?|access[_\-]?key|auth[_\-]?token|token|password|passwd|pwd|senha|chave)(?-u:\b)["']?\s*(?:[:=]|(?-u:\b)is(?-u:\b)|(?-u:\b)é(?-u:\b))\s*["']?([A-Za-z0-9_\-+/=.!@#$%^&*]{8,})"#.into(),
                1,
                high_entropy,
            ),
            (
                Category::Email,
                r"(?-u:\b)[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?-u:\b)".into(),
                0,
                email_ok,
            ),
            (Category::CreditCard, r"(?-u:\b)\d(?:[ \-]?\d){11,18}(?-u:\b)".into(), 0, card_ok),
            // Right after the word "card", any Luhn-valid number of card length is one.
            (
                Category::CreditCard,
                r"(?i)(?-u:\b)(?:card|cart[aã]o|cc)(?-u:\b)(?:\s+(?:number|no\.?|#|n[º°o]\.?))?\s*[:#]?\s*(\d(?:[ \-]?\d){11,18})(?-u:\b)".into(),
                1,
                card_in_context_ok,
            ),
            (
                Category::Iban,
                r"(?i)(?-u:\b)[A-Z]{2}\d{2}[A-Z0-9]{11,30}(?-u:\b)".into(),
                0,
                iban_ok,
            ),
            (
                Category::Iban,
                r"(?i)(?-u:\b)[A-Z]{2}\d{2}(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?(?-u:\b)".into(),
                0,
                iban_ok,
            ),
            (Category::UsSsn, r"(?-u:\b)\d{3}([\- ])\d{2}([\- ])\d{4}(?-u:\b)".into(), 0, ssn_ok),
            (
                Category::UsSsn,
                r"(?i)(?-u:\b)(?:ssn|social security(?: number| no\.?)?)\s*[:#]?\s*(\d{9})(?-u:\b)".into(),
                1,
                ssn_ok,
            ),
            (Category::Cpf, r"(?-u:\b)\d{3}\.?\d{3}\.?\d{3}-?\d{2}(?-u:\b)".into(), 0, cpf_ok),
            (Category::Cnpj, r"(?-u:\b)\d{2}\.?\d{3}\.?\d{3}/?\d{4}-?\d{2}(?-u:\b)".into(), 0, cnpj_ok),
            (
                Category::IpAddress,
                r"(?-u:\b)(?:\d{1,3}\.){3}\d{1,3}(?-u:\b)".into(),
                0,
                ipv4_ok,
            ),
            (
                Category::IpAddress,
                r"(?i)[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?:(?:\d{1,3}\.){3}\d{1,3})?".into(),
                0,
                ipv6_ok,
            ),
            // E.164 and other numbers written with a country code.
            (
                Category::Phone,
                r"\+\d{1,3}(?:[ .\-]?\(?\d{1,5}\)?){1,5}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?-u:\b)".into(),
                0,
                e164_ok,
            ),
            // North American numbers: (212) 555-0199, 212-555-0199, 212.555.0199.
            (
                Category::Phone,
                r"(?:\(\d{3}\)\s?|(?-u:\b)\d{3}[ .\-])\d{3}[ .\-]\d{4}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?-u:\b)".into(),
                0,
                nanp_ok,
            ),
            // Brazilian mobiles and landlines: (11) 98765-4321, 11 3456-7890, 11987654321.
            (
                Category::Phone,
                r"(?:\(\d{2}\)\s?|(?-u:\b)\d{2}\s)9?\d{4}[\- ]?\d{4}(?-u:\b)|(?-u:\b)\d{2}9\d{8}(?-u:\b)".into(),
                0,
                br_phone_ok,
            ),
            // Anything else shaped like a phone number, when a phone word is just before it.
            (
                Category::Phone,
                r"(?i)(?-u:\b)(?:phone|tel|telephone|mobile|cell|fax|desk|office|call|contact|number|answering at|reach me at|messages to|registered|sms|text me at|telefone|celular|fone|whatsapp|ligue|contato)(?-u:\b)[^\d]{0,24}(\+?\(?\d{1,5}\)?(?:[ .\-]?\(?\d{1,5}\)?){0,5}(?:\s?(?:x|ext\.?)\s?\d{1,5})?)".into(),
                1,
                phone_digits_ok,
            ),
            // Numbers with a trunk prefix 0 in groups: 07700 900 123, 0489 25 37 29, 03.93.92.16.85.
            (
                Category::Phone,
                r"(?-u:\b)0\d{1,4}(?:[ .\-]\d{2,4}){2,4}(?-u:\b)".into(),
                0,
                trunk_ok,
            ),
            // A number labelled as a phone right after it: "416 60 039 office", "930.167.3943 fax".
            (
                Category::Phone,
                r"(?i)(\+?\(?\d{1,5}\)?(?:[ .\-]?\(?\d{1,5}\)?){0,5}(?:\s?x\d{1,5})?)\s*-?\s*(?:office|fax|mobile|cell|home|work)(?-u:\b)".into(),
                1,
                phone_digits_ok,
            ),
            (
                Category::DateOfBirth,
                format!(
                    r"(?i)(?-u:\b)(?:born(?:\s+on)?|date\s+of\s+birth|d\.?o\.?b\.?|birth\s?date|birthday|nascid[oa](?:\s+em)?|data\s+de\s+nascimento|nasc\.?)\s*[:\-]?\s*({date})"
                ),
                1,
                always,
            ),
            (
                Category::MedicalRecord,
                r"(?i)(?-u:\b)(?:MRN|medical\s+record(?:\s+(?:number|no\.?|#))?|patient\s+(?:id|number)|health\s+(?:id|plan\s+number)|prontu[aá]rio(?:\s+n[º°o]?\.?)?|registro\s+m[eé]dico|cart[aã]o\s+sus)\s*[:#]?\s*([A-Z0-9][A-Z0-9\-]{4,19})(?-u:\b)".into(),
                1,
                has_digit,
            ),
            (
                Category::IdNumber,
                r"(?i)(?-u:\b)(?:driver'?s?\s+licen[cs]e|driving\s+licen[cs]e|licen[cs]e\s+(?:number|no\.?|#)|passport|carteira\s+de\s+identidade|cnh|rg)(?:\s+(?:number|no\.?|#|n[º°o]\.?))?\s*(?:is|é|:|#)?\s*([A-Z0-9][A-Z0-9.\-]{4,19})(?-u:\b)".into(),
                1,
                has_digit,
            ),
            // A postal code after its label: "ZIP: 394 13", "my zip code is 35350", "CEP 01310-100".
            (
                Category::Address,
                r"(?i)(?-u:\b)(?:zip(?:\s*code)?|postal\s*code|post\s*code|postcode|cep|c[óo]digo\s+postal)\s*(?:is|é|:|#)?\s*(\d{3,5}(?:[ \-]\d{2,4})?)(?-u:\b)".into(),
                1,
                always,
            ),
            (
                Category::Address,
                format!(
                    r"(?-u:\b)\d{{1,6}}[A-Za-z]?(?:-\d+)?\s+(?:\d{{1,5}}\s+)?(?:\p{{Lu}}[\p{{L}}'.\-]*\s+){{0,4}}{STREET_EN}(?:,?\s+{UNIT})?"
                ),
                0,
                always,
            ),
            (
                Category::Address,
                format!(r"(?:(?-u:\b)\d{{1,6}}\s+)?\p{{Lu}}\p{{Ll}}*{STREET_EU}\s+\d{{1,5}}[A-Za-z]?(?-u:\b)(?:,?\s+{UNIT})?"),
                0,
                always,
            ),
            (
                Category::Address,
                r"(?i)(?:(?-u:\b)(?:rua|r\.|avenida|av\.|travessa|tv\.|alameda|al\.|praça|pça\.|estrada|rodovia|largo|calle|carrer|ul\.|ulica)\s+|(?-u:\b)c/\s*)(?:[\p{L}'.]+\s+){0,5}?[\p{L}'.]+,?\s*(?:n[º°o.]?\s*)?\d{1,5}(?-u:\b)".into(),
                0,
                always,
            ),
            (Category::Address, format!(r"(?-u:\b){UNIT}(?-u:\b)"), 0, always),
            // House number, street name, number (the continental order behind a building number:
            // "5049 Harjukuja 54", "3482 Via Franscini 71"), ending the line, a clause or before a unit.
            (
                Category::Address,
                format!(
                    r"(?m)(?-u:\b)(\d{{1,6}}\s+(?:{STREET_BEFORE}\s*)?\p{{Lu}}[\p{{L}}'.\-]*(?:[ \t]+[\p{{L}}'.\-]+){{0,5}}[ \t]+\d{{1,5}}[A-Za-z]?)(?:,|;|$|\.?\s+{UNIT}|\.?\s+{STREET_EN})"
                ),
                1,
                always,
            ),
            // A building number, a street word and the street's name: "56 rue La Boétie",
            // "33 avenue de Provence" (up to a comma or the line's end, five words at most).
            (
                Category::Address,
                format!(
                    r"(?-u:\b)\d{{1,6}}[ \t]+{STREET_BEFORE}[ \t]*[\p{{L}}'.\-]+(?:[ \t]+[\p{{L}}'.\-]+){{0,4}}"
                ),
                0,
                always,
            ),
            // Two numbers before a capitalised street name: "9816 214 Pavlou Drandaki".
            (
                Category::Address,
                r"(?-u:\b)\d{1,6}[ \t]+\d{1,5}[ \t]+\p{Lu}\p{Ll}+(?:[ \t]+\p{Lu}\p{Ll}+){1,3}".into(),
                0,
                always,
            ),
            (
                Category::Address,
                r"(?i)(?-u:\b)(?:P\.?\s?O\.?\s*Box|Caixa\s+Postal|Apartado(?:\s+de\s+Correos)?)\s+\d{1,6}(?-u:\b)".into(),
                0,
                always,
            ),
            // US military addresses: "PSC 0413, Box 8144 APO AA 42323", "USNS Lopez FPO AE 12345".
            (
                Category::Address,
                r"(?-u:\b)(?:(?:PSC|Unit)\s+\d{4},?\s+Box\s+\d{4}|(?:USNS|USNV|USS|USCGC)\s+\p{Lu}\p{Ll}+)\s+(?:APO|FPO|DPO)\s+A[AEP]\s+\d{5}(?-u:\b)".into(),
                0,
                always,
            ),
            (
                Category::Person,
                format!(
                    r"(?-u:\b)(?:Mr|Mrs|Ms|mr|mrs|ms|Miss|Mx|Dr|Prof|Sr|Sra|Srta|Dra|Dona)\.?\s+({NAME})"
                ),
                1,
                always,
            ),
            (
                Category::Person,
                format!(
                    r"(?i:(?-u:\b)(?:my name is|name is|name:|named|called|i am|i'm|dear|hi|hello|olá|oi|prezad[oa]|caro|cara|meu nome é|me chamo|chamad[oa]|patient|paciente|signed|regards,|atenciosamente,|sincerely,|thanks,|obrigad[oa],|says|said|asked|replied|call me|calls me|disse)\s+)({NAME})"
                ),
                1,
                not_common_word,
            ),
        ];
        let rules: Vec<Rule> = specs
            .into_iter()
            .map(|(category, re, group, check)| Rule::new(category, &re, group, check))
            .collect();
        // Capitalised words ("McDowell" whole), initials with a period, and bare initials
        // ("Stephan M Urner").
        // No \b: Unicode word boundaries push the regex engine off its DFA (measured: the
        // backtracker then took 40% of detection); the callers check the neighbours instead.
        let words = Regex::new(r"Ma?c\p{Lu}[\p{Ll}'’\-]+|\p{Lu}[\p{Ll}'’\-]+|\p{Lu}\.|\p{Lu}")
            .expect("words");
        Self {
            rules,
            names: None,
            quasi: None,
            words,
            lower: Regex::new(r"\p{Ll}[\p{Ll}'’\-]*\p{Ll}").expect("lowercase words"),
            postal_alone: Regex::new(&format!(r"(?m)^[ \t>]*({POSTAL})[ \t]*$"))
                .expect("postal code line"),
            place_postal: Regex::new(
                r"(?-u:\b)(?:in|at|from|near|em|de|of)[ \t]+((?:[\p{L}'’.\-]+[ \t]+){1,4}?)(\d{5}-\d{3}|\d{4}-\d{3}|\d{3} \d{2}|\d{4,5})(?-u:\b)",
            )
            .expect("place and postal code"),
            title_name: Regex::new(&format!(
                r"(?-u:\b)((?i:{}))[ \t]+(\p{{Lu}}[\p{{Ll}}'’\-]+(?:[ \t]+\p{{Lu}}[\p{{Ll}}'’\-]+)?)(?-u:\b)",
                crate::affiliation::OCCUPATIONS
            ))
            .expect("job title and name"),
            role_word: Regex::new(&format!(
                r"^(?:(?i:{})|{}|{})$",
                crate::affiliation::OCCUPATIONS,
                crate::affiliation::LEGAL_FORMS,
                crate::affiliation::ORG_HEADS
            ))
            .expect("role word"),
            attributive: Regex::new(&format!(
                r"(?-u:\b)[Tt]he[ \t]+(\p{{Lu}}[\p{{Ll}}'’\-]+(?:[ \t]+\p{{Lu}}[\p{{Ll}}'’\-]+)?|\p{{Ll}}+[ \t]+\p{{Ll}}+)[ \t]+({ATTRIBUTED})(?-u:\b)"
            ))
            .expect("attributive name"),
            lower_address: Regex::new(
                r"(?-u:\b)\d{1,6}[ \t]+((?:[\p{Ll}'.\-]+[ \t]+){1,4})\d{1,5}[a-z]?(?-u:\b)",
            )
            .expect("lowercase address"),
            postal_line: Regex::new(
                &format!(r"(?m)\p{{L}}[\p{{L}}.\-]+(?:[ \t]+\([\p{{L}} ]+\))?,?[ \t]+((?:[A-Z]{{2,3}}[ \t]+)?(?:{POSTAL}))[ \t]*$"),
            )
            .expect("postal line"),
        }
    }

    /// Adds the quasi-identifiers: dates, ages, web addresses and places.
    pub fn with_quasi(mut self, quasi: crate::quasi::Quasi) -> Self {
        self.quasi = Some(quasi);
        self
    }

    /// Adds person detection by a first-name list.
    pub fn with_names(mut self, names: Names) -> Self {
        self.names = Some(names);
        self
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
            crate::namewords::push_capitalised(&mut cap, stem);
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
    fn scan_names(&self, text: &str, all_lower: bool, out: &mut Vec<Finding>) {
        let Some(names) = &self.names else {
            return;
        };
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
            crate::namewords::name_shaped(w) && names.unknown_name(w)
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
                crate::namewords::push_capitalised(&mut cap, a);
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
            if crate::namewords::name_shaped(w)
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
    fn scan_title_names(&self, names: &Names, text: &str, out: &mut Vec<Finding>) {
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
            let from = crate::affiliation::words_before(text, t.start(), 3);
            let start = crate::affiliation::title_start(&text[from..t.end()])
                .map_or(t.start(), |i| from + i);
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
                if self.quasi.is_some() {
                    out.push(Finding {
                        category: Category::Title,
                        start,
                        end: t.end(),
                    });
                }
            }
        }
    }

    /// Every finding in `text`, sorted by start, without overlaps.
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        let mut cands: Vec<Finding> = Vec::new();
        for rule in &self.rules {
            for (s0, e0) in rule.spans(text) {
                let (s, e) = trim_span(text, s0, e0);
                if s < e && (rule.check)(text, &text[s..e], s, e) {
                    cands.push(Finding {
                        category: rule.category,
                        start: s,
                        end: e,
                    });
                }
            }
        }
        let all_lower = no_capitals(text);
        self.scan_names(text, all_lower, &mut cands);
        if let Some(names) = &self.names {
            self.scan_title_names(names, text, &mut cands);
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
                    crate::namewords::push_capitalised(&mut cap, w);
                    w.chars().nth(2).is_some() && (names.is_unknown(w) || names.contains(&cap))
                }) || (words.len() >= 2
                    && words.iter().all(|w| {
                        w.chars().filter(|c| c.is_alphabetic()).count() >= 3
                            && !w.chars().any(char::is_lowercase)
                    }));
                // A year is no postal code here ("from April 2020").
                let year =
                    code.len() == 4 && matches!(code.as_str().parse::<u16>(), Ok(1900..=2099));
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
                        let m = c.get(0).expect("whole match");
                        cands.push(Finding {
                            category: Category::Address,
                            start: m.start(),
                            end: m.end(),
                        });
                    }
                }
            }
        }
        // The text's lines, for the quasi-identifiers' line rules (towns above countries, contact
        // cards).
        let lines = match self.quasi {
            Some(_) => crate::affiliation::content_lines(text),
            None => Vec::new(),
        };
        if let Some(q) = &self.quasi {
            let unknown = |w: &str| self.names.as_ref().is_some_and(|n| n.is_unknown(w));
            q.scan(text, &lines, all_lower, &unknown, &mut cands);
        }
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
        if let Some(q) = &self.quasi {
            let mut more = Vec::new();
            q.affiliation
                .scan(text, &lines, all_lower, &cands, &mut more);
            cands.extend(more);
        }
        resolve(cands)
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

impl Default for Detector {
    fn default() -> Self {
        Self::new()
    }
}

/// `w` without its accents ("Fábio" → "Fabio"): decomposed, combining marks dropped.
fn fold_accents(w: &str) -> String {
    use unicode_normalization::{char::is_combining_mark, UnicodeNormalization};
    w.nfd().filter(|c| !is_combining_mark(*c)).collect()
}

/// Trailing punctuation and spaces are not part of a value.
fn trim_span(text: &str, s: usize, mut e: usize) -> (usize, usize) {
    while e > s {
        let c = text[..e].chars().next_back().unwrap_or(' ');
        if c.is_whitespace() || matches!(c, ',' | ';' | ':') {
            e -= c.len_utf8();
        } else {
            break;
        }
    }
    (s, e)
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

fn always(_: &str, _: &str, _: usize, _: usize) -> bool {
    true
}

fn digits(v: &str) -> Vec<u8> {
    v.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

/// The characters just around a match: a digit or letter glued to it means it is part of
/// something longer (an order number, a hash).
pub(crate) fn glued(text: &str, s: usize, e: usize) -> bool {
    let before = text[..s].chars().next_back();
    let after = text[e..].chars().next();
    let bad = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    bad(before) || bad(after)
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

/// Whether `text` has no capital letter at all (so capitals give no hint of a name).
fn no_capitals(text: &str) -> bool {
    !text.chars().any(char::is_uppercase)
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

fn has_digit(_: &str, v: &str, _: usize, _: usize) -> bool {
    v.bytes().any(|b| b.is_ascii_digit())
}

fn email_ok(_: &str, v: &str, _: usize, _: usize) -> bool {
    let Some((local, domain)) = v.split_once('@') else {
        return false;
    };
    !local.ends_with('.') && !local.contains("..") && !domain.contains("..") && local.len() <= 64
}

pub fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut x = x as u32;
        if i % 2 == 1 {
            x *= 2;
            if x > 9 {
                x -= 9;
            }
        }
        sum += x;
    }
    sum.is_multiple_of(10)
}

fn card_in_context_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    let d = digits(v);
    (12..=19).contains(&d.len()) && !glued(text, s, e) && luhn(&d)
}

/// Without the word "card" before it, a number also needs one separator style and an issuer range.
fn card_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    // "+44 7700 …" is a phone number.
    if !card_in_context_ok(text, v, s, e) || text[..s].ends_with('+') {
        return false;
    }
    let d = digits(v);
    // One separator style only (groups like "4111 1111 1111 1111" or "4111-1111-...").
    let seps: Vec<char> = v.chars().filter(|c| !c.is_ascii_digit()).collect();
    if seps.windows(2).any(|w| w[0] != w[1]) {
        return false;
    }
    // Issuer ranges: Visa, Mastercard, Amex, Diners, Discover, JCB, Maestro, UnionPay, Elo, Hipercard.
    let p2 = d[0] * 10 + d[1];
    let p4: u32 = d[..4].iter().fold(0, |a, &x| a * 10 + x as u32);
    matches!(d[0], 3..=6) || (22..=27).contains(&p2) || (d.len() == 15 && matches!(p4, 1800 | 2131))
}

/// ISO 13616: move the first four characters to the end, letters become 10..35, the number mod 97 is 1.
pub fn iban_mod97(v: &str) -> bool {
    let s: Vec<char> = v
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if s.len() < 15 || s.len() > 34 {
        return false;
    }
    let mut rem = 0u32;
    for c in s[4..].iter().chain(s[..4].iter()) {
        let n = match c {
            '0'..='9' => *c as u32 - '0' as u32,
            'A'..='Z' => *c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if n >= 10 {
            (rem * 100 + n) % 97
        } else {
            (rem * 10 + n) % 97
        };
    }
    rem == 1
}

fn iban_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    !glued(text, s, e) && iban_mod97(v)
}

fn ssn_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    let d = digits(v);
    if d.len() != 9 || glued(text, s, e) {
        return false;
    }
    // Hyphen and space forms must not mix ("123-45 6789" is something else).
    let seps: Vec<char> = v.chars().filter(|c| !c.is_ascii_digit()).collect();
    if seps.windows(2).any(|w| w[0] != w[1]) {
        return false;
    }
    let area = d[0] as u32 * 100 + d[1] as u32 * 10 + d[2] as u32;
    let group = d[3] * 10 + d[4];
    let serial = d[5..].iter().fold(0u32, |a, &x| a * 10 + x as u32);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// Brazilian CPF: two mod-11 check digits over weights 10..2 and 11..2.
pub fn cpf_valid(d: &[u8]) -> bool {
    if d.len() != 11 || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let check = |n: usize| {
        let s: u32 = (0..n)
            .map(|i| d[i] as u32 * (n as u32 + 1 - i as u32))
            .sum();
        let r = (s * 10) % 11;
        if r == 10 {
            0
        } else {
            r as u8
        }
    };
    check(9) == d[9] && check(10) == d[10]
}

fn cpf_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    // Either fully punctuated (123.456.789-09) or bare digits.
    let punct = v.contains('.') || v.contains('-');
    let well_formed = !punct || (v.len() == 14 && v.matches('.').count() == 2);
    well_formed && !glued(text, s, e) && cpf_valid(&digits(v))
}

/// Brazilian CNPJ: two mod-11 check digits with weights 5..2,9..2 and 6..2,9..2.
pub fn cnpj_valid(d: &[u8]) -> bool {
    if d.len() != 14 || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let check = |n: usize| {
        let w: &[u32] = if n == 12 {
            &[5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]
        } else {
            &[6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]
        };
        let s: u32 = (0..n).map(|i| d[i] as u32 * w[i]).sum();
        let r = s % 11;
        if r < 2 {
            0
        } else {
            (11 - r) as u8
        }
    };
    check(12) == d[12] && check(13) == d[13]
}

fn cnpj_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    !glued(text, s, e) && cnpj_valid(&digits(v))
}

fn ipv4_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    // "1.2.3.4.5" is a version number, not an address.
    let after = &text[e..];
    if after.starts_with('.') && after[1..].starts_with(|c: char| c.is_ascii_digit()) {
        return false;
    }
    if text[..s].ends_with('.') {
        return false;
    }
    v.split('.').all(|o| {
        o.parse::<u32>()
            .is_ok_and(|n| n <= 255 && (o.len() == 1 || !o.starts_with('0')))
    })
}

fn ipv6_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    // Clock times (10:30:00) and ratios parse as nothing; require hex groups or "::".
    if glued(text, s, e) || v.matches(':').count() < 2 {
        return false;
    }
    if !v.contains("::") && v.matches(':').count() < 7 {
        return false;
    }
    v.parse::<Ipv6Addr>().is_ok() && v.chars().any(|c| c.is_ascii_hexdigit())
}

/// The number without its extension ("x459", "ext. 12").
fn main_number(v: &str) -> &str {
    v.find(['x', 'e']).map_or(v, |i| v[..i].trim_end())
}

fn trunk_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    let n = digits(v).len();
    (9..=12).contains(&n) && !glued(text, s, e)
}

fn e164_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    let n = digits(main_number(v)).len();
    (8..=15).contains(&n) && !glued(text, s, e)
}

fn nanp_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    let d = digits(main_number(v));
    // Area code and exchange start with 2-9.
    d.len() == 10 && d[0] >= 2 && d[3] >= 2 && !glued(text, s, e) && !text[..s].ends_with('+')
}

fn br_phone_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    let d = digits(v);
    if glued(text, s, e) || d[0] == 0 || d[1] == 0 {
        return false;
    }
    match d.len() {
        11 => d[2] == 9,
        10 => (2..=5).contains(&d[2]),
        _ => false,
    }
}

fn phone_digits_ok(text: &str, v: &str, s: usize, e: usize) -> bool {
    let n = digits(main_number(v)).len();
    (7..=15).contains(&n) && !glued(text, s, e)
}

/// Shannon entropy of the value's characters, in bits per character.
fn entropy(v: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in v.bytes() {
        counts[b as usize] += 1;
    }
    let n = v.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

fn high_entropy(_: &str, v: &str, _: usize, _: usize) -> bool {
    let classes = [
        v.bytes().any(|b| b.is_ascii_lowercase()),
        v.bytes().any(|b| b.is_ascii_uppercase()),
        v.bytes().any(|b| b.is_ascii_digit()),
        v.bytes().any(|b| !b.is_ascii_alphanumeric()),
    ]
    .iter()
    .filter(|&&x| x)
    .count();
    v.len() >= 8 && classes >= 2 && entropy(v) >= 2.8
}

/// Words that follow "I am", "hello", "from" capitalised without being names.
const NOT_NAMES: [&str; 47] = [
    "The",
    "This",
    "That",
    "There",
    "Here",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "God",
    "Team",
    "All",
    "Everyone",
    "World",
    "Support",
    "Sir",
    "Madam",
    "Customer",
    "Please",
    "Thanks",
    "Thank",
    "Sorry",
    "Not",
    "Just",
    "Still",
    "Dr",
    "Mr",
    "Mrs",
    "Ms",
    "Sr",
    "Sra",
    "Prof",
];

fn not_common_word(_: &str, v: &str, _: usize, _: usize) -> bool {
    let first = v.split_whitespace().next().unwrap_or("");
    !NOT_NAMES.contains(&first) && first.chars().count() >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(Category, String)> {
        Detector::new()
            .scan(text)
            .into_iter()
            .map(|f| (f.category, f.value(text).to_string()))
            .collect()
    }

    fn has(text: &str, c: Category, v: &str) {
        let f = found(text);
        assert!(
            f.iter().any(|(k, x)| *k == c && x == v),
            "{c:?} {v:?} not found in {text:?}: {f:?}"
        );
    }

    fn none_of(text: &str, c: Category) {
        let f = found(text);
        assert!(
            f.iter().all(|(k, _)| *k != c),
            "{c:?} wrongly found in {text:?}: {f:?}"
        );
    }

    /// Continental street order behind a building number, and US military addresses; a count of
    /// things at a sentence's end is not an address.
    #[test]
    fn continental_and_military_addresses() {
        has(
            "Kevin had given Alma his address: 5049 Harjukuja 54, SEINÄJOKI",
            Category::Address,
            "5049 Harjukuja 54",
        );
        // Pieces of one address are one finding.
        has(
            "Billing: 3482 Via Franscini 71 Suite 838\nTujetsch",
            Category::Address,
            "3482 Via Franscini 71 Suite 838",
        );
        has(
            "Tilly lives at 10252 Μεγάλη Άμμος 184\n",
            Category::Address,
            "10252 Μεγάλη Άμμος 184",
        );
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
        // Two building numbers, and the postal code closing an address block (only with an address).
        has(
            "The restaurant is at 17151 2450 Crown St",
            Category::Address,
            "17151 2450 Crown St",
        );
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
            "Send it to 17151 2450 Crown St.\nWe will all be there by the end of the week.\nEstonia 62488",
            Category::Address,
            "62488",
        );
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
        // Postal codes: labelled, or alone on the last line of an address block.
        has("ZIP: 394 13", Category::Address, "394 13");
        has("my zip code is 35350", Category::Address, "35350");
        has("CEP: 01310-100", Category::Address, "01310-100");
        has(
            "Billing: 03262 2437 Main St Suite 442\n   Mill Village\n    NS\n    B0J 2H0",
            Category::Address,
            "03262 2437 Main St Suite 442\n   Mill Village\n    NS\n    B0J 2H0",
        );
        none_of("Total\n 2024", Category::Address);
        none_of("Upgrade to Windows 2000\nor Office 2019", Category::Address);
        none_of("We sent 3 via email and 2 by post.", Category::Address);
        none_of("I bought 3 Apples for 4.", Category::Address);
        none_of(
            "We sold 12 units in 2023 and 14 in 2024.",
            Category::Address,
        );
    }

    /// A first name alone at a sentence's start counts only when addressed, speaking or owning
    /// something; a name word (rare as an ordinary word) counts there anyway.
    #[test]
    fn names_at_a_sentence_start() {
        let names = Names::from_nam_dict(
            "M  Mark                        1\nF  Nicole                      1\nM  Fabio                       1\n",
        )
        .with_lexicon(crate::namewords::Lexicon {
            name_words: ["Christiansen".to_string()].into(),
            known: Default::default(),
        });
        let det = Detector::new().with_names(names);
        let persons = |text: &str| -> Vec<String> {
            det.scan(text)
                .into_iter()
                .filter(|f| f.category == Category::Person)
                .map(|f| f.value(text).to_string())
                .collect()
        };
        assert!(persons("Mark the date in the calendar.").is_empty());
        assert_eq!(persons("Mark, call me."), ["Mark"]);
        assert_eq!(persons("Nicole: remember me?"), ["Nicole"]);
        assert_eq!(persons("Nicole's address changed."), ["Nicole"]);
        assert_eq!(persons("Christiansen wrote it."), ["Christiansen"]);
        assert_eq!(
            persons("We met Christiansen and Mark today."),
            ["Christiansen", "Mark"]
        );
        // Lowercase inside a text with capitals: the capitals would have marked a name.
        assert!(persons("Then christiansen wrote it.").is_empty());
        // A verb after a first name at a sentence's start; bare initials only between names.
        assert_eq!(persons("Mark had given it back."), ["Mark"]);
        assert_eq!(
            persons("Write to Mark M Christiansen today."),
            ["Mark M Christiansen"]
        );
        assert_eq!(persons("Then Mark I think left."), ["Mark"]);
        // Coordinated with a person, and after a speech verb.
        assert_eq!(
            persons("Our founders: Morrison, Mark and Torres."),
            ["Morrison", "Mark", "Torres"]
        );
        assert!(persons("Our founders: Morrison and Torres.").is_empty());
        // Lowercase: a first name followed by a name word.
        assert_eq!(
            persons("follow up with nicole christiansen soon"),
            ["nicole christiansen"]
        );
        assert!(persons("Please mark the christiansen file").is_empty());
        // A capitalised first name listed without its accents.
        assert_eq!(persons("Please correct it to Fábio."), ["Fábio"]);
        assert!(persons("please correct it to fábio.").is_empty());
        // A job title before a name works as an honorific; a role or a firm is no name.
        assert_eq!(persons("Ask Sheriff Mark today."), ["Mark"]);
        assert_eq!(persons("For Accounting clerk Xyzzyq, see"), ["Xyzzyq"]);
        assert!(persons("Process Engineer Trainee (3 months)").is_empty());
        assert!(persons("The Shepherd Ltd. Orchestra").is_empty());
    }

    /// Capitalised words that are no known word are names; without any capital, name words,
    /// unknown words and introduced or listed first names count alone; a name found once is found
    /// again; dialogue speakers.
    #[test]
    fn unknown_words_lowercase_texts_repeats_and_speakers() {
        let known = [
            "the", "had", "given", "his", "address", "is", "from", "we", "met", "at", "noon",
            "early", "work", "by", "my", "name", "they", "and", "what", "a", "wife", "remember",
            "me", "will", "are", "you", "just", "he", "on", "redeem", "to", "tales", "i",
            "between", "lives", "bulgak", "leverett", "unlike", "castro", "novel", "windows",
            "version", "frank", "freud", "support", "in", "it", "ran", "can", "help", "focuses",
            "class", "file", "today",
        ];
        let common = [
            "the", "is", "and", "a", "me", "are", "you", "to", "on", "he", "my", "i", "windows",
            "today",
        ];
        let names = Names::from_nam_dict(
            "M  Mark                        1\nF  Nicole                      1\nM  Adam                        1\nF  Donna                       1\nM  Brian                       1\nF  Danielle                    1\nM  Will                        1\nM  Are                         1\nM  To                          1\nM  Frank                       1\nM  Hi                          1\nM  Tab                         1\nM  You                         1\nM  File                        1\n",
        )
        .with_lexicon(crate::namewords::Lexicon {
            name_words: ["Christiansen".to_string()].into(),
            known: known
                .iter()
                .map(|w| (w.to_string(), if common.contains(w) { 6.0 } else { 3.0 }))
                .collect(),
        });
        let det = Detector::new().with_names(names);
        let of = |text: &str, c: Category| -> Vec<String> {
            det.scan(text)
                .into_iter()
                .filter(|f| f.category == c)
                .map(|f| f.value(text).to_string())
                .collect()
        };
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
        // A first name that is a common word is no evidence of a person on its own.
        assert!(of("We met To Are at noon.", Category::Person).is_empty());
        assert!(of("We met To at noon.", Category::Person).is_empty());
        assert_eq!(
            of("We met To Christiansen at noon.", Category::Person),
            ["To Christiansen"]
        );
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
        // No capital anywhere: a name word or an unknown word alone, an introduced first name, a
        // list of first names, a first name before a colon; not common words that are names too.
        assert_eq!(
            of("the work of christiansen", Category::Person),
            ["christiansen"]
        );
        assert_eq!(of("early samoylova work", Category::Name), ["samoylova"]);
        assert_eq!(of("my name is mark", Category::Person), ["mark"]);
        assert_eq!(
            of("my name is mark bulgak", Category::Person),
            ["mark bulgak"]
        );
        assert_eq!(of("my name is mark and i", Category::Person), ["mark"]);
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
        // A capital somewhere: lowercase words alone stay words.
        assert!(of("I met samoylova early", Category::Name).is_empty());
        // A name found once is the same name later in the text.
        assert_eq!(
            of(
                "The tales of Mark Bulgak. Early Bulgak is best.",
                Category::Person
            ),
            ["Mark Bulgak", "Bulgak"]
        );
        // Dialogue speakers, when one is a person.
        assert_eq!(
            of(
                "Leverett: What a wife.\nDanielle: Remember me?",
                Category::Person
            ),
            ["Leverett", "Danielle"]
        );
        assert!(of("Address: 5 Main St\nNote: by noon", Category::Person).is_empty());
        // Lowercase addresses need an unknown word between the numbers.
        assert_eq!(
            of("it is at 255 hersnapvej 18, near", Category::Address),
            ["255 hersnapvej 18"]
        );
        assert!(of("between 10 and 20", Category::Address).is_empty());
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
        // Interjections, common words opening a sentence, names in code, common-word speakers and
        // a first name after an unknown word in lowercase are no persons.
        assert!(of("Hi, can you help", Category::Person).is_empty());
        assert_eq!(of("Today, Mark focuses", Category::Person), ["Mark"]);
        assert!(of("class Tab(Base): Tab.open()", Category::Person).is_empty());
        assert_eq!(
            of("You: help me\nNicole: help you\nAdam: ok", Category::Person),
            ["Nicole", "Adam"]
        );
        assert!(of("help load csv file to it", Category::Person).is_empty());
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
    fn speech_verbs_and_lowercase_titles_introduce_names() {
        has(
            "\"That helps,\" says Hartvigsson.",
            Category::Person,
            "Hartvigsson",
        );
        has("Sometimes people call me Piusz", Category::Person, "Piusz");
        has(
            "I'd like to join accounts with ms. Quinzia",
            Category::Person,
            "Quinzia",
        );
    }

    #[test]
    fn check_digit_validators() {
        assert!(luhn(&digits("4111111111111111")));
        assert!(!luhn(&digits("4111111111111112")));
        assert!(iban_mod97("GB82 WEST 1234 5698 7654 32"));
        assert!(iban_mod97("DE89370400440532013000"));
        assert!(!iban_mod97("DE89370400440532013001"));
        assert!(cpf_valid(&digits("529.982.247-25")));
        assert!(!cpf_valid(&digits("529.982.247-26")));
        assert!(!cpf_valid(&digits("111.111.111-11")));
        assert!(cnpj_valid(&digits("11.222.333/0001-81")));
        assert!(!cnpj_valid(&digits("11.222.333/0001-82")));
    }

    #[test]
    fn validated_numbers_and_their_look_alikes() {
        has(
            "card 4111 1111 1111 1111 ok",
            Category::CreditCard,
            "4111 1111 1111 1111",
        );
        none_of("order 4111 1111 1111 1112", Category::CreditCard);
        has(
            "IBAN: GB82 WEST 1234 5698 7654 32.",
            Category::Iban,
            "GB82 WEST 1234 5698 7654 32",
        );
        has("ssn 078-05-1120", Category::UsSsn, "078-05-1120");
        none_of("ssn 000-05-1120 and 666-12-3456", Category::UsSsn);
        has("CPF 529.982.247-25", Category::Cpf, "529.982.247-25");
        has("cpf 52998224725 ok", Category::Cpf, "52998224725");
        none_of("cpf 529.982.247-26", Category::Cpf);
        has(
            "CNPJ 11.222.333/0001-81",
            Category::Cnpj,
            "11.222.333/0001-81",
        );
        has("CNPJ 11222333000181", Category::Cnpj, "11222333000181");
        has(
            "from 192.168.10.255 to",
            Category::IpAddress,
            "192.168.10.255",
        );
        none_of("version 1.2.3.4.5 and 300.1.1.1", Category::IpAddress);
        has(
            "host 2001:db8::8a2e:370:7334 up",
            Category::IpAddress,
            "2001:db8::8a2e:370:7334",
        );
        none_of("at 10:30:00 sharp", Category::IpAddress);
    }

    #[test]
    fn emails_phones_and_context() {
        has(
            "mail ana.silva@example.com.br now",
            Category::Email,
            "ana.silva@example.com.br",
        );
        has(
            "call +55 11 98765-4321",
            Category::Phone,
            "+55 11 98765-4321",
        );
        has("ligue (11) 98765-4321", Category::Phone, "(11) 98765-4321");
        has("fixo 21 3456-7890", Category::Phone, "21 3456-7890");
        has("at (212) 555-0199.", Category::Phone, "(212) 555-0199");
        has("E.164 +14155552671", Category::Phone, "+14155552671");
        has("mobile: 07700 900 123", Category::Phone, "07700 900 123");
        has(
            "date of birth: 12/03/1980",
            Category::DateOfBirth,
            "12/03/1980",
        );
        has(
            "nascido em 3 de março de 1975",
            Category::DateOfBirth,
            "3 de março de 1975",
        );
        has("MRN: 00123456", Category::MedicalRecord, "00123456");
        has(
            "My driver's license number is F162823540116",
            Category::IdNumber,
            "F162823540116",
        );
        has("passport no. X1234567", Category::IdNumber, "X1234567");
        none_of("my passport is expired", Category::IdNumber);
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
        has(
            "mora na Rua das Flores, 123",
            Category::Address,
            "Rua das Flores, 123",
        );
        has("Dear Maria Oliveira,", Category::Person, "Maria Oliveira");
        has(
            "meu nome é João da Silva.",
            Category::Person,
            "João da Silva",
        );
        none_of("Hello World", Category::Person);
    }

    #[test]
    fn secrets() {
        has(
            "key sk-proj-abcdefghijklmnopqrstuvwx123",
            Category::Secret,
            "sk-proj-abcdefghijklmnopqrstuvwx123",
        );
        has(
            "AKIAIOSFODNN7EXAMPLE",
            Category::Secret,
            "AKIAIOSFODNN7EXAMPLE",
        );
        has(
            "t=ghp_0123456789abcdefghijABCDEFGHIJ012345",
            Category::Secret,
            "ghp_0123456789abcdefghijABCDEFGHIJ012345",
        );
        has(
            "xoxb-1234-5678-abcdefgh",
            Category::Secret,
            "xoxb-1234-5678-abcdefgh",
        );
        let jwt =
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        has(&format!("Bearer {jwt}"), Category::Secret, jwt);
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY-----";
        has(&format!("x\n{pem}\ny"), Category::Secret, pem);
        has("password=Tr0ub4dor&3x!", Category::Secret, "Tr0ub4dor&3x!");
        has(
            "api_key: \"a8F3kd93JdkQ0xZ\"",
            Category::Secret,
            "a8F3kd93JdkQ0xZ",
        );
        none_of("the password is secret", Category::Secret);
    }
}
