//! The PostgreSQL sink against a real server: a throwaway cluster (Debian's postgresql binaries,
//! `initdb` + `pg_ctl`, Unix socket only) started here, two writers standing for two gateway
//! replicas, migrations run once, sealed texts, retention. Skipped when PostgreSQL is not
//! installed, unless PORTEIRO_REQUIRE_MODELS=1 (scripts/test-setup.sh installs it).

// A test: a failed unwrap is a failed test; skip messages go to stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use porteiro_telemetry::log::{LogWriter, Sealer, Sink};
use porteiro_telemetry::pg::PgLog;
use porteiro_telemetry::RequestRecord;

fn pg_bin(name: &str) -> Option<PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    let mut found: Vec<PathBuf> = dirs
        .flatten()
        .map(|d| d.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// Runs a PostgreSQL tool as the `postgres` user when we are root (initdb refuses root).
fn run(bin: &Path, args: &[&str]) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    c.args(args).status().is_ok_and(|s| s.success())
}

struct Cluster {
    pg_ctl: PathBuf,
    data: String,
    _dir: tempfile::TempDir,
    conninfo: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        run(
            &self.pg_ctl,
            &["-D", &self.data, "-m", "immediate", "-w", "stop"],
        );
    }
}

fn start() -> Option<Cluster> {
    let (initdb, pg_ctl) = (pg_bin("initdb")?, pg_bin("pg_ctl")?);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = dir.path().join("data").display().to_string();
    let sock = dir.path().display().to_string();
    let port = 20000 + (std::process::id() % 20000);
    assert!(
        run(
            &initdb,
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "porteiro",
                "--no-sync",
                "-E",
                "UTF8"
            ]
        ),
        "initdb failed"
    );
    let opts = format!("-p {port} -k {sock} -c listen_addresses='' -c fsync=off");
    assert!(
        run(
            &pg_ctl,
            &[
                "-D",
                &data,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "-l",
                &format!("{sock}/log"),
                "start"
            ]
        ),
        "pg_ctl start failed"
    );
    Some(Cluster {
        pg_ctl,
        data,
        conninfo: format!("host={sock} port={port} user=porteiro dbname=postgres"),
        _dir: dir,
    })
}

fn rec(replica: usize, i: usize) -> RequestRecord {
    RequestRecord {
        id: format!("r{replica}-{i}"),
        ts_ms: 1_000_000 + i as i64,
        tier: "local".into(),
        model: "m".into(),
        route: "auto".into(),
        status: 200,
        privacy: "none".into(),
        latency_ms: 5.0,
        prompt: Some(format!("plaintext prompt {i}")),
        sample: i
            .is_multiple_of(10)
            .then(|| format!("{{\"request\": {i}}}")),
        ..Default::default()
    }
}

#[test]
fn two_replicas_share_one_postgres_table() {
    let Some(c) = start() else {
        assert!(
            std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
            "PostgreSQL (initdb, pg_ctl) required but not installed"
        );
        eprintln!("skipping: PostgreSQL is not installed");
        return;
    };
    let sealer = Sealer::new(b"pg-key");
    let writers: Vec<LogWriter> = (0..2)
        .map(|_| {
            LogWriter::spawn(
                PgLog::connect(&c.conninfo).unwrap(),
                1000,
                Some(sealer.clone()),
                None,
            )
            .unwrap()
        })
        .collect();
    for i in 0..50 {
        for (r, w) in writers.iter().enumerate() {
            w.record(rec(r, i));
        }
    }
    for w in &writers {
        w.flush();
        assert_eq!(
            w.stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
    // A third connection finds the schema current and every row.
    let mut reader = PgLog::connect(&c.conninfo).unwrap();
    assert_eq!(reader.count().unwrap(), 100);
    let prompts = reader.prompts().unwrap();
    assert!(prompts.iter().all(|p| {
        let b = p.as_ref().unwrap();
        !b.windows(9).any(|w| w == b"plaintext")
            && sealer.open(b).unwrap().starts_with("plaintext prompt")
    }));
    // The flywheel reads the samples back, opened.
    let samples = reader.samples(0, &sealer).unwrap();
    assert_eq!(samples.len(), 10);
    assert!(samples.iter().all(
        |r| r.sample.as_deref() == Some(&*format!("{{\"request\": {}}}", r.ts_ms - 1_000_000))
    ));
    // Retention: rows at ts 1_000_000..1_000_049; a 10 ms TTL at 1_000_030 keeps 20 per replica.
    assert_eq!(
        reader.purge(Duration::from_millis(10), 1_000_030).unwrap(),
        40
    );
    assert_eq!(reader.count().unwrap(), 60);
}
