//! The LLM-to-SLM flywheel (arXiv 2506.02153 §6): the upstream tiers' answers, collected by the
//! server into the request log ([`porteiro_telemetry::Sample`]), curated ([`curate`]: S2) and
//! clustered into task types ([`cluster`]: S3), candidates scored against the teacher ([`score`]: S4),
//! the promotion decision ([`promote`]: S6) and the versioned routes file the server reloads
//! ([`routes`]: shadow, promoted, rolled back). The binary wires in the encoder and the privacy
//! guard's detector, and writes each stage's output under `$PORTEIRO_HOME/flywheel/`.

pub mod cluster;
pub mod curate;
pub mod item;
pub mod promote;
pub mod routes;
pub mod score;

pub use cluster::{cluster, Cluster, ClusterOptions};
pub use curate::{curate, CurateOptions, CurateReport};
pub use item::{AnswerKind, Item};

#[derive(Debug, thiserror::Error)]
pub enum FlywheelError {
    #[error("flywheel: {0}")]
    Data(String),
}
