//! Structured identifiers, the detector's first pass: secrets, e-mail addresses, card and account
//! numbers, national numbers (SSN, CPF, CNPJ), IP addresses, phone numbers, dates of birth,
//! medical record and identity document numbers, street addresses and honorifics. A regular
//! expression only proposes a candidate; each category then validates it (check digits, octet
//! ranges, entropy, a context word nearby), so a random run of digits is not reported as a card
//! number.
//!
//! Imports only the bottom modules and the scan context.

use std::net::Ipv6Addr;

use crate::context::{Pass, ScanContext};
use crate::core::{glued, Category, Check, Finding, Rule};
use crate::lists::{
    MONTH_ABBREVIATIONS, NOT_NAMES, STREET_ENDINGS, STREET_SUFFIXES, STREET_WORDS_BEFORE,
    UNIT_WORDS,
};

/// The rules for structured identifiers, compiled once.
pub(crate) struct Structured {
    rules: Vec<Rule>,
}

fn date_re() -> String {
    format!(
        concat!(
            r"(?:\d{{1,2}}[/.\-]\d{{1,2}}[/.\-]\d{{2,4}}|\d{{4}}-\d{{2}}-\d{{2}}|",
            r"(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+|de\s+)?)?{m}(?:\s+\d{{1,2}}(?:st",
            r"|nd|rd|th)?)?,?\s+(?:de\s+)?\d{{4}})",
        ),
        m = format!(r"(?:{})\.?", *MONTH_ABBREVIATIONS)
    )
}

const NAME: &str = concat!(
    r"\p{Lu}[\p{Ll}'’\-]+(?:[ \t]+(?:\p{Lu}\.|(?:da|de|do|dos|",
    r"das|van|von|del|la)[ \t]+\p{Lu}[\p{Ll}'’\-]+|\p{Lu}[\p{Ll}'’\-]+)){0,3}",
);

