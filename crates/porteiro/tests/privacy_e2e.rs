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

/// Precision and recall on the labelled corpus stay at least where they were measured
/// (`porteiro privacy eval` prints the whole table).
#[test]
fn detector_quality_on_the_labelled_corpus() {
    let names = match porteiro_models::fetch::resolve_model("names", false) {
        Ok(p) => p,
        Err(e) => return skip(&format!("names not cached: {e}")),
    };
    let corpus = porteiro_models::fetch::home_dir().join("data/pii_synth_v2.json");
    if !corpus.exists() {
        return skip(&format!("{} (scripts/fetch-pii.sh)", corpus.display()));
    }
    use porteiro_privacy::{detect::Names, eval, Detector};
    let det = Detector::new().with_names(Names::load(&names).unwrap());
    let samples = eval::read_corpus(&corpus).unwrap();
    assert_eq!(samples.len(), 1500);
    let rows = eval::evaluate(&det, &samples);
    println!("{}", eval::table(&rows));
    let floors = [
        ("email", 0.99, 0.99),
        ("credit_card", 0.99, 0.99),
        ("iban", 0.99, 0.99),
        ("us_ssn", 0.99, 0.99),
        ("ip_address", 0.99, 0.99),
        ("phone", 0.93, 0.99),
        ("address", 0.97, 0.45),
        ("person", 0.70, 0.58),
    ];
    for (cat, p, r) in floors {
        let row = rows.iter().find(|x| x.category == cat).unwrap();
        let (pp, rr) = (row.precision().unwrap(), row.recall().unwrap());
        assert!(
            pp >= p && rr >= r,
            "{cat}: precision {pp:.3} (floor {p}), recall {rr:.3} (floor {r})"
        );
    }
}
