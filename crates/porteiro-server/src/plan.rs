//! Where a request goes, decided before anything is answered: the tiers to try in order, the route,
//! the router's decision and the privacy guard's verdict. No HTTP here: the handler acts on the plan
//! (audit, metrics, headers) and the pipeline follows its tier order.
//!
//! A chat request for the auto model (`router.auto_model`) is routed by the semantic router; a
//! request naming an upstream (its `name` or `model`) goes there directly; the local model's id
//! goes to the local tier; anything else is unknown (404).

use std::sync::Arc;

use porteiro_config::{RouterConfig, LOCAL_TIER};
use porteiro_privacy::Unmasker;
use porteiro_protocol::{ChatCompletionRequest, Content};
use porteiro_router::{Decision, Router};
use porteiro_upstream::UpstreamClient;
use serde_json::Value;

use crate::privacy::{describe, Action, Counts, Guard, Verdict};
use crate::ApiError;

/// The router and the upstream tiers; off (no auto model, no upstreams) unless configured.
pub struct Routing {
    pub cfg: RouterConfig,
    /// None when no sentence encoder is loaded (then auto requests stay local).
    pub router: Option<Arc<Router>>,
    /// Cheapest first, as configured.
    pub upstreams: Vec<Arc<UpstreamClient>>,
    /// Whether routing is configured at all (the auto model exists).
    enabled: bool,
}

impl Routing {
    pub fn new(
        cfg: RouterConfig,
        router: Option<Router>,
        upstreams: Vec<Arc<UpstreamClient>>,
    ) -> Self {
        Self {
            cfg,
            router: router.map(Arc::new),
            upstreams,
            enabled: true,
        }
    }

    /// No auto model and no upstream tiers: every chat request is the local model's.
    pub fn off() -> Self {
        Self {
            cfg: RouterConfig {
                auto_model: String::new(),
                local_min_score: 0.0,
                similarity_floor: 0.0,
                mid_stream: porteiro_config::MidStream::Continue,
                scorer: None,
            },
            router: None,
            upstreams: Vec::new(),
            enabled: false,
        }
    }

    /// The model name that is routed, when routing is on.
    pub fn auto_model(&self) -> Option<&str> {
        self.enabled.then_some(self.cfg.auto_model.as_str())
    }
}

/// The models the server answers with itself.
pub struct LocalIds<'a> {
    pub model: &'a str,
    pub embedding: Option<&'a str>,
    /// Whether a name is one of the model's LoRA adapters (answered by the local tier).
    pub adapter: &'a dyn Fn(&str) -> bool,
}

/// What a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The local model by its id.
    Local,
    /// An upstream by its name or model (index into `Routing::upstreams`).
    Upstream(usize),
    /// The auto model: the router decides.
    Auto,
}

/// Resolves the request's `model`.
pub fn target(routing: &Routing, ids: &LocalIds, model: &str) -> Result<Target, ApiError> {
    if model != ids.model {
        if let Some(i) = routing
            .upstreams
            .iter()
            .position(|u| u.name() == model || u.config().model == model)
        {
            return Ok(Target::Upstream(i));
        }
    }
    if routing.auto_model() == Some(model) {
        return Ok(Target::Auto);
    }
    local_target(ids, model).map(|()| Target::Local)
}

/// Checks that `model` is the local model (endpoints that are never routed).
pub fn local_target(ids: &LocalIds, model: &str) -> Result<(), ApiError> {
    if model == ids.model || (ids.adapter)(model) {
        return Ok(());
    }
    if ids.embedding == Some(model) {
        return Err(ApiError::invalid(
            "model",
            format!("`{model}` is an embedding model; use /v1/embeddings."),
        ));
    }
    Err(ApiError::model_not_found(model))
}

/// A tier of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierRef {
    Local,
    Upstream(usize),
}

/// The privacy guard's verdict on the request, as the plan applies it.
pub struct Privacy {
    pub action: Action,
    pub counts: Counts,
    /// The tier the audit record names (local when the data stays here).
    pub tier: String,
    /// Restores the answer when the request was masked.
    pub unmasker: Option<Unmasker>,
}

pub struct Plan {
    /// Tiers in the order they are tried; a later tier answers only when an earlier one fails
    /// before its first chunk.
    pub order: Vec<TierRef>,
    /// Whether the response carries `x-porteiro-*` routing headers (auto and upstream requests).
    pub routed: bool,
    /// The matched route, "explicit" for a named upstream, "-" for the local model by name.
    pub route: String,
    /// The tier the router wanted (`escalate` when it wanted an upstream it could not have).
    pub wanted: String,
    pub decision: Option<Decision>,
    pub privacy: Privacy,
    /// The body that may leave the machine (masked when the guard masked it).
    pub passthrough: Option<Value>,
}

