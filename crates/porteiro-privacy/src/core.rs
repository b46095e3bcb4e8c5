//! The types every detector pass shares: what was found ([`Category`], [`Finding`]), a pattern
//! that proposes candidates with the check that accepts them ([`Rule`]), and [`glued`].
//!
//! The bottom of the crate: imports no other module of it.

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
    pub(crate) fn rank(self) -> u8 {
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
            re: regex(re),
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

/// Compiles one of the crate's patterns. Each is a constant, or built from constants and the
/// word lists compiled in (`data/*.txt`): none depends on input, and the tests build every
/// detector (`Detector::new()`, `with_names`, `with_quasi`), so a bad pattern fails them.
// Why the allow: a pattern that does not compile is a bug in this crate, caught by its tests,
// never a condition a caller could handle.
#[allow(clippy::expect_used)]
pub(crate) fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("the crate's patterns are constants checked by its tests")
}

/// The characters just around a match: a digit or letter glued to it means it is part of
/// something longer (an order number, a hash).
pub(crate) fn glued(text: &str, s: usize, e: usize) -> bool {
    let before = text[..s].chars().next_back();
    let after = text[e..].chars().next();
    let bad = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    bad(before) || bad(after)
}
