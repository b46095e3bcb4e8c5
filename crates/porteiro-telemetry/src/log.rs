//! The request log: one SQLite row per request (WAL, versioned schema), written by one thread in
//! batches from a bounded queue. A full queue never fails a request: the record is dropped and
//! counted. Prompts and responses, when stored at all, are sealed with AES-256-GCM; rows older
//! than the retention TTL are purged by the writer.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rusqlite::{params, Connection};
use sha2::{Digest, Sha256};

use crate::RequestRecord;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("request log {path}: {source}")]
    Db {
        path: String,
        source: rusqlite::Error,
    },
    #[error("request log {path}: schema version {found} is newer than this build knows ({known})")]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("request log: cannot decrypt a stored text (wrong key?)")]
    Decrypt,
    #[error("request log: cannot seal a text: {0}")]
    Seal(String),
    #[error("request log (PostgreSQL): {0}")]
    Postgres(String),
}

/// Where the writer thread puts records: the local SQLite file, or PostgreSQL shared by replicas.
pub trait Sink: Send + 'static {
    fn insert(&mut self, recs: &[RequestRecord], sealer: Option<&Sealer>) -> Result<(), LogError>;
    /// Deletes rows older than `ttl`; returns how many.
    fn purge(&mut self, ttl: Duration, now_ms: i64) -> Result<usize, LogError>;
}