impl Structured {
    pub(crate) fn new() -> Self {
        let date = date_re();
        let street_en = format!(r"(?:{})(?-u:\b)\.?", *STREET_SUFFIXES);
        let street_eu = format!("(?:{})", *STREET_ENDINGS);
        let street_before = format!("(?:{})", *STREET_WORDS_BEFORE);
        let unit = format!(r"(?:{})\.?\s*#?\s*\d+[A-Za-z]?", *UNIT_WORDS);
        let specs: Vec<(Category, String, usize, Check)> = vec![
            (
                Category::Secret,
                concat!(
                    r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----(?s:.*?)-----END (?:[A-Z]+ )*PRIV",
                    r"ATE KEY-----",
                )
                .into(),
                0,
                always,
            ),
            (
                Category::Secret,
                concat!(
                    r"(?-u:\b)(?:sk-(?:proj-|ant-|live-)?[A-Za-z0-9_\-]{20,}|",
                    r"sk_(?:live|test)_[A-Za-z0-9]{16,}|rk_live_[A-Za-z0-9]{16,}|",
                    r"gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}|",
                    r"(?:AKIA|ASIA)[0-9A-Z]{16}|xox[abprse]-[A-Za-z0-9\-]{10,}|",
                    r"AIza[0-9A-Za-z_\-]{35}|glpat-[A-Za-z0-9_\-]{20,})",
                )
                .into(),
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
                concat!(
                    r#"(?i)(?-u:\b)(?:api[_\-\s]?key|apikey|secret(?:[_\-]?key)?|"#,
                    r#"access[_\-]?key|auth[_\-]?token|token|password|passwd|pwd|"#,
                    r#"senha|chave)(?-u:\b)["']?\s*(?:[:=]|(?-u:\b)is(?-u:\b)|"#,
                    r#"(?-u:\b)é(?-u:\b))\s*["']?([A-Za-z0-9_\-+/=.!@#$%^&*]{8,})"#,
                )
                .into(),
                1,
                high_entropy,
            ),
            (
                Category::Email,
                concat!(
                    r"(?-u:\b)[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-",
                    r"z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(",
                    r"?-u:\b)",
                )
                .into(),
                0,
                email_ok,
            ),
            (
                Category::CreditCard,
                r"(?-u:\b)\d(?:[ \-]?\d){11,18}(?-u:\b)".into(),
                0,
                card_ok,
            ),
            // Right after the word "card", any Luhn-valid number of card length is one.
            (
                Category::CreditCard,
                concat!(
                    r"(?i)(?-u:\b)(?:card|cart[aã]o|cc)(?-u:\b)(?:\s+(?:number|",
                    r"no\.?|#|n[º°o]\.?))?\s*[:#]?\s*(\d(?:[ \-]?\d){11,18})(?-u:\b)",
                )
                .into(),
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
            (
                Category::UsSsn,
                r"(?-u:\b)\d{3}([\- ])\d{2}([\- ])\d{4}(?-u:\b)".into(),
                0,
                ssn_ok,
            ),
            (
                Category::UsSsn,
                concat!(
                    r"(?i)(?-u:\b)(?:ssn|social security(?: number| no\.?)?)\s*[:#]?\s*(\d{9})",
                    r"(?-u:\b)",
                )
                .into(),
                1,
                ssn_ok,
            ),
            (
                Category::Cpf,
                r"(?-u:\b)\d{3}\.?\d{3}\.?\d{3}-?\d{2}(?-u:\b)".into(),
                0,
                cpf_ok,
            ),
            (
                Category::Cnpj,
                r"(?-u:\b)\d{2}\.?\d{3}\.?\d{3}/?\d{4}-?\d{2}(?-u:\b)".into(),
                0,
                cnpj_ok,
            ),
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
                concat!(
                    r"\+\d{1,3}(?:[ .\-]?\(?\d{1,5}\)?){1,5}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?-u",
                    r":\b)",
                )
                .into(),
                0,
                e164_ok,
            ),
            // North American numbers: (212) 555-0199, 212-555-0199, 212.555.0199.
            (
                Category::Phone,
                concat!(
                    r"(?:\(\d{3}\)\s?|(?-u:\b)\d{3}[ .\-])\d{3}[ .\-]\d{4}(?:\s?(?:x|",
                    r"ext\.?)\s?\d{1,5})?(?-u:\b)",
                )
                .into(),
                0,
                nanp_ok,
            ),
            // Brazilian mobiles and landlines: (11) 98765-4321, 11 3456-7890, 11987654321.
            (
                Category::Phone,
                concat!(
                    r"(?:\(\d{2}\)\s?|(?-u:\b)\d{2}\s)9?\d{4}[\- ]?\d{4}(?-u:\b)|",
                    r"(?-u:\b)\d{2}9\d{8}(?-u:\b)",
                )
                .into(),
                0,
                br_phone_ok,
            ),
            // Anything else shaped like a phone number, when a phone word is just before it.
            (
                Category::Phone,
                concat!(
                    r"(?i)(?-u:\b)(?:phone|tel|telephone|mobile|cell|fax|desk|",
                    r"office|call|contact|number|answering at|reach me at|messages to|",
                    r"registered|sms|text me at|telefone|celular|fone|whatsapp|",
                    r"ligue|contato)(?-u:\b)[^\d]{0,24}(\+?\(?\d{1,5}\)?(?:[ .\-]?\(?\d{1,5}\)",
                    r"?){0,5}(?:\s?(?:x|ext\.?)\s?\d{1,5})?)",
                )
                .into(),
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
                concat!(
                    r"(?i)(\+?\(?\d{1,5}\)?(?:[ .\-]?\(?\d{1,5}\)?){0,5}(?:\s?x\d{1,5})?)\s*-?",
                    r"\s*(?:office|fax|mobile|cell|home|work)(?-u:\b)",
                )
                .into(),
                1,
                phone_digits_ok,
            ),
            (
                Category::DateOfBirth,
                format!(
                    concat!(
                        r"(?i)(?-u:\b)(?:born(?:\s+on)?|date\s+of\s+birth|d\.?o\.?b\.?|",
                        r"birth\s?date|birthday|nascid[oa](?:\s+em)?|data\s+de\s+nascimento|",
                        r"nasc\.?)\s*[:\-]?\s*({date})",
                    ),
                    date = date
                ),
                1,
                always,
            ),
            (
                Category::MedicalRecord,
                concat!(
                    r"(?i)(?-u:\b)(?:MRN|medical\s+record(?:\s+(?:number|no\.?|",
                    r"#))?|patient\s+(?:id|number)|health\s+(?:id|plan\s+number)|",
                    r"prontu[aá]rio(?:\s+n[º°o]?\.?)?|registro\s+m[eé]dico|cart[aã]o\s+sus)\s*",
                    r"[:#]?\s*([A-Z0-9][A-Z0-9\-]{4,19})(?-u:\b)",
                )
                .into(),
                1,
                has_digit,
            ),
            (
                Category::IdNumber,
                concat!(
                    r"(?i)(?-u:\b)(?:driver'?s?\s+licen[cs]e|driving\s+licen[cs]e|",
                    r"licen[cs]e\s+(?:number|no\.?|#)|passport|carteira\s+de\s+identidade|",
                    r"cnh|rg)(?:\s+(?:number|no\.?|#|n[º°o]\.?))?\s*(?:is|é|:|",
                    r"#)?\s*([A-Z0-9][A-Z0-9.\-]{4,19})(?-u:\b)",
                )
                .into(),
                1,
                has_digit,
            ),
            // A postal code after its label: "ZIP: 394 13", "my zip code is 35350", "CEP 01310-100".
            (
                Category::Address,
                concat!(
                    r"(?i)(?-u:\b)(?:zip(?:\s*code)?|postal\s*code|post\s*code|",
                    r"postcode|cep|c[óo]digo\s+postal)\s*(?:is|é|:|#)?\s*(\d{3,5}(?:[ \-]\d{2,",
                    r"4})?)(?-u:\b)",
                )
                .into(),
                1,
                always,
            ),
            (
                Category::Address,
                format!(
                    concat!(
                        r"(?-u:\b)\d{{1,6}}[A-Za-z]?(?:-\d+)?\s+(?:\d{{1,5}}\s+)?(?:\p{{Lu}}[\p{{L",
                        r"}}'.\-]*\s+){{0,4}}{street_en}(?:,?\s+{unit})?",
                    ),
                    street_en = street_en,
                    unit = unit
                ),
                0,
                always,
            ),
            (
                Category::Address,
                format!(
                    concat!(
                        r"(?:(?-u:\b)\d{{1,6}}\s+)?\p{{Lu}}\p{{Ll}}*{street_eu}\s+\d{{1,5}}[A-Za-z",
                        r"]?(?-u:\b)(?:,?\s+{unit})?",
                    ),
                    street_eu = street_eu,
                    unit = unit
                ),
                0,
                always,
            ),
            (
                Category::Address,
                concat!(
                    r"(?i)(?:(?-u:\b)(?:rua|r\.|avenida|av\.|travessa|tv\.|alameda|",
                    r"al\.|praça|pça\.|estrada|rodovia|largo|calle|carrer|ul\.|",
                    r"ulica)\s+|(?-u:\b)c/\s*)(?:[\p{L}'.]+\s+){0,5}?[\p{L}'.]+,?\s*(?:n[º°o.]",
                    r"?\s*)?\d{1,5}(?-u:\b)",
                )
                .into(),
                0,
                always,
            ),
            (
                Category::Address,
                format!(r"(?-u:\b){unit}(?-u:\b)"),
                0,
                always,
            ),
            // House number, street name, number (the continental order behind a building number:
            // "5049 Harjukuja 54", "3482 Via Franscini 71"), ending the line, a clause or before a unit.
            (
                Category::Address,
                format!(
                    concat!(
                        r"(?m)(?-u:\b)(\d{{1,6}}\s+(?:{street_before}\s*)?\p{{Lu}}[\p{{L}}'.\-]*(?",
                        r":[ \t]+[\p{{L}}'.\-]+){{0,5}}[ \t]+\d{{1,5}}[A-Za-z]?)(?:,|",
                        r";|$|\.?\s+{unit}|\.?\s+{street_en})",
                    ),
                    street_before = street_before,
                    unit = unit,
                    street_en = street_en
                ),
                1,
                always,
            ),
            // A building number, a street word and the street's name: "56 rue La Boétie",
            // "33 avenue de Provence" (up to a comma or the line's end, five words at most).
            (
                Category::Address,
                format!(
                    concat!(
                        r"(?-u:\b)\d{{1,6}}[ \t]+{street_before}[ \t]*[\p{{L}}'.\-]+(?:[ \t]+[\p{{",
                        r"L}}'.\-]+){{0,4}}",
                    ),
                    street_before = street_before
                ),
                0,
                always,
            ),
            // Two numbers before a capitalised street name: "9816 214 Pavlou Drandaki".
            (
                Category::Address,
                concat!(
                    r"(?-u:\b)\d{1,6}[ \t]+\d{1,5}[ \t]+\p{Lu}\p{Ll}+(?:[ \t]+\p{Lu}\p{Ll}+){1",
                    r",3}",
                )
                .into(),
                0,
                always,
            ),
            (
                Category::Address,
                concat!(
                    r"(?i)(?-u:\b)(?:P\.?\s?O\.?\s*Box|Caixa\s+Postal|Apartado(?:\s+de\s+Corre",
                    r"os)?)\s+\d{1,6}(?-u:\b)",
                )
                .into(),
                0,
                always,
            ),
            // US military addresses: "PSC 0413, Box 8144 APO AA 42323", "USNS Lopez FPO AE 12345".
            (
                Category::Address,
                concat!(
                    r"(?-u:\b)(?:(?:PSC|Unit)\s+\d{4},?\s+Box\s+\d{4}|(?:USNS|",
                    r"USNV|USS|USCGC)\s+\p{Lu}\p{Ll}+)\s+(?:APO|FPO|DPO)\s+A[AEP]\s+\d{5}(?-u:",
                    r"\b)",
                )
                .into(),
                0,
                always,
            ),
            (
                Category::Person,
                format!(
                    concat!(
                        r"(?-u:\b)(?:Mr|Mrs|Ms|mr|mrs|ms|Miss|Mx|Dr|Prof|Sr|Sra|Srta|",
                        r"Dra|Dona)\.?\s+({NAME})",
                    ),
                    NAME = NAME
                ),
                1,
                always,
            ),
            (
                Category::Person,
                format!(
                    concat!(
                        r"(?i:(?-u:\b)(?:my name is|name is|name:|named|called|i am|",
                        r"i'm|dear|hi|hello|olá|oi|prezad[oa]|caro|cara|meu nome é|",
                        r"me chamo|chamad[oa]|patient|paciente|signed|regards,|atenciosamente,|",
                        r"sincerely,|thanks,|obrigad[oa],|says|said|asked|replied|",
                        r"call me|calls me|disse)\s+)({NAME})",
                    ),
                    NAME = NAME
                ),
                1,
                not_common_word,
            ),
        ];
        let rules: Vec<Rule> = specs
            .into_iter()
            .map(|(category, re, group, check)| Rule::new(category, &re, group, check))
            .collect();
        Self { rules }
    }
}

