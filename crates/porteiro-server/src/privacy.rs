//! The privacy guard between the router and the upstream tiers. A request about to leave is scanned;
//! if it holds personal data the policy of its route (else its tier, else `[privacy].policy`)
//! decides: serve it locally, mask it (and restore the answer), refuse it, or let it go. Secrets
//! leave only under `allow`. Every chat request gets one audit record (categories and counts only).

use std::collections::{BTreeMap, HashMap};

use porteiro_config::Config;
use porteiro_privacy::{AuditRecord, AuditWriter, Category, Detector, Masker, Policy, Unmasker};
use serde_json::Value;

pub struct Guard {
    /// None when the guard is off: nothing is scanned, masked or audited.
    detector: Option<Detector>,
    default: Policy,
    tiers: HashMap<String, Policy>,
    routes: HashMap<String, Policy>,
    audit: Option<AuditWriter>,
}

/// Per-request identity, set by the tracking and auth middleware.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    pub id: String,
    /// Fingerprint of the API key used (never the key).
    pub key_id: String,
}

/// What the guard decided for a request about to go to an upstream tier.
pub enum Verdict {
    /// Nothing found: send as is.
    Clean,
    KeepLocal(Counts),
    Block(Counts),
    /// Send `body` instead; restore the answer with the unmasker.
    Mask(Counts, Value, Unmasker),
    Allow(Counts),
}

pub type Counts = BTreeMap<Category, usize>;

/// What the guard did with a request (the `privacy` field of the request log and audit trail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing found, or the request stayed local anyway.
    None,
    KeepLocal,
    Block,
    Mask,
    Allow,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::KeepLocal => "keep_local",
            Action::Block => "block",
            Action::Mask => "mask",
            Action::Allow => "allow",
        }
    }
}

impl Verdict {
    pub fn action(&self) -> Action {
        match self {
            Verdict::Clean => Action::None,
            Verdict::KeepLocal(_) => Action::KeepLocal,
            Verdict::Block(_) => Action::Block,
            Verdict::Mask(..) => Action::Mask,
            Verdict::Allow(_) => Action::Allow,
        }
    }

    pub fn counts(&self) -> Counts {
        match self {
            Verdict::Clean => Counts::new(),
            Verdict::KeepLocal(c)
            | Verdict::Block(c)
            | Verdict::Mask(c, ..)
            | Verdict::Allow(c) => c.clone(),
        }
    }
}

fn policy_of(s: &str) -> Policy {
    // The config crate validated the spelling.
    Policy::parse(s).unwrap_or_default()
}

/// The client's own text in a chat or completion body: every string under `messages`, `prompt`
/// and `input`, except role and type tags.
fn for_each_text(v: &mut Value, f: &mut dyn FnMut(&mut String)) {
    fn walk(v: &mut Value, key: &str, f: &mut dyn FnMut(&mut String)) {
        match v {
            Value::String(s) if !matches!(key, "role" | "type" | "tool_call_id" | "id") => f(s),
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, key, f)),
            Value::Object(o) => o.iter_mut().for_each(|(k, x)| walk(x, k, f)),
            _ => {}
        }
    }
    if let Some(o) = v.as_object_mut() {
        for k in ["messages", "prompt", "input"] {
            if let Some(x) = o.get_mut(k) {
                walk(x, k, f);
            }
        }
    }
}

/// Restores placeholders in every string of an upstream's JSON answer.
pub fn unmask_json(v: &mut Value, un: &Unmasker) {
    match v {
        Value::String(s) if s.contains('[') => *s = un.unmask(s),
        Value::Array(a) => a.iter_mut().for_each(|x| unmask_json(x, un)),
        Value::Object(o) => o.values_mut().for_each(|x| unmask_json(x, un)),
        _ => {}
    }
}

pub fn counts_list(c: &Counts) -> Vec<(&'static str, usize)> {
    c.iter().map(|(k, n)| (k.name(), *n)).collect()
}