impl Sink for RequestLog {
    fn insert(&mut self, recs: &[RequestRecord], sealer: Option<&Sealer>) -> Result<(), LogError> {
        RequestLog::insert(self, recs, sealer)
    }
    fn purge(&mut self, ttl: Duration, now_ms: i64) -> Result<usize, LogError> {
        RequestLog::purge(self, ttl, now_ms)
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` says how many ran.
const MIGRATIONS: [&str; 3] = [
    "CREATE TABLE requests (
        id TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        tier TEXT NOT NULL,
        model TEXT NOT NULL,
        route TEXT NOT NULL,
        status INTEGER NOT NULL,
        error TEXT,
        stream INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        ttft_ms REAL,
        cost_usd REAL NOT NULL,
        baseline_usd REAL NOT NULL
    );
    CREATE INDEX requests_ts ON requests (ts_ms);",
    // v2: routing and privacy context, sealed texts.
    "ALTER TABLE requests ADD COLUMN privacy TEXT NOT NULL DEFAULT 'none';
     ALTER TABLE requests ADD COLUMN fallback TEXT;
     ALTER TABLE requests ADD COLUMN prompt BLOB;
     ALTER TABLE requests ADD COLUMN response BLOB;",
    // v3: the flywheel's sample of an upstream answer (sealed JSON, see `Sample`).
    "ALTER TABLE requests ADD COLUMN sample BLOB;",
];

/// AES-256-GCM over stored texts; the key is SHA-256 of the configured secret. Each text gets a
/// fresh random 96-bit nonce, stored in front of the ciphertext.
#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl Sealer {
    pub fn new(secret: &[u8]) -> Self {
        let key = Sha256::digest(secret);
        Self {
            // A SHA-256 digest is exactly the 32-byte key type: `new` needs no length check.
            cipher: Aes256Gcm::new(&key),
        }
    }

    /// Fails only when the OS random source does (no nonce), or for a text over AES-GCM's 64 GiB.
    pub fn seal(&self, text: &str) -> Result<Vec<u8>, LogError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| LogError::Seal(e.to_string()))?;
        let mut out = nonce.to_vec();
        out.extend(
            self.cipher
                .encrypt(Nonce::from_slice(&nonce), text.as_bytes())
                .map_err(|e| LogError::Seal(e.to_string()))?,
        );
        Ok(out)
    }

    pub fn open(&self, blob: &[u8]) -> Result<String, LogError> {
        if blob.len() < 12 {
            return Err(LogError::Decrypt);
        }
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(&blob[..12]), &blob[12..])
            .map_err(|_| LogError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| LogError::Decrypt)
    }
}

pub struct RequestLog {
    conn: Connection,
    path: String,
}

impl RequestLog {
    /// Opens (creating and migrating as needed) the log at `path`.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let p = path.display().to_string();
        let db = |source| LogError::Db {
            path: p.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(LogError::TooNew {
                path: p,
                found: version,
                known,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction().map_err(db)?;
            tx.execute_batch(m).map_err(db)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(db)?;
            tx.commit().map_err(db)?;
        }
        Ok(Self { conn, path: p })
    }

    fn err(&self, source: rusqlite::Error) -> LogError {
        LogError::Db {
            path: self.path.clone(),
            source,
        }
    }

    pub fn schema_version(&self) -> Result<i64, LogError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Inserts records in one transaction, sealing texts with `sealer` (texts are dropped without one).
    pub fn insert(
        &mut self,
        recs: &[RequestRecord],
        sealer: Option<&Sealer>,
    ) -> Result<(), LogError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO requests (id, ts_ms, key_id, endpoint, tier, model, route, status, error, stream,
                     prompt_tokens, completion_tokens, latency_ms, ttft_ms, cost_usd, baseline_usd, privacy,
                     fallback, prompt, response, sample)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)",
                )
                .map_err(|e| self.err(e))?;
            for r in recs {
                let seal = |t: &Option<String>| {
                    t.as_deref()
                        .and_then(|t| sealer.map(|s| s.seal(t)))
                        .transpose()
                };
                stmt.execute(params![
                    r.id,
                    r.ts_ms,
                    r.key_id,
                    r.endpoint,
                    r.tier,
                    r.model,
                    r.route,
                    r.status,
                    r.error,
                    r.stream,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.latency_ms,
                    r.ttft_ms,
                    r.cost_usd,
                    r.baseline_usd,
                    r.privacy,
                    r.fallback,
                    seal(&r.prompt)?,
                    seal(&r.response)?,
                    seal(&r.sample)?,
                ])
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Deletes rows older than `ttl`; returns how many.
    pub fn purge(&self, ttl: Duration, now_ms: i64) -> Result<usize, LogError> {
        let cutoff = now_ms - ttl.as_millis() as i64;
        self.conn
            .execute("DELETE FROM requests WHERE ts_ms < ?1", [cutoff])
            .map_err(|e| self.err(e))
    }

    /// Records since `since_ms`, oldest first; texts opened with `sealer` when given.
    pub fn since(
        &self,
        since_ms: i64,
        sealer: Option<&Sealer>,
    ) -> Result<Vec<RequestRecord>, LogError> {
        self.select(since_ms, sealer, false)
    }

    /// The records since `since_ms` that carry a flywheel sample, oldest first, opened with `sealer`.
    pub fn samples(&self, since_ms: i64, sealer: &Sealer) -> Result<Vec<RequestRecord>, LogError> {
        self.select(since_ms, Some(sealer), true)
    }

    fn select(
        &self,
        since_ms: i64,
        sealer: Option<&Sealer>,
        samples_only: bool,
    ) -> Result<Vec<RequestRecord>, LogError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, ts_ms, key_id, endpoint, tier, model, route, status, error, stream, prompt_tokens,
                 completion_tokens, latency_ms, ttft_ms, cost_usd, baseline_usd, privacy, fallback, prompt, response,
                 sample FROM requests WHERE ts_ms >= ?1 AND (?2 = 0 OR sample IS NOT NULL) ORDER BY ts_ms",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![since_ms, samples_only], |r| {
                Ok((
                    RequestRecord {
                        id: r.get(0)?,
                        ts_ms: r.get(1)?,
                        key_id: r.get(2)?,
                        endpoint: r.get(3)?,
                        tier: r.get(4)?,
                        model: r.get(5)?,
                        route: r.get(6)?,
                        status: r.get(7)?,
                        error: r.get(8)?,
                        stream: r.get(9)?,
                        prompt_tokens: r.get(10)?,
                        completion_tokens: r.get(11)?,
                        latency_ms: r.get(12)?,
                        ttft_ms: r.get(13)?,
                        cost_usd: r.get(14)?,
                        baseline_usd: r.get(15)?,
                        privacy: r.get(16)?,
                        fallback: r.get(17)?,
                        ..Default::default()
                    },
                    r.get::<_, Option<Vec<u8>>>(18)?,
                    r.get::<_, Option<Vec<u8>>>(19)?,
                    r.get::<_, Option<Vec<u8>>>(20)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (mut rec, p, q, x) = row.map_err(|e| self.err(e))?;
            if let Some(s) = sealer {
                rec.prompt = p.map(|b| s.open(&b)).transpose()?;
                rec.response = q.map(|b| s.open(&b)).transpose()?;
                rec.sample = x.map(|b| s.open(&b)).transpose()?;
            }
            out.push(rec);
        }
        Ok(out)
    }
}

/// Counters the server exports.
#[derive(Default, Debug)]
pub struct LogStats {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
    pub purged: AtomicU64,
}

enum Msg {
    Record(Box<RequestRecord>),
    Flush(mpsc::Sender<()>),
}

/// The writer: a bounded queue in front of one thread that owns the database.
pub struct LogWriter {
    tx: SyncSender<Msg>,
    pub stats: Arc<LogStats>,
}

impl LogWriter {
    /// `capacity` records may wait; `ttl` (if any) is enforced at start and every `purge_every`.
    pub fn spawn(
        mut log: impl Sink,
        capacity: usize,
        sealer: Option<Sealer>,
        ttl: Option<Duration>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Msg>(capacity.max(1));
        let stats = Arc::new(LogStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("porteiro-request-log".into())
            .spawn(move || writer(&mut log, rx, &st, sealer.as_ref(), ttl))?;
        Ok(Self { tx, stats })
    }

    /// Queues a record; never blocks. A full queue drops it (counted).
    pub fn record(&self, rec: RequestRecord) {
        match self.tx.try_send(Msg::Record(Box::new(rec))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits until everything queued before the call is written.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }
    }
}

const PURGE_EVERY: Duration = Duration::from_secs(600);

// The writer thread has no caller to hand an error to: failures are counted in LogStats and
// reported on stderr, the gateway's log.
#[allow(clippy::print_stderr)]
fn writer(
    log: &mut impl Sink,
    rx: Receiver<Msg>,
    st: &LogStats,
    sealer: Option<&Sealer>,
    ttl: Option<Duration>,
) {
    let mut last_purge: Option<Instant> = None;
    let mut batch: Vec<RequestRecord> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut flushes = Vec::new();
        for m in std::iter::once(first).chain(rx.try_iter().take(4096)) {
            match m {
                Msg::Record(r) => batch.push(*r),
                Msg::Flush(f) => flushes.push(f),
            }
        }
        if !batch.is_empty() {
            match log.insert(&batch, sealer) {
                Ok(()) => st.written.fetch_add(batch.len() as u64, Ordering::Relaxed),
                Err(e) => {
                    eprintln!("porteiro: request log: {e}");
                    st.failed.fetch_add(batch.len() as u64, Ordering::Relaxed)
                }
            };
            batch.clear();
        }
        if let Some(ttl) = ttl {
            if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
                last_purge = Some(Instant::now());
                match log.purge(ttl, crate::now_ms()) {
                    Ok(n) => st.purged.fetch_add(n as u64, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("porteiro: request log purge: {e}");
                        0
                    }
                };
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    fn rec(i: i64, tier: &str) -> RequestRecord {
        RequestRecord {
            id: format!("req-{i}"),
            ts_ms: 1_000_000 + i * 1000,
            tier: tier.into(),
            model: "m".into(),
            route: "auto".into(),
            status: 200,
            prompt_tokens: 10,
            completion_tokens: 5,
            latency_ms: 12.5,
            ttft_ms: Some(3.0),
            prompt: Some(format!("secret prompt {i}")),
            response: Some("the answer".into()),
            ..Default::default()
        }
    }

    #[test]
    fn migrates_an_old_schema_and_refuses_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute("INSERT INTO requests VALUES ('old', 1, 'k', 'chat', 'local', 'm', 'r', 200, NULL, 0, 1, 1, 1.0, NULL, 0.0, 0.0)", []).unwrap();
        }
        let log = RequestLog::open(&p).unwrap();
        assert_eq!(log.schema_version().unwrap(), 3);
        let rows = log.since(0, None).unwrap();
        assert_eq!(
            (rows[0].id.as_str(), rows[0].privacy.as_str()),
            ("old", "none")
        );
        drop(log);
        Connection::open(&p)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            RequestLog::open(&p),
            Err(LogError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn texts_are_sealed_at_rest_and_purged_after_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.db");
        let sealer = Sealer::new(b"log-key");
        let mut log = RequestLog::open(&p).unwrap();
        log.insert(&[rec(1, "local"), rec(2, "big")], Some(&sealer))
            .unwrap();
        let raw = std::fs::read(&p).unwrap();
        let wal = std::fs::read(dir.path().join("log.db-wal")).unwrap_or_default();
        let hay = [raw, wal].concat();
        assert!(!hay.windows(13).any(|w| w == b"secret prompt"));
        let back = log.since(0, Some(&sealer)).unwrap();
        assert_eq!(back[1].prompt.as_deref(), Some("secret prompt 2"));
        assert!(matches!(
            log.since(0, Some(&Sealer::new(b"wrong"))),
            Err(LogError::Decrypt)
        ));
        // A flywheel sample is sealed too, and `samples` returns only the rows that carry one.
        let mut with = rec(4, "big");
        with.sample = Some("{\"request\":{\"secret sample\":1}}".into());
        log.insert(&[with], Some(&sealer)).unwrap();
        let hay = [
            std::fs::read(&p).unwrap(),
            std::fs::read(dir.path().join("log.db-wal")).unwrap_or_default(),
        ]
        .concat();
        assert!(!hay.windows(13).any(|w| w == b"secret sample"));
        let got = log.samples(0, &sealer).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].sample.as_deref(),
            Some("{\"request\":{\"secret sample\":1}}")
        );
        log.conn
            .execute("DELETE FROM requests WHERE id = ?1", [&got[0].id])
            .unwrap();
        // Without a key the texts are not stored at all.
        log.insert(&[rec(3, "local")], None).unwrap();
        assert_eq!(log.since(0, Some(&sealer)).unwrap()[2].prompt, None);
        // ts 1_001_000, 1_002_000, 1_003_000: a 2 s TTL at 1_003_600 keeps the last two.
        assert_eq!(
            log.purge(Duration::from_millis(2000), 1_003_600).unwrap(),
            1
        );
        assert_eq!(log.since(0, None).unwrap().len(), 2);
    }

    /// A sink that stalls inside `insert` until released, so the queue's state is exact.
    struct GateSink {
        entered: mpsc::Sender<()>,
        release: Receiver<()>,
        rows: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Sink for GateSink {
        fn insert(&mut self, recs: &[RequestRecord], _: Option<&Sealer>) -> Result<(), LogError> {
            self.entered.send(()).unwrap();
            self.release.recv().unwrap();
            let mut rows = self.rows.lock().unwrap();
            rows.extend(recs.iter().map(|r| r.id.clone()));
            Ok(())
        }
        fn purge(&mut self, _: Duration, _: i64) -> Result<usize, LogError> {
            Ok(0)
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let rows = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = GateSink {
            entered: entered_tx,
            release: release_rx,
            rows: rows.clone(),
        };
        let w = LogWriter::spawn(sink, 4, None, None).unwrap();
        // The writer takes the first record and stalls in insert: the queue is then empty.
        w.record(rec(0, "local"));
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        let t = Instant::now();
        for i in 1..=100 {
            w.record(rec(i, "local"));
        }
        assert!(t.elapsed() < Duration::from_secs(1), "record() blocked");
        // Exactly the queue's capacity fits; everything else is dropped and counted.
        assert_eq!(w.stats.dropped.load(Ordering::Relaxed), 96);
        for _ in 0..2 {
            release.send(()).unwrap();
        }
        w.flush();
        assert_eq!(w.stats.written.load(Ordering::Relaxed), 5);
        let ids = rows.lock().unwrap().clone();
        assert_eq!(ids, ["req-0", "req-1", "req-2", "req-3", "req-4"]);
    }
}
