//! The audit trail: one append-only SQLite table whose rows are hash-chained. Each row's hash covers
//! its own fields and the previous row's hash, so editing, inserting, deleting or reordering rows
//! breaks the chain at a place `verify` names. With a key (`PORTEIRO_AUDIT_KEY`), the hash is an
//! HMAC, so someone who can write the database still cannot forge a consistent chain.
//! Records hold categories and counts, never values.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash the first record links to.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit database {path}: {source}")]
    Db {
        path: String,
        source: rusqlite::Error,
    },
    #[error("audit export: {0}")]
    Io(#[from] std::io::Error),
    #[error("the audit writer has stopped")]
    Stopped,
}

/// What one request did with personal data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct AuditRecord {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub request_id: String,
    /// A fingerprint of the client's API key (never the key), or "anonymous".
    pub key_id: String,
    pub tier: String,
    pub route: String,
    /// `keep_local`, `mask`, `block`, `allow` or `none` (nothing found / nothing left the machine).
    pub policy: String,
    /// Category name → occurrences.
    pub categories: BTreeMap<String, usize>,
}

impl AuditRecord {
    pub fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// A stored record with its chain fields, as `export` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct StoredRecord {
    pub seq: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

/// One problem `verify` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Tamper {
    /// Records with these sequence numbers are gone.
    Missing { from: i64, to: i64 },
    /// This record's contents do not match its hash.
    Edited { seq: i64 },
    /// This record does not link to the one stored before it (inserted, reordered, or its
    /// predecessor was replaced).
    BrokenLink { seq: i64 },
    /// The chain is shorter than an anchor recorded earlier says.
    Truncated { expected: i64, found: i64 },
}

impl std::fmt::Display for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tamper::Missing { from, to } if from == to => write!(f, "record {from} was deleted"),
            Tamper::Missing { from, to } => write!(f, "records {from}..={to} were deleted"),
            Tamper::Edited { seq } => {
                write!(f, "record {seq} was edited (its contents do not match its hash)")
            }
            Tamper::BrokenLink { seq } => write!(
                f,
                "record {seq} does not follow the record before it (a record was inserted, reordered or replaced)"
            ),
            Tamper::Truncated { expected, found } => write!(
                f,
                "the trail ends at record {found} but the anchor says {expected}: records at the end were deleted"
            ),
        }
    }
}

/// `verify`'s answer: what is wrong, and the head to anchor elsewhere.
#[derive(Debug, Clone)]
pub struct Verification {
    pub records: usize,
    pub head_seq: i64,
    pub head_hash: String,
    pub problems: Vec<Tamper>,
}

pub struct AuditLog {
    conn: Connection,
    path: String,
    key: Option<Vec<u8>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    route TEXT NOT NULL,
    policy TEXT NOT NULL,
    categories TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
";

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl AuditLog {
    /// Opens (creating if needed) the trail at `path`. `key` turns the chain into an HMAC chain.
    pub fn open(path: &Path, key: Option<&[u8]>) -> Result<Self, AuditError> {
        let p = path.display().to_string();
        let db = |source| AuditError::Db {
            path: p.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        Ok(Self {
            conn,
            path: p,
            key: key.map(<[u8]>::to_vec),
        })
    }

    /// The last sequence number written (0 for an empty trail).
    fn head_seq(&self) -> i64 {
        self.conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))
            .unwrap_or(0)
    }

