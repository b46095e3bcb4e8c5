//! The PostgreSQL sink of the request log, for several gateway replicas writing one table. Same
//! columns as the SQLite log; migrations tracked in `porteiro_schema` and applied under an advisory
//! lock, so replicas starting together migrate once.

use std::time::Duration;

use postgres::{Client, NoTls};

use crate::log::{LogError, Sealer, Sink};
use crate::RequestRecord;

const MIGRATIONS: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS porteiro_requests (
        id TEXT NOT NULL,
        ts_ms BIGINT NOT NULL,
        key_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        tier TEXT NOT NULL,
        model TEXT NOT NULL,
        route TEXT NOT NULL,
        status INTEGER NOT NULL,
        error TEXT,
        stream BOOLEAN NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        cost_usd DOUBLE PRECISION NOT NULL,
        baseline_usd DOUBLE PRECISION NOT NULL,
        privacy TEXT NOT NULL,
        fallback TEXT,
        prompt BYTEA,
        response BYTEA
    );
    CREATE INDEX IF NOT EXISTS porteiro_requests_ts ON porteiro_requests (ts_ms);",
    // v2: the flywheel's sample of an upstream answer (sealed JSON).
    "ALTER TABLE porteiro_requests ADD COLUMN IF NOT EXISTS sample BYTEA;",
];

/// Arbitrary constant naming Porteiro's migration lock.
const MIGRATION_LOCK: i64 = 0x706f_7274_6569;

fn pg(e: postgres::Error) -> LogError {
    LogError::Postgres(e.to_string())
}

pub struct PgLog {
    client: Client,
}

impl PgLog {
    /// Connects (`host=… port=… user=… dbname=…` or a `postgresql://` URL) and migrates.
    pub fn connect(conninfo: &str) -> Result<Self, LogError> {
        let mut client = Client::connect(conninfo, NoTls).map_err(pg)?;
        let mut tx = client.transaction().map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(pg)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS porteiro_schema (version INTEGER NOT NULL)")
            .map_err(pg)?;
        let version: i32 = tx
            .query_opt("SELECT version FROM porteiro_schema", &[])
            .map_err(pg)?
            .map_or(0, |r| r.get(0));
        if version as usize > MIGRATIONS.len() {
            return Err(LogError::Postgres(format!(
                "schema version {version} is newer than this build knows ({})",
                MIGRATIONS.len()
            )));
        }
        for m in MIGRATIONS.iter().skip(version as usize) {
            tx.batch_execute(m).map_err(pg)?;
        }
        tx.execute("DELETE FROM porteiro_schema", &[]).map_err(pg)?;
        tx.execute(
            "INSERT INTO porteiro_schema VALUES ($1)",
            &[&(MIGRATIONS.len() as i32)],
        )
        .map_err(pg)?;
        tx.commit().map_err(pg)?;
        Ok(Self { client })
    }

    pub fn count(&mut self) -> Result<i64, LogError> {
        Ok(self
            .client
            .query_one("SELECT COUNT(*) FROM porteiro_requests", &[])
            .map_err(pg)?
            .get(0))
    }

    /// The flywheel's samples since `since_ms` (ms since the epoch), opened with `sealer`, oldest
    /// first: the records `porteiro flywheel curate` reads.
    pub fn samples(
        &mut self,
        since_ms: i64,
        sealer: &Sealer,
    ) -> Result<Vec<RequestRecord>, LogError> {
        let rows = self
            .client
            .query(
                "SELECT id, ts_ms, key_id, endpoint, tier, model, route, status, error, stream,
                 prompt_tokens, completion_tokens, latency_ms, ttft_ms, cost_usd, baseline_usd, privacy,
                 fallback, sample FROM porteiro_requests
                 WHERE ts_ms >= $1 AND sample IS NOT NULL ORDER BY ts_ms",
                &[&since_ms],
            )
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let sample: Vec<u8> = r.get(18);
                Ok(RequestRecord {
                    id: r.get(0),
                    ts_ms: r.get(1),
                    key_id: r.get(2),
                    endpoint: r.get(3),
                    tier: r.get(4),
                    model: r.get(5),
                    route: r.get(6),
                    status: r.get::<_, i32>(7) as u16,
                    error: r.get(8),
                    stream: r.get(9),
                    prompt_tokens: r.get::<_, i64>(10) as u64,
                    completion_tokens: r.get::<_, i64>(11) as u64,
                    latency_ms: r.get(12),
                    ttft_ms: r.get(13),
                    cost_usd: r.get(14),
                    baseline_usd: r.get(15),
                    privacy: r.get(16),
                    fallback: r.get(17),
                    sample: Some(sealer.open(&sample)?),
                    ..Default::default()
                })
            })
            .collect()
    }

    /// Sealed prompts as stored, oldest first (tests check they are not plaintext).
    pub fn prompts(&mut self) -> Result<Vec<Option<Vec<u8>>>, LogError> {
        Ok(self
            .client
            .query("SELECT prompt FROM porteiro_requests ORDER BY ts_ms", &[])
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

impl Sink for PgLog {
    fn insert(&mut self, recs: &[RequestRecord], sealer: Option<&Sealer>) -> Result<(), LogError> {
        let mut tx = self.client.transaction().map_err(pg)?;
        let stmt = tx
            .prepare(
                "INSERT INTO porteiro_requests (id, ts_ms, key_id, endpoint, tier, model, route, status, error,
                 stream, prompt_tokens, completion_tokens, latency_ms, ttft_ms, cost_usd, baseline_usd, privacy,
                 fallback, prompt, response, sample)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
            )
            .map_err(pg)?;
        for r in recs {
            let seal = |t: &Option<String>| {
                t.as_deref()
                    .and_then(|t| sealer.map(|s| s.seal(t)))
                    .transpose()
            };
            tx.execute(
                &stmt,
                &[
                    &r.id,
                    &r.ts_ms,
                    &r.key_id,
                    &r.endpoint,
                    &r.tier,
                    &r.model,
                    &r.route,
                    &(r.status as i32),
                    &r.error,
                    &r.stream,
                    &(r.prompt_tokens as i64),
                    &(r.completion_tokens as i64),
                    &r.latency_ms,
                    &r.ttft_ms,
                    &r.cost_usd,
                    &r.baseline_usd,
                    &r.privacy,
                    &r.fallback,
                    &seal(&r.prompt)?,
                    &seal(&r.response)?,
                    &seal(&r.sample)?,
                ],
            )
            .map_err(pg)?;
        }
        tx.commit().map_err(pg)
    }

    fn purge(&mut self, ttl: Duration, now_ms: i64) -> Result<usize, LogError> {
        let cutoff = now_ms - ttl.as_millis() as i64;
        self.client
            .execute("DELETE FROM porteiro_requests WHERE ts_ms < $1", &[&cutoff])
            .map(|n| n as usize)
            .map_err(pg)
    }
}