/// The text the router decides on: the system prompt and the last user turn.
pub fn routing_text(req: &ChatCompletionRequest) -> String {
    porteiro_router::request_text(req.messages.iter().map(|m| {
        let content = match &m.content {
            Some(Content::Text(t)) => t.as_str(),
            Some(Content::Parts(p)) => p.iter().find_map(|p| p.text.as_deref()).unwrap_or_default(),
            None => "",
        };
        (m.role.as_str(), content)
    }))
}

/// The plan for a chat request whose target (and, for the auto model, decision) is known.
/// `raw` is the client's body (moved into the plan as the body to send, not copied).
pub fn plan_chat(
    routing: &Routing,
    guard: &Guard,
    target: Target,
    decision: Option<Decision>,
    raw: Value,
) -> Result<Plan, ApiError> {
    let upstream = match target {
        Target::Local => None,
        Target::Upstream(i) => Some(i),
        Target::Auto => decision
            .as_ref()
            .and_then(|d| routing.upstreams.iter().position(|u| u.name() == d.tier)),
    };
    let route = match (&decision, target) {
        (Some(d), _) => d.route.clone(),
        (None, Target::Local) => "-".to_string(),
        (None, _) => "explicit".to_string(),
    };
    let wanted = match &decision {
        Some(d) if d.would_escalate && upstream.is_none() => "escalate".to_string(),
        Some(d) => d.tier.clone(),
        None => upstream.map_or(LOCAL_TIER.to_string(), |i| {
            routing.upstreams[i].name().to_string()
        }),
    };
    let routed = target != Target::Local;
    let local_only = |counts: Counts| Privacy {
        action: Action::None,
        counts,
        tier: LOCAL_TIER.to_string(),
        unmasker: None,
    };
    let Some(i) = upstream else {
        return Ok(Plan {
            order: vec![TierRef::Local],
            routed,
            route,
            wanted,
            decision,
            privacy: local_only(guard.count(&raw)),
            passthrough: None,
        });
    };
    let tier = routing.upstreams[i].name();
    let verdict = guard.inspect(&raw, tier, decision.as_ref().map(|d| d.route.as_str()));
    let action = verdict.action();
    let mut privacy = Privacy {
        action,
        counts: verdict.counts(),
        tier: if action == Action::KeepLocal {
            LOCAL_TIER.to_string()
        } else {
            tier.to_string()
        },
        unmasker: None,
    };
    let (order, passthrough) = match verdict {
        Verdict::KeepLocal(_) => (vec![TierRef::Local], None),
        Verdict::Block(_) => (Vec::new(), None),
        Verdict::Mask(_, masked, un) => {
            privacy.unmasker = Some(un);
            (vec![TierRef::Upstream(i), TierRef::Local], Some(masked))
        }
        Verdict::Clean | Verdict::Allow(_) => (
            vec![TierRef::Upstream(i), TierRef::Local],
            Some(raw.clone()),
        ),
    };
    Ok(Plan {
        order,
        routed,
        route,
        wanted,
        decision,
        privacy,
        passthrough,
    })
}