    fn err(&self, source: rusqlite::Error) -> AuditError {
        AuditError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn digest(&self, seq: i64, rec: &AuditRecord, prev: &str) -> String {
        // A fixed, unambiguous serialisation: JSON of the fields in a fixed order.
        let body = serde_json::json!([
            seq,
            rec.ts_ms,
            rec.request_id,
            rec.key_id,
            rec.tier,
            rec.route,
            rec.policy,
            rec.categories,
            prev
        ])
        .to_string();
        match &self.key {
            Some(k) => hex(&hmac_sha256(k, body.as_bytes())),
            None => hex(&Sha256::digest(body.as_bytes())),
        }
    }

    /// Appends records in one transaction; returns the new head sequence number.
    pub fn append(&mut self, recs: &[AuditRecord]) -> Result<i64, AuditError> {
        // The head is read inside a write-locked transaction: another process (the server and
        // `porteiro flywheel promote`) may have appended since this one opened the trail.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| self.err(e))?;
        let (mut seq, mut prev) = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .unwrap_or((0, GENESIS.to_string()));
        for rec in recs {
            seq += 1;
            let hash = self.digest(seq, rec, &prev);
            let cats = serde_json::to_string(&rec.categories).unwrap_or_default();
            tx.execute(
                "INSERT INTO audit VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    seq,
                    rec.ts_ms,
                    rec.request_id,
                    rec.key_id,
                    rec.tier,
                    rec.route,
                    rec.policy,
                    cats,
                    prev,
                    hash
                ],
            )
            .map_err(|e| self.err(e))?;
            prev = hash;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(seq)
    }

    /// Every stored row in storage order (by sequence number).
    pub fn records(&self) -> Result<Vec<StoredRecord>, AuditError> {
        let mut stmt = self
            .conn
            .prepare(concat!(
                "SELECT seq, ts_ms, request_id, key_id, tier, route, policy, categories, prev_hash, ",
                "hash FROM audit ORDER BY seq"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let cats: String = r.get(7)?;
                Ok(StoredRecord {
                    seq: r.get(0)?,
                    record: AuditRecord {
                        ts_ms: r.get(1)?,
                        request_id: r.get(2)?,
                        key_id: r.get(3)?,
                        tier: r.get(4)?,
                        route: r.get(5)?,
                        policy: r.get(6)?,
                        // An unparsable category list shows up as an edit (its hash will not match).
                        categories: serde_json::from_str(&cats).unwrap_or_default(),
                    },
                    prev_hash: r.get(8)?,
                    hash: r.get(9)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Walks the chain. `anchor` is a head sequence number recorded earlier (e.g. from the last
    /// verify): a trail that ends before it lost records at its end.
    pub fn verify(&self, anchor: Option<i64>) -> Result<Verification, AuditError> {
        let rows = self.records()?;
        let mut problems = Vec::new();
        let mut expected = 1i64;
        let mut prev = GENESIS.to_string();
        for r in &rows {
            let gap = r.seq > expected;
            if gap {
                problems.push(Tamper::Missing {
                    from: expected,
                    to: r.seq - 1,
                });
            }
            if self.digest(r.seq, &r.record, &r.prev_hash) != r.hash {
                problems.push(Tamper::Edited { seq: r.seq });
            } else if r.prev_hash != prev && !gap {
                problems.push(Tamper::BrokenLink { seq: r.seq });
            }
            prev = r.hash.clone();
            expected = r.seq + 1;
        }
        let head_seq = rows.last().map_or(0, |r| r.seq);
        if let Some(a) = anchor {
            if head_seq < a {
                problems.push(Tamper::Truncated {
                    expected: a,
                    found: head_seq,
                });
            }
        }
        Ok(Verification {
            records: rows.len(),
            head_seq,
            head_hash: prev,
            problems,
        })
    }

    /// Writes every record as one JSON line; returns how many.
    pub fn export_jsonl(&self, out: &mut dyn Write) -> Result<usize, AuditError> {
        let rows = self.records()?;
        for r in &rows {
            serde_json::to_writer(&mut *out, r).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
        }
        Ok(rows.len())
    }

    /// CSV with categories as `name=count;…`.
    pub fn export_csv(&self, out: &mut dyn Write) -> Result<usize, AuditError> {
        let rows = self.records()?;
        writeln!(
            out,
            "seq,ts_ms,request_id,key_id,tier,route,policy,categories,prev_hash,hash"
        )?;
        let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        for r in &rows {
            let cats: Vec<String> = r
                .record
                .categories
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{}",
                r.seq,
                r.record.ts_ms,
                q(&r.record.request_id),
                q(&r.record.key_id),
                q(&r.record.tier),
                q(&r.record.route),
                q(&r.record.policy),
                q(&cats.join(";")),
                r.prev_hash,
                r.hash
            )?;
        }
        Ok(rows.len())
    }
}

enum Msg {
    Record(AuditRecord),
    Flush(mpsc::Sender<Result<i64, String>>),
}

/// Appends off the request path: one thread owns the database and writes what has queued up in
/// one transaction. Records are never dropped; the queue is unbounded because a record is ~200 bytes.
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
}

impl AuditWriter {
    // Why the allow: the writer thread has no caller to return a failed append to; the error also
    // reaches the next flush(), and the operator sees it on stderr.
    #[allow(clippy::print_stderr)]
    pub fn spawn(mut log: AuditLog) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("porteiro-audit".into())
            .spawn(move || {
                let mut last: Result<i64, String> = Ok(log.head_seq());
                while let Ok(first) = rx.recv() {
                    let mut batch = Vec::new();
                    let mut flushes = Vec::new();
                    for m in std::iter::once(first).chain(rx.try_iter()) {
                        match m {
                            Msg::Record(r) => batch.push(r),
                            Msg::Flush(reply) => flushes.push(reply),
                        }
                    }
                    if !batch.is_empty() {
                        last = log.append(&batch).map_err(|e| e.to_string());
                        if let Err(e) = &last {
                            eprintln!("audit trail: {e}");
                        }
                    }
                    for f in flushes {
                        let _ = f.send(last.clone());
                    }
                }
            })?;
        Ok(Self { tx })
    }

    // Why the allow: recording is fire-and-forget on the request path; a record lost because the
    // writer thread stopped can only be reported, on stderr.
    #[allow(clippy::print_stderr)]
    pub fn record(&self, rec: AuditRecord) {
        if self.tx.send(Msg::Record(rec)).is_err() {
            eprintln!("audit trail: the writer thread has stopped; a record was lost");
        }
    }

    /// Waits until everything queued before this call is committed; returns the head sequence.
    pub fn flush(&self) -> Result<i64, AuditError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::Flush(tx))
            .map_err(|_| AuditError::Stopped)?;
        rx.recv()
            .map_err(|_| AuditError::Stopped)?
            .map_err(|e| AuditError::Io(std::io::Error::other(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> AuditRecord {
        AuditRecord {
            ts_ms: 1_700_000_000_000 + i as i64,
            request_id: format!("req-{i}"),
            key_id: "k1".into(),
            tier: "big".into(),
            route: "auto".into(),
            policy: "mask".into(),
            categories: [("email".to_string(), i)].into_iter().collect(),
        }
    }

    fn trail(key: Option<&[u8]>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut log = AuditLog::open(&path, key).unwrap();
        log.append(&(1..=6).map(rec).collect::<Vec<_>>()).unwrap();
        drop(log);
        (dir, path)
    }

    /// What a tamperer does: drop the triggers, then change rows directly.
    fn tamper(path: &Path, sql: &str) {
        let c = Connection::open(path).unwrap();
        c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
            .unwrap();
        c.execute_batch(sql).unwrap();
    }

    fn problems(path: &Path, key: Option<&[u8]>, anchor: Option<i64>) -> Vec<Tamper> {
        AuditLog::open(path, key)
            .unwrap()
            .verify(anchor)
            .unwrap()
            .problems
    }

    #[test]
    fn an_untouched_trail_verifies_and_reopening_continues_the_chain() {
        let (_d, path) = trail(None);
        let mut log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.append(&[rec(7)]).unwrap(), 7);
        let v = log.verify(Some(7)).unwrap();
        assert_eq!((v.records, v.head_seq), (7, 7));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // The triggers refuse in-place changes.
        assert!(log
            .conn
            .execute("DELETE FROM audit WHERE seq = 2", [])
            .is_err());
        assert!(log
            .conn
            .execute("UPDATE audit SET tier = 'x' WHERE seq = 2", [])
            .is_err());
    }

    #[test]
    fn two_writers_on_one_trail_keep_one_chain() {
        // The server and `porteiro flywheel promote` both append to the same file.
        let (_d, path) = trail(None);
        let mut a = AuditLog::open(&path, None).unwrap();
        let mut b = AuditLog::open(&path, None).unwrap();
        assert_eq!(a.append(&[rec(7)]).unwrap(), 7);
        assert_eq!(b.append(&[rec(8)]).unwrap(), 8);
        assert_eq!(a.append(&[rec(9)]).unwrap(), 9);
        let v = b.verify(None).unwrap();
        assert!(v.problems.is_empty() && v.records == 9, "{v:?}");
    }

    #[test]
    fn edits_deletions_insertions_and_reorders_are_each_caught() {
        let (_d, p) = trail(None);
        tamper(&p, "UPDATE audit SET tier = 'local' WHERE seq = 3");
        assert_eq!(problems(&p, None, None), vec![Tamper::Edited { seq: 3 }]);

        let (_d, p) = trail(None);
        tamper(&p, "UPDATE audit SET categories = '{}' WHERE seq = 5");
        assert_eq!(problems(&p, None, None), vec![Tamper::Edited { seq: 5 }]);

        let (_d, p) = trail(None);
        tamper(&p, "DELETE FROM audit WHERE seq = 4");
        assert_eq!(
            problems(&p, None, None),
            vec![Tamper::Missing { from: 4, to: 4 }]
        );

        // Deleting records 2 and 3 and renumbering the rest to hide the gap.
        let (_d, p) = trail(None);
        tamper(
            &p,
            "DELETE FROM audit WHERE seq IN (2, 3); UPDATE audit SET seq = seq - 2 WHERE seq > 3",
        );
        let found = problems(&p, None, None);
        assert!(found.contains(&Tamper::Edited { seq: 2 }), "{found:?}");

        // Inserting a forged record between 2 and 3 (shifting the rest up).
        let (_d, p) = trail(None);
        tamper(
            &p,
            "UPDATE audit SET seq = seq + 100 WHERE seq >= 3; UPDATE audit SET seq = seq - 99 WHERE seq >= 103; \
             INSERT INTO audit SELECT 3, ts_ms, 'forged', key_id, tier, route, 'allow', categories, \
             hash, hash FROM audit WHERE seq = 2",
        );
        let found = problems(&p, None, None);
        assert!(found.contains(&Tamper::Edited { seq: 3 }), "{found:?}");

        // Swapping the contents of records 2 and 5.
        let (_d, p) = trail(None);
        tamper(
            &p,
            "UPDATE audit SET seq = -2 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 5; \
             UPDATE audit SET seq = 5 WHERE seq = -2",
        );
        let found = problems(&p, None, None);
        assert!(found.contains(&Tamper::Edited { seq: 2 }), "{found:?}");
        assert!(found.contains(&Tamper::Edited { seq: 5 }), "{found:?}");

        // Cutting the end is only visible against an anchor.
        let (_d, p) = trail(None);
        tamper(&p, "DELETE FROM audit WHERE seq >= 5");
        assert_eq!(
            problems(&p, None, Some(6)),
            vec![Tamper::Truncated {
                expected: 6,
                found: 4
            }]
        );
    }

    /// Edits the last record and recomputes its link as an unkeyed chain would.
    fn forge_last(p: &Path) {
        let log = AuditLog::open(p, None).unwrap();
        let mut r = log.records().unwrap()[5].clone();
        r.record.policy = "allow".into();
        let forged = log.digest(6, &r.record, &r.prev_hash);
        drop(log);
        tamper(
            p,
            &format!("UPDATE audit SET policy = 'allow', hash = '{forged}' WHERE seq = 6"),
        );
    }

    #[test]
    fn with_a_key_a_recomputed_chain_is_still_caught() {
        // Without a key, whoever can write the file can recompute the chain: only the head
        // hash anchored elsewhere shows it.
        let (_d, p) = trail(None);
        let before = AuditLog::open(&p, None).unwrap().verify(None).unwrap();
        forge_last(&p);
        let after = AuditLog::open(&p, None).unwrap().verify(None).unwrap();
        assert!(after.problems.is_empty());
        assert_ne!(before.head_hash, after.head_hash);

        let key = b"audit-key-0123456789";
        let (_d, p) = trail(Some(key));
        assert!(problems(&p, Some(key), None).is_empty());
        forge_last(&p);
        assert_eq!(
            problems(&p, Some(key), None),
            vec![Tamper::Edited { seq: 6 }]
        );
    }

    #[test]
    fn the_writer_commits_in_order_and_flush_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let w = AuditWriter::spawn(AuditLog::open(&path, None).unwrap()).unwrap();
        for i in 0..50 {
            w.record(rec(i));
        }
        assert_eq!(w.flush().unwrap(), 50);
        let log = AuditLog::open(&path, None).unwrap();
        let v = log.verify(Some(50)).unwrap();
        assert!(v.problems.is_empty());
        let mut out = Vec::new();
        assert_eq!(log.export_jsonl(&mut out).unwrap(), 50);
        let first: serde_json::Value =
            serde_json::from_slice(out.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(first["request_id"], "req-0");
        assert_eq!(first["prev_hash"], GENESIS);
    }
}
