//! S6's routes file: the clusters a local candidate took over from the teacher, in shadow or
//! promoted, which the server reads and reloads without a restart. Every change writes a new
//! version (the previous one kept beside it as `routes.vN.json`), under a lock file so that the
//! server (rollbacks, shadow → promoted) and `porteiro flywheel promote` never lose each other's
//! change. Live agreement decides the transitions ([`live_verdict`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::promote::Score;
use crate::{AnswerKind, FlywheelError};

/// Where a learned route stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The candidate answers a sample of the cluster's escalated requests off the request path;
    /// scored against the teacher's answer, never served.
    Shadow,
    /// The candidate serves the cluster's requests; a sample is still checked against the teacher.
    Promoted,
    /// Live agreement fell below the threshold: the teacher serves the cluster again.
    RolledBack,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Shadow => "shadow",
            Stage::Promoted => "promoted",
            Stage::RolledBack => "rolled_back",
        }
    }
}

/// One cluster's route to a local candidate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LearnedRoute {
    /// `cluster-N`: the route's name in headers, metrics and the request log.
    pub name: String,
    pub cluster: usize,
    /// The cluster's name (its characteristic terms).
    pub title: String,
    pub stage: Stage,
    /// The structure key requests must have (system-prompt template, tools, schema);
    /// [`crate::cluster::MIXED`] matches any.
    pub structure: String,
    /// The cluster's main answer kind (each comparison goes by the teacher's answer's own kind).
    pub kind: AnswerKind,
    /// Routing texts of the cluster's training samples (system prompt and last user message).
    pub examples: Vec<String>,
    /// The candidate model (catalog alias); the server uses a route only when it serves this model.
    pub model: String,
    /// The upstream tier that answered the cluster's samples (asked again to monitor the route).
    #[serde(default)]
    pub teacher: String,
    /// The cluster's LoRA adapter, when the candidate is `lora`.
    pub adapter: Option<PathBuf>,
    /// `zero-shot` or `lora`.
    pub mode: String,
    /// The held-out score that qualified it.
    pub evidence: Score,
    /// When the stage last changed (ms since the epoch) and why.
    pub changed_ms: i64,
    pub why: String,
}

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Routes {
    /// 0 before anything was written; +1 per change.
    pub version: u64,
    pub updated_ms: i64,
    pub routes: Vec<LearnedRoute>,
}

/// A stage change, for the audit trail and the operator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub route: String,
    pub from: Option<Stage>,
    pub to: Stage,
    pub why: String,
}