impl Plan {
    /// The refusal of a blocked request (after it was audited).
    pub fn blocked(&self) -> Option<ApiError> {
        let tier = &self.privacy.tier;
        (self.privacy.action == Action::Block).then(|| {
            ApiError::invalid(
                "messages",
                format!(
                    "This request holds personal data or secrets ({}); the privacy policy for tier `{tier}` is `block`, so it was not sent.",
                    describe(&self.privacy.counts)
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use porteiro_config::Config;
    use serde_json::json;

    fn setup(privacy: &str) -> (Routing, Guard) {
        let cfg = Config::from_toml(
            &format!(
                "[privacy]\npolicy = \"{privacy}\"\n[[upstreams]]\nname = \"big\"\n\
                 base_url = \"http://127.0.0.1:9/v1\"\nmodel = \"gpt-big\"\n"
            ),
            "test",
            &Default::default(),
            "small",
            None,
        )
        .unwrap();
        let ups = cfg
            .upstreams
            .iter()
            .map(|u| Arc::new(UpstreamClient::new(u.clone()).unwrap()))
            .collect();
        let routing = Routing::new(cfg.router.clone(), None, ups);
        let guard = Guard::new(&cfg, porteiro_privacy::Detector::new(), None);
        (routing, guard)
    }

    const IDS: LocalIds = LocalIds {
        model: "small",
        embedding: Some("minilm"),
        adapter: &|m| m == "small-tickets",
    };

    fn decision(tier: &str, route: &str, would_escalate: bool) -> Decision {
        Decision {
            tier: tier.into(),
            route: route.into(),
            basis: porteiro_router::Basis::Route,
            score: None,
            similarity: 0.9,
            tokens: 3,
            would_escalate,
            learned: None,
            elapsed: Default::default(),
        }
    }

    fn body(text: &str) -> Value {
        json!({"model": "auto", "messages": [{"role": "user", "content": text}]})
    }

    #[test]
    fn models_resolve_to_targets() {
        let (r, _) = setup("mask");
        assert_eq!(target(&r, &IDS, "small").unwrap(), Target::Local);
        assert_eq!(target(&r, &IDS, "small-tickets").unwrap(), Target::Local);
        assert_eq!(target(&r, &IDS, "big").unwrap(), Target::Upstream(0));
        assert_eq!(target(&r, &IDS, "gpt-big").unwrap(), Target::Upstream(0));
        assert_eq!(target(&r, &IDS, "auto").unwrap(), Target::Auto);
        assert_eq!(target(&r, &IDS, "minilm").unwrap_err().status.as_u16(), 400);
        assert_eq!(target(&r, &IDS, "nope").unwrap_err().status.as_u16(), 404);
        // Without routing the auto model does not exist.
        assert_eq!(
            target(&Routing::off(), &IDS, "auto")
                .unwrap_err()
                .status
                .as_u16(),
            404
        );
    }

    #[test]
    fn an_escalating_decision_tries_the_upstream_then_local() {
        let (r, g) = setup("mask");
        let d = decision("big", "hard", false);
        let p = plan_chat(&r, &g, Target::Auto, Some(d), body("prove it")).unwrap();
        assert_eq!(p.order, vec![TierRef::Upstream(0), TierRef::Local]);
        assert_eq!((p.route.as_str(), p.wanted.as_str()), ("hard", "big"));
        assert!(p.routed);
        assert_eq!(p.privacy.action, Action::None);
        assert_eq!(p.passthrough, Some(body("prove it")));
    }

    #[test]
    fn a_local_decision_and_the_local_model_stay_local() {
        let (r, g) = setup("mask");
        let d = decision(LOCAL_TIER, "easy", false);
        let p = plan_chat(&r, &g, Target::Auto, Some(d), body("hi")).unwrap();
        assert_eq!(p.order, vec![TierRef::Local]);
        assert_eq!((p.route.as_str(), p.wanted.as_str()), ("easy", LOCAL_TIER));
        let p = plan_chat(&r, &g, Target::Local, None, body("hi")).unwrap();
        assert_eq!((p.route.as_str(), p.routed), ("-", false));
        let d = decision(LOCAL_TIER, "scorer", true);
        let p = plan_chat(&r, &g, Target::Auto, Some(d), body("hi")).unwrap();
        assert_eq!(p.wanted, "escalate");
    }

    #[test]
    fn the_privacy_verdict_shapes_the_plan() {
        let pii = body("mail ana@example.com");
        let (r, g) = setup("mask");
        let p = plan_chat(&r, &g, Target::Upstream(0), None, pii.clone()).unwrap();
        assert_eq!(
            (p.privacy.action, p.route.as_str()),
            (Action::Mask, "explicit")
        );
        assert!(p.privacy.unmasker.is_some());
        let sent = p.passthrough.unwrap().to_string();
        assert!(!sent.contains("ana@example.com") && sent.contains("[EMAIL_1]"));
        let (r, g) = setup("keep_local");
        let p = plan_chat(&r, &g, Target::Upstream(0), None, pii.clone()).unwrap();
        assert_eq!(p.order, vec![TierRef::Local]);
        assert_eq!(
            (p.privacy.action, p.privacy.tier.as_str()),
            (Action::KeepLocal, LOCAL_TIER)
        );
        let (r, g) = setup("block");
        let p = plan_chat(&r, &g, Target::Upstream(0), None, pii.clone()).unwrap();
        assert!(p.order.is_empty());
        let e = p.blocked().unwrap();
        assert!(e.message.contains("email"), "{}", e.message);
    }
}