impl Pass for Structured {
    /// Every rule's candidates that its check accepts, trailing punctuation trimmed.
    fn run(&self, cx: &mut ScanContext) {
        let text = cx.text;
        for rule in &self.rules {
            for (s0, e0) in rule.spans(text) {
                let (s, e) = trim_span(text, s0, e0);
                if s < e && (rule.check)(text, &text[s..e], s, e) {
                    cx.found.push(Finding {
                        category: rule.category,
                        start: s,
                        end: e,
                    });
                }
            }
        }
    }
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

fn always(_: &str, _: &str, _: usize, _: usize) -> bool {
    true
}

fn digits(v: &str) -> Vec<u8> {
    v.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
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

/// The first word of an introduced name is no word that follows "I am", "hello", "from"
/// capitalised without being a name (`data/not_names.txt`).
fn not_common_word(_: &str, v: &str, _: usize, _: usize) -> bool {
    let first = v.split_whitespace().next().unwrap_or("");
    !NOT_NAMES.contains(&first) && first.chars().count() >= 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{has, none_of};

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
    fn greetings_and_introductions_introduce_names() {
        has("Dear Maria Oliveira,", Category::Person, "Maria Oliveira");
        has(
            "meu nome é João da Silva.",
            Category::Person,
            "João da Silva",
        );
        none_of("Hello World", Category::Person);
    }

    #[test]
    fn luhn_check_digit() {
        assert!(luhn(&digits("4111111111111111")));
        assert!(!luhn(&digits("4111111111111112")));
    }

    #[test]
    fn iban_mod97_check() {
        assert!(iban_mod97("GB82 WEST 1234 5698 7654 32"));
        assert!(iban_mod97("DE89370400440532013000"));
        assert!(!iban_mod97("DE89370400440532013001"));
    }

    #[test]
    fn cpf_check_digits() {
        assert!(cpf_valid(&digits("529.982.247-25")));
        assert!(!cpf_valid(&digits("529.982.247-26")));
        assert!(!cpf_valid(&digits("111.111.111-11")));
    }

    #[test]
    fn cnpj_check_digits() {
        assert!(cnpj_valid(&digits("11.222.333/0001-81")));
        assert!(!cnpj_valid(&digits("11.222.333/0001-82")));
    }

    #[test]
    fn card_numbers_need_a_valid_luhn_digit() {
        has(
            "card 4111 1111 1111 1111 ok",
            Category::CreditCard,
            "4111 1111 1111 1111",
        );
        none_of("order 4111 1111 1111 1112", Category::CreditCard);
    }

    #[test]
    fn ibans() {
        has(
            "IBAN: GB82 WEST 1234 5698 7654 32.",
            Category::Iban,
            "GB82 WEST 1234 5698 7654 32",
        );
    }

    #[test]
    fn us_ssns_and_invalid_areas() {
        has("ssn 078-05-1120", Category::UsSsn, "078-05-1120");
        none_of("ssn 000-05-1120 and 666-12-3456", Category::UsSsn);
    }

    #[test]
    fn cpf_and_cnpj_numbers() {
        has("CPF 529.982.247-25", Category::Cpf, "529.982.247-25");
        has("cpf 52998224725 ok", Category::Cpf, "52998224725");
        none_of("cpf 529.982.247-26", Category::Cpf);
        has(
            "CNPJ 11.222.333/0001-81",
            Category::Cnpj,
            "11.222.333/0001-81",
        );
        has("CNPJ 11222333000181", Category::Cnpj, "11222333000181");
    }

    #[test]
    fn ip_addresses_and_their_look_alikes() {
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
    fn email_addresses() {
        has(
            "mail ana.silva@example.com.br now",
            Category::Email,
            "ana.silva@example.com.br",
        );
    }

    #[test]
    fn phone_numbers_in_many_formats() {
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
    }

    #[test]
    fn dates_of_birth() {
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
    }

    #[test]
    fn medical_record_numbers() {
        has("MRN: 00123456", Category::MedicalRecord, "00123456");
        has(
            "mora na Rua das Flores, 123",
            Category::Address,
            "Rua das Flores, 123",
        );
    }

    #[test]
    fn identity_document_numbers_in_context() {
        has(
            "My driver's license number is F162823540116",
            Category::IdNumber,
            "F162823540116",
        );
        has("passport no. X1234567", Category::IdNumber, "X1234567");
        none_of("my passport is expired", Category::IdNumber);
    }

    #[test]
    fn api_keys_and_tokens() {
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
    }

    #[test]
    fn jwts_and_private_keys() {
        let jwt =
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        has(&format!("Bearer {jwt}"), Category::Secret, jwt);
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY-----";
        has(&format!("x\n{pem}\ny"), Category::Secret, pem);
    }

    #[test]
    fn passwords_need_entropy() {
        has("password=Tr0ub4dor&3x!", Category::Secret, "Tr0ub4dor&3x!");
        has(
            "api_key: \"a8F3kd93JdkQ0xZ\"",
            Category::Secret,
            "a8F3kd93JdkQ0xZ",
        );
        none_of("the password is secret", Category::Secret);
    }
}