fn io(path: &Path, e: impl std::fmt::Display) -> FlywheelError {
    FlywheelError::Data(format!("{}: {e}", path.display()))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Holds `<routes>.lock` while alive (created exclusively; a lock older than a minute is left by a
/// process that died and is taken over).
struct Lock(PathBuf);

impl Lock {
    fn take(routes: &Path) -> Result<Self, FlywheelError> {
        let p = routes.with_extension("lock");
        let t0 = std::time::Instant::now();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
            {
                Ok(_) => return Ok(Self(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(&p)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| m.elapsed().ok())
                        .is_some_and(|age| age > Duration::from_secs(60));
                    if stale {
                        let _ = std::fs::remove_file(&p);
                    } else if t0.elapsed() > Duration::from_secs(10) {
                        return Err(io(&p, "held by another process for 10 s"));
                    } else {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Err(e) => return Err(io(&p, e)),
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Routes {
    /// Reads the file; a missing file is version 0 with no routes.
    pub fn load(path: &Path) -> Result<Self, FlywheelError> {
        match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| io(path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io(path, e)),
        }
    }

    /// The routes the server acts on (shadow and promoted).
    pub fn active(&self) -> impl Iterator<Item = &LearnedRoute> {
        self.routes.iter().filter(|r| r.stage != Stage::RolledBack)
    }

    pub fn get(&self, name: &str) -> Option<&LearnedRoute> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// Sets a route's stage (adding the route when `add` is given and it is not there); the change,
    /// or None when nothing changed.
    pub fn set(
        &mut self,
        name: &str,
        to: Stage,
        why: &str,
        add: Option<LearnedRoute>,
    ) -> Option<Change> {
        let now = now_ms();
        let change = |from| Change {
            route: name.into(),
            from,
            to,
            why: why.into(),
        };
        match (self.routes.iter().position(|r| r.name == name), add) {
            (Some(i), Some(new)) => {
                // A fresh qualification replaces the old route (new evidence, maybe a new adapter).
                let from = self.routes[i].stage;
                if from == to && self.routes[i].evidence == new.evidence {
                    return None;
                }
                self.routes[i] = LearnedRoute {
                    stage: to,
                    changed_ms: now,
                    why: why.to_string(),
                    ..new
                };
                Some(change(Some(from)))
            }
            (Some(i), None) => {
                let r = &mut self.routes[i];
                let from = r.stage;
                if from == to {
                    return None;
                }
                r.stage = to;
                r.changed_ms = now;
                r.why = why.to_string();
                Some(change(Some(from)))
            }
            (None, Some(new)) => {
                self.routes.push(LearnedRoute {
                    stage: to,
                    changed_ms: now,
                    why: why.to_string(),
                    ..new
                });
                Some(change(None))
            }
            (None, None) => None,
        }
    }

    /// Reads the file under its lock, applies `f`, and when `f` changed something writes the next
    /// version atomically (the previous version kept as `<stem>.v<N>.json`). Returns the routes as
    /// written (or as read, when nothing changed) and the changes.
    pub fn update(
        path: &Path,
        f: impl FnOnce(&mut Routes) -> Vec<Change>,
    ) -> Result<(Routes, Vec<Change>), FlywheelError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let _lock = Lock::take(path)?;
        let mut r = Self::load(path)?;
        let changes = f(&mut r);
        if changes.is_empty() {
            return Ok((r, changes));
        }
        if r.version > 0 && path.exists() {
            let stem = path
                .file_stem()
                .map_or("routes".into(), |s| s.to_string_lossy());
            let old = path.with_file_name(format!("{stem}.v{}.json", r.version));
            std::fs::copy(path, &old).map_err(|e| io(&old, e))?;
        }
        r.version += 1;
        r.updated_ms = now_ms();
        let text = serde_json::to_string_pretty(&r).map_err(|e| io(path, e))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
        Ok((r, changes))
    }
}

/// Live agreement of one route since its stage last changed: the last `window` comparisons.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Live {
    pub n: usize,
    pub agree: usize,
}

impl Live {
    pub fn rate(&self) -> f64 {
        self.agree as f64 / self.n.max(1) as f64
    }
}

/// What live agreement says about a route: a shadow route with `min_samples` comparisons is
/// promoted when its agreement reaches `threshold` and rolled back when it does not; a promoted
/// route is rolled back when its agreement falls below `threshold`. None: keep the stage.
pub fn live_verdict(
    stage: Stage,
    live: Live,
    threshold: f64,
    min_samples: usize,
) -> Option<(Stage, String)> {
    if live.n < min_samples.max(1) {
        return None;
    }
    let said = |cmp: &str| {
        format!(
            "live agreement {}/{} = {:.1}% {cmp} {:.1}%",
            live.agree,
            live.n,
            live.rate() * 100.0,
            threshold * 100.0
        )
    };
    let ok = live.rate() >= threshold;
    match (stage, ok) {
        (Stage::Shadow, true) => Some((Stage::Promoted, said("≥"))),
        (Stage::Shadow, false) | (Stage::Promoted, false) => Some((Stage::RolledBack, said("<"))),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;

    fn route(name: &str) -> LearnedRoute {
        LearnedRoute {
            name: name.into(),
            cluster: 1,
            title: "weather".into(),
            stage: Stage::Shadow,
            structure: "s".into(),
            kind: AnswerKind::Label,
            examples: vec!["will it rain".into()],
            model: "qwen2.5-0.5b".into(),
            teacher: "big".into(),
            adapter: None,
            mode: "zero-shot".into(),
            evidence: Score {
                cluster: 1,
                name: "weather".into(),
                model: "qwen2.5-0.5b".into(),
                mode: "zero-shot".into(),
                n: 80,
                agree: 80,
                errors: 0,
                rate: 1.0,
                low: 0.954,
                high: 1.0,
            },
            changed_ms: 0,
            why: String::new(),
        }
    }

    #[test]
    fn every_change_is_a_new_version_and_the_old_one_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("routes.json");
        assert_eq!(Routes::load(&p).unwrap().version, 0);
        let (r, ch) = Routes::update(&p, |r| {
            r.set(
                "cluster-1",
                Stage::Shadow,
                "qualified",
                Some(route("cluster-1")),
            )
            .into_iter()
            .collect()
        })
        .unwrap();
        assert_eq!((r.version, ch.len(), ch[0].from), (1, 1, None));
        // No change: no new version.
        let (r, ch) = Routes::update(&p, |r| {
            r.set("cluster-1", Stage::Shadow, "again", None)
                .into_iter()
                .collect()
        })
        .unwrap();
        assert_eq!((r.version, ch.len()), (1, 0));
        let (r, ch) = Routes::update(&p, |r| {
            r.set("cluster-1", Stage::RolledBack, "live 10/20", None)
                .into_iter()
                .collect()
        })
        .unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(ch[0].from, Some(Stage::Shadow));
        assert_eq!(Routes::load(&p).unwrap(), r);
        assert_eq!(r.active().count(), 0);
        let v1 = Routes::load(&d.path().join("routes.v1.json")).unwrap();
        assert_eq!((v1.version, v1.routes[0].stage), (1, Stage::Shadow));
        assert!(!p.with_extension("lock").exists());
    }

    #[test]
    fn concurrent_writers_lose_no_change() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("routes.json");
        std::thread::scope(|s| {
            for t in 0..4 {
                let p = &p;
                s.spawn(move || {
                    for i in 0..5 {
                        let name = format!("cluster-{t}-{i}");
                        Routes::update(p, |r| {
                            r.set(&name, Stage::Shadow, "q", Some(route(&name)))
                                .into_iter()
                                .collect()
                        })
                        .unwrap();
                    }
                });
            }
        });
        let r = Routes::load(&p).unwrap();
        assert_eq!((r.routes.len(), r.version), (20, 20));
    }

    #[test]
    fn live_agreement_promotes_a_shadow_and_rolls_back_below_the_threshold() {
        let live = |agree, n| Live { n, agree };
        assert_eq!(live_verdict(Stage::Shadow, live(19, 19), 0.95, 20), None);
        let (to, why) = live_verdict(Stage::Shadow, live(19, 20), 0.95, 20).unwrap();
        assert_eq!(to, Stage::Promoted, "{why}");
        assert_eq!(
            live_verdict(Stage::Shadow, live(18, 20), 0.95, 20).map(|v| v.0),
            Some(Stage::RolledBack)
        );
        assert_eq!(live_verdict(Stage::Promoted, live(20, 20), 0.95, 20), None);
        let (to, why) = live_verdict(Stage::Promoted, live(17, 20), 0.95, 20).unwrap();
        assert_eq!(to, Stage::RolledBack);
        assert!(why.contains("17/20"), "{why}");
        assert_eq!(live_verdict(Stage::RolledBack, live(0, 50), 0.95, 20), None);
    }
}