/// "email ×2, cpf ×1"
pub fn describe(c: &Counts) -> String {
    c.iter()
        .map(|(k, n)| format!("{} ×{n}", k.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Guard {
    pub fn new(cfg: &Config, detector: Detector, audit: Option<AuditWriter>) -> Self {
        Self {
            detector: Some(detector),
            default: policy_of(&cfg.privacy.policy),
            tiers: cfg
                .upstreams
                .iter()
                .filter_map(|u| u.privacy.as_deref().map(|p| (u.name.clone(), policy_of(p))))
                .collect(),
            routes: cfg
                .routes
                .iter()
                .filter_map(|r| r.privacy.as_deref().map(|p| (r.name.clone(), policy_of(p))))
                .collect(),
            audit,
        }
    }

    /// The guard when privacy is off: nothing is found, every request goes as sent.
    pub fn off() -> Self {
        Self {
            detector: None,
            default: Policy::Allow,
            tiers: HashMap::new(),
            routes: HashMap::new(),
            audit: None,
        }
    }

    /// Whether the guard scans requests (metrics count its actions only then).
    pub fn enabled(&self) -> bool {
        self.detector.is_some()
    }

    /// The route's policy, else the tier's, else the default.
    pub fn policy_for(&self, tier: &str, route: Option<&str>) -> Policy {
        route
            .and_then(|r| self.routes.get(r))
            .or_else(|| self.tiers.get(tier))
            .copied()
            .unwrap_or(self.default)
    }

    /// Findings per category in the client's text, without changing it.
    pub fn count(&self, body: &Value) -> Counts {
        let Some(d) = &self.detector else {
            return Counts::new();
        };
        let mut b = body.clone();
        let mut m = Masker::new(d, "");
        for_each_text(&mut b, &mut |s| m.count(s));
        m.counts
    }

    /// Decides what happens to `body` on its way to `tier`.
    pub fn inspect(&self, body: &Value, tier: &str, route: Option<&str>) -> Verdict {
        let Some(d) = &self.detector else {
            return Verdict::Clean;
        };
        let policy = self.policy_for(tier, route);
        let mut masked = body.clone();
        let original = body.to_string();
        let mut m = Masker::new(d, &original);
        for_each_text(&mut masked, &mut |s| *s = m.mask(s));
        if !m.found_any() {
            return Verdict::Clean;
        }
        let counts = m.counts.clone();
        match policy {
            Policy::KeepLocal => Verdict::KeepLocal(counts),
            Policy::Block => Verdict::Block(counts),
            Policy::Allow => Verdict::Allow(counts),
            Policy::Mask => Verdict::Mask(counts, masked, m.unmasker()),
        }
    }

    /// `text` with every finding replaced by a placeholder (for stored texts).
    pub fn redact(&self, text: &str) -> String {
        match &self.detector {
            Some(d) => Masker::new(d, text).mask(text),
            None => text.to_string(),
        }
    }

    /// A request and its answer with personal data replaced by placeholders, the same value by the
    /// same placeholder in both (a student trained on them learns to copy placeholders, which the
    /// guard restores when it serves).
    pub fn redact_together(&self, request: &mut Value, answer: &mut Value) {
        if let Some(d) = &self.detector {
            porteiro_privacy::mask_together(d, &mut [request, answer]);
        }
    }

    /// Queues the audit record of one request (no-op without an audit trail).
    pub fn audit(&self, ctx: &RequestCtx, tier: &str, route: &str, action: Action, c: &Counts) {
        if let Some(a) = &self.audit {
            a.record(AuditRecord {
                ts_ms: AuditRecord::now(),
                request_id: ctx.id.clone(),
                key_id: ctx.key_id.clone(),
                tier: tier.to_string(),
                route: route.to_string(),
                policy: action.as_str().to_string(),
                categories: c.iter().map(|(k, n)| (k.name().to_string(), *n)).collect(),
            });
        }
    }

    /// A learned route changed stage (promoted, shadow, rolled back): one record in the trail.
    pub fn audit_flywheel(&self, version: u64, c: &porteiro_flywheel::routes::Change) {
        if let Some(a) = &self.audit {
            a.record(flywheel_record(version, c));
        }
    }

    /// Waits for queued audit records to be committed (tests, shutdown).
    pub fn flush_audit(&self) -> Result<(), porteiro_privacy::audit::AuditError> {
        if let Some(a) = &self.audit {
            a.flush()?;
        }
        Ok(())
    }
}

/// The audit record of a learned route's stage change (also written by `porteiro flywheel
/// promote`): tier local, the route's name, the new stage as the policy, the routes file's version
/// in the request id.
pub fn flywheel_record(version: u64, c: &porteiro_flywheel::routes::Change) -> AuditRecord {
    AuditRecord {
        ts_ms: AuditRecord::now(),
        request_id: format!("flywheel-routes-v{version}"),
        key_id: "flywheel".into(),
        tier: porteiro_config::LOCAL_TIER.into(),
        route: c.route.clone(),
        policy: format!("flywheel_{}", c.to.as_str()),
        categories: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn masks_only_the_clients_text_and_restores_answers() {
        let cfg = porteiro_config::Config::from_toml(
            "[privacy]\npolicy = \"mask\"\n[[upstreams]]\nname = \"big\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\nprivacy = \"block\"\n[[routes]]\nname = \"hr\"\ntier = \"big\"\nexamples = [\"x\"]\nprivacy = \"keep_local\"\n",
            "test",
            &Default::default(),
            "m",
            None,
        )
        .unwrap();
        let g = Guard::new(&cfg, Detector::new(), None);
        assert_eq!(g.policy_for("big", None), Policy::Block);
        assert_eq!(g.policy_for("big", Some("hr")), Policy::KeepLocal);
        assert_eq!(g.policy_for("other", None), Policy::Mask);
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "mail ana@example.com"}]}
        ]});
        let Verdict::Mask(c, masked, un) = g.inspect(&body, "other", None) else {
            panic!("expected mask");
        };
        assert_eq!(c[&Category::Email], 1);
        assert_eq!(
            masked["messages"][1]["content"][0]["text"],
            "mail [EMAIL_1]"
        );
        assert_eq!(masked["messages"][1]["content"][0]["type"], "text");
        let mut answer = json!({"choices": [{"message": {"content": "Sent to [EMAIL_1]."}}]});
        unmask_json(&mut answer, &un);
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            "Sent to ana@example.com."
        );
        assert!(matches!(g.inspect(&body, "big", None), Verdict::Block(_)));
        assert!(matches!(
            g.inspect(
                &json!({"messages": [{"role": "user", "content": "hello"}]}),
                "big",
                None
            ),
            Verdict::Clean
        ));
    }
}
