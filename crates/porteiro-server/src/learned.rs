//! The flywheel's learned routes as the server holds them: the routes file last loaded, each
//! route's live agreement, which requests get a comparison (sampling within the CPU budget), and
//! what live agreement decides. No HTTP and no server state here: `flywheel` loads, compares and
//! writes.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use porteiro_config::FlywheelConfig;
use porteiro_flywheel::routes::{live_verdict, LearnedRoute, Live, Routes, Stage};
use porteiro_protocol::ChatCompletionRequest;
use serde_json::Value;

/// Examples embedded per route at most (the nearest-example test costs one dot product each).
pub const MAX_EXAMPLES: usize = 128;

pub struct Flywheel {
    pub cfg: FlywheelConfig,
    pub path: PathBuf,
    inner: Mutex<Inner>,
    /// The CPU budget of comparisons: one at a time.
    pub(crate) busy: Arc<tokio::sync::Semaphore>,
    rng: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// The file's modification time when last loaded.
    mtime: Option<SystemTime>,
    routes: Routes,
    /// Last comparisons of each route since its stage last changed.
    live: HashMap<String, VecDeque<bool>>,
}

/// Which side of a comparison the candidate is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Served by the teacher; the candidate answers off the path.
    Shadow,
    /// Served by the candidate; the teacher answers off the path.
    Monitor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Shadow => "shadow",
            Role::Monitor => "monitor",
        }
    }
}

/// A request picked for a comparison.
pub struct Watch {
    pub route: LearnedRoute,
    pub role: Role,
    pub req: ChatCompletionRequest,
    pub raw: Value,
}

impl Flywheel {
    pub fn new(cfg: FlywheelConfig, path: PathBuf) -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Self {
            cfg,
            path,
            inner: Mutex::new(Inner::default()),
            busy: Arc::new(tokio::sync::Semaphore::new(1)),
            rng: AtomicU64::new(seed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn shadow_log(&self) -> PathBuf {
        self.path.with_file_name("shadow.jsonl")
    }

    /// A uniform draw in [0, 1) (xorshift; sampling needs no more).
    fn draw(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The comparison this request gets, if it is sampled: `matched` is the learned route the
    /// router matched, `local` whether the plan serves it locally.
    pub fn pick(
        &self,
        matched: Option<&str>,
        local: bool,
        req: &ChatCompletionRequest,
        raw: &Value,
    ) -> Option<Watch> {
        let name = matched?;
        let route = self.lock().routes.get(name).cloned()?;
        let role = match (route.stage, local) {
            (Stage::Shadow, false) => Role::Shadow,
            (Stage::Promoted, true) => Role::Monitor,
            _ => return None,
        };
        let rate = match role {
            Role::Shadow => self.cfg.shadow_sample,
            Role::Monitor => self.cfg.monitor_sample,
        };
        if self.draw() >= rate || self.busy.available_permits() == 0 {
            return None;
        }
        Some(Watch {
            route,
            role,
            req: req.clone(),
            raw: raw.clone(),
        })
    }

    /// The modification time of the file last loaded.
    pub fn loaded_mtime(&self) -> Option<SystemTime> {
        self.lock().mtime
    }

    /// Notes the file's time without taking its routes (none of them can be used).
    pub fn mark_loaded(&self, mtime: Option<SystemTime>) {
        self.lock().mtime = mtime;
    }

    /// Takes a loaded routes file and its live comparisons.
    pub fn set_loaded(
        &self,
        routes: Routes,
        live: HashMap<String, VecDeque<bool>>,
        mtime: Option<SystemTime>,
    ) {
        let mut g = self.lock();
        g.routes = routes;
        g.live = live;
        g.mtime = mtime;
    }

    /// Adds a comparison to a route's window; the stage live agreement now calls for, if another.
    pub fn push(&self, name: &str, agree: bool) -> Option<(Stage, String)> {
        let mut g = self.lock();
        let q = g.live.entry(name.to_string()).or_default();
        q.push_back(agree);
        if q.len() > self.cfg.window {
            q.pop_front();
        }
        let live = live_of(g.live.get(name));
        g.routes
            .get(name)
            .and_then(|r| live_verdict(r.stage, live, self.cfg.threshold, self.cfg.min_live))
    }

    /// The version of the routes file in use.
    pub fn version(&self) -> u64 {
        self.lock().routes.version
    }

    /// Live agreement of every route (for `/api/dashboard` and the log line of a change).
    pub fn live(&self) -> Vec<(LearnedRoute, Live)> {
        let g = self.lock();
        g.routes
            .routes
            .iter()
            .map(|r| (r.clone(), live_of(g.live.get(&r.name))))
            .collect()
    }
}

pub fn live_of(q: Option<&VecDeque<bool>>) -> Live {
    q.map_or(Live::default(), |q| Live {
        n: q.len(),
        agree: q.iter().filter(|a| **a).count(),
    })
}

/// The adapter name a route's adapter is loaded under.
pub fn adapter_name(route: &str) -> String {
    format!("flywheel-{route}")
}
