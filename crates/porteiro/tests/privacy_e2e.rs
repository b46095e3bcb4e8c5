//! The privacy proof on the real binary: `porteiro serve` between the official `openai` client and a
//! recording upstream, fed the whole labelled PII corpus (scripts/privacy_e2e.py). Checks that no
//! value of a validated category reaches the upstream under `mask` or `keep_local`, that masked
//! answers come back restored (JSON and streams), block/allow/secrets, and that `porteiro audit
//! verify` passes on the trail and catches edited, deleted, reordered, inserted and cut records.
//!
//! Skipped with a message when the model, the first-name list, the corpus or the `openai` package
//! are missing, unless PORTEIRO_REQUIRE_MODELS=1 (scripts/test-setup.sh provides all four).

mod common;

use common::skip;

#[test]
fn no_personal_data_reaches_the_upstream_and_the_audit_trail_holds() {
    if !common::cached("smollm2-135m") || !common::cached("names") {
        return;
    }
    let corpus = porteiro_models::fetch::home_dir().join("data/pii_synth_v2.json");
    if !corpus.exists() {
        return skip(&format!("{} (scripts/fetch-pii.sh)", corpus.display()));
    }
    if !common::python_has("openai") {
        return skip("python3 with the `openai` package");
    }
    assert!(
        common::run_script("privacy_e2e.py", &["--corpus".as_ref(), corpus.as_os_str()]),
        "scripts/privacy_e2e.py failed"
    );
}

/// Precision and recall on the labelled corpus stay at least where they were measured, with the
/// detector the binary builds (first names and name words): `porteiro privacy eval --json`.
#[test]
fn detector_quality_on_the_labelled_corpus() {
    for list in [
        "names",
        "forenames",
        "surnames",
        "wordfreq-en",
        "wordfreq-pt",
    ] {
        if !common::cached(list) {
            return;
        }
    }
    let corpus = porteiro_models::fetch::home_dir().join("data/pii_synth_v2.json");
    if !corpus.exists() {
        return skip(&format!("{} (scripts/fetch-pii.sh)", corpus.display()));
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rows.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_porteiro"))
        .args(["privacy", "eval", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // (category, precision floor, recall floor, floor of the share masked by any detector, most
    // predictions on no labelled value)
    let floors = [
        ("email", 0.99, 0.99, 0.99, 0),
        ("credit_card", 0.99, 0.99, 0.99, 0),
        ("iban", 0.99, 0.99, 0.99, 0),
        ("us_ssn", 0.99, 0.99, 0.99, 0),
        ("ip_address", 0.99, 0.99, 0.99, 0),
        ("phone", 0.93, 0.99, 0.99, 0),
        ("address", 0.97, 0.92, 0.999, 5),
        ("id_number", 0.99, 0.99, 0.99, 0),
        ("person", 0.65, 0.96, 0.999, 62),
    ];
    for (cat, p, r, c, outside) in floors {
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
    // The unknown-word detector fires only on labelled values here.
    let name = rows.iter().find(|x| x["category"] == "name").unwrap();
    assert_eq!(name["outside"], 0, "name: {name}");
}
