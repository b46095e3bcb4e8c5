//! The privacy proof on the real binary: `porteiro serve` between the official `openai` client and a
//! recording upstream, fed the whole labelled PII corpus (scripts/privacy_e2e.py). Checks that no
//! value of a validated category reaches the upstream under `mask` or `keep_local`, that masked
//! answers come back restored (JSON and streams), block/allow/secrets, and that `porteiro audit
//! verify` passes on the trail and catches edited, deleted, reordered, inserted and cut records;
//! then again with quasi-identifiers on.
//!
//! Skipped with a message when the model, the first-name list, the corpus or the `openai` package
//! are missing, unless PORTEIRO_REQUIRE_MODELS=1 (scripts/test-setup.sh provides all four).
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use common::skip;

/// The labelled corpus, when `data` (and with `quasi` the place lists) are cached and the corpus
/// is fetched; None (skipped, with a message) otherwise.
fn labelled_corpus(data: &[&str], quasi: bool) -> Option<std::path::PathBuf> {
    let places: &[&str] = if quasi {
        &["places-cities", "places-countries"]
    } else {
        &[]
    };
    if !data.iter().chain(places).all(|d| common::cached(d)) {
        return None;
    }
    let corpus = porteiro_models::fetch::home_dir().join("data/pii_synth_v2.json");
    if !corpus.exists() {
        skip(&format!("{} (scripts/fetch-pii.sh)", corpus.display()));
        return None;
    }
    Some(corpus)
}

/// Runs scripts/privacy_e2e.py on the labelled corpus (with `--quasi` when `quasi`); skipped when
/// the model, a list, the corpus or the `openai` package is missing.
fn run_proof(quasi: bool) {
    let Some(corpus) = labelled_corpus(&["smollm2-135m", "names"], quasi) else {
        return;
    };
    if !common::python_has("openai") {
        return skip("python3 with the `openai` package");
    }
    let mut args = vec!["--corpus".as_ref(), corpus.as_os_str()];
    if quasi {
        args.push("--quasi".as_ref());
    }
    assert!(
        common::run_script("privacy_e2e.py", &args),
        "scripts/privacy_e2e.py {} failed",
        if quasi { "--quasi" } else { "" }
    );
}

#[test]
fn no_personal_data_reaches_the_upstream_and_the_audit_trail_holds() {
    run_proof(false);
}

/// The same proof with `[privacy] quasi_identifiers = true`: dates, ages, web addresses and
/// nationalities must not reach the upstream either.
#[test]
fn with_quasi_identifiers_no_dates_ages_or_web_addresses_reach_the_upstream() {
    run_proof(true);
}

/// `porteiro privacy eval --json` on the labelled corpus (with `--quasi-identifiers` when `quasi`);
/// None (skipped) when a list or the corpus is missing.
fn eval_rows(quasi: bool) -> Option<Vec<serde_json::Value>> {
    let lists = [
        "names",
        "forenames",
        "surnames",
        "wordfreq-en",
        "wordfreq-pt",
    ];
    labelled_corpus(&lists, quasi)?;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rows.json");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_porteiro"));
    cmd.arg("privacy");
    if quasi {
        cmd.arg("--quasi-identifiers");
    }
    let out = cmd.args(["eval", "--json"]).arg(&json).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    Some(serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap())
}

/// Each (category, precision floor, recall floor, floor of the share masked by any detector, most
/// predictions on no labelled value) holds in `rows`.
fn check_floors(rows: &[serde_json::Value], floors: &[(&str, f64, f64, f64, u64)]) {
    for &(cat, p, r, c, outside) in floors {
        let row = rows.iter().find(|x| x["category"] == cat).unwrap();
        let n = |k: &str| row[k].as_u64().unwrap() as f64;
        let (pp, rr) = (n("correct") / n("predicted"), n("found") / n("gold"));
        let cc = n("covered") / n("gold");
        assert!(
            pp >= p && rr >= r && cc >= c && n("outside") <= outside as f64,
            "{cat}: precision {pp:.3} (floor {p}), recall {rr:.3} (floor {r}), masked {cc:.3} (floor {c}), {} on no labelled value (at most {outside})",
            n("outside")
        );
    }
}

/// Precision and recall on the labelled corpus stay at least where they were measured, with the
/// detector the binary builds (first names and name words): `porteiro privacy eval --json`.
#[test]
fn detector_quality_on_the_labelled_corpus() {
    let Some(rows) = eval_rows(false) else {
        return;
    };
    check_floors(
        &rows,
        &[
            ("email", 0.99, 0.99, 0.99, 0),
            ("credit_card", 0.99, 0.99, 0.99, 0),
            ("iban", 0.99, 0.99, 0.99, 0),
            ("us_ssn", 0.99, 0.99, 0.99, 0),
            ("ip_address", 0.99, 0.99, 0.99, 0),
            ("phone", 0.93, 0.99, 0.99, 0),
            ("address", 0.97, 0.92, 0.999, 5),
            ("id_number", 0.99, 0.99, 0.99, 0),
            ("person", 0.69, 0.96, 0.999, 60),
        ],
    );
    // The unknown-word detector fires only on labelled values here.
    let name = rows.iter().find(|x| x["category"] == "name").unwrap();
    assert_eq!(name["outside"], 0, "name: {name}");
}

/// With quasi-identifiers on (`--quasi-identifiers`), their rows hold too.
#[test]
fn quasi_identifier_quality_on_the_labelled_corpus() {
    let Some(rows) = eval_rows(true) else {
        return;
    };
    check_floors(
        &rows,
        &[
            ("url", 0.99, 0.99, 0.99, 0),
            ("age", 0.99, 0.95, 0.99, 0),
            ("date", 0.90, 0.90, 0.99, 10),
            ("group", 0.60, 0.75, 0.99, 12),
            ("location", 0.65, 0.30, 0.999, 2),
            ("title", 0.80, 0.93, 0.999, 15),
            ("organization", 0.88, 0.32, 0.999, 0),
            ("person", 0.69, 0.96, 0.999, 60),
        ],
    );
}
