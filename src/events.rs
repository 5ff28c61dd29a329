//! The event contract (contract §4): the names of the events a run sends ([`EventKind`]) and
//! the shape of each one's `data`.
//!
//! These are the wire types only. `sse` frames them, `run` decides when each is sent,
//! `resume` rebuilds answer events from a stored record, `metrics` counts them by name, and
//! `api::openapi` publishes their schemas. Field names here are the contract: renaming one is
//! a breaking change for every client.

use serde::Serialize;

use crate::{
    audit::{ModelTrace, Outcome, RunStatus},
    domain::Role,
    providers::{ErrorType, Provider, Usage},
};

/// The name of an event on the wire (its `event:` line) and in the `event` label of
/// `duet_sse_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Always the first event of a run.
    Start,
    /// A piece of one model's text, sent only when deltas were asked for.
    Delta,
    /// Flash's whole answer.
    Flash,
    /// Pro's whole answer.
    Pro,
    /// One model failed, or the run did.
    Error,
    /// Always the last event of a stream that started.
    Done,
}

impl EventKind {
    /// Every kind, in the order a run may send them.
    pub const ALL: [EventKind; 6] = [
        EventKind::Start,
        EventKind::Delta,
        EventKind::Flash,
        EventKind::Pro,
        EventKind::Error,
        EventKind::Done,
    ];

    /// The wire name, which is also the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Start => "start",
            EventKind::Delta => "delta",
            EventKind::Flash => "flash",
            EventKind::Pro => "pro",
            EventKind::Error => "error",
            EventKind::Done => "done",
        }
    }

    /// The kind whose wire name is `name`.
    pub fn from_wire(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The event that carries a role's whole answer: answer events are named after the role.
    pub const fn answer(role: Role) -> EventKind {
        match role {
            Role::Flash => EventKind::Flash,
            Role::Pro => EventKind::Pro,
        }
    }

    /// The role whose answer this event carries, for `flash` and `pro`.
    pub const fn answer_role(self) -> Option<Role> {
        match self {
            EventKind::Flash => Some(Role::Flash),
            EventKind::Pro => Some(Role::Pro),
            _ => None,
        }
    }
}

/// Provider and model names, for events.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ModelRef<'a> {
    pub(crate) provider: &'a str,
    pub(crate) model: &'a str,
}

impl<'a> ModelRef<'a> {
    pub(crate) fn of(p: &'a dyn Provider) -> Self {
        ModelRef {
            provider: p.provider_name(),
            model: p.model_name(),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct StartModels<'a> {
    pub(crate) flash: ModelRef<'a>,
    pub(crate) pro: ModelRef<'a>,
}

/// The `data` of `start`: always the first event of a run.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct StartEvent<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) models: StartModels<'a>,
}

/// The `data` of `delta`: a piece of one model's text, sent only when deltas were asked for.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct DeltaEvent<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) model: Role,
    pub(crate) text: &'a str,
}

/// The `data` of `flash` and `pro`: one model's whole answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AnswerEvent<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) model: Role,
    pub(crate) provider: &'a str,
    pub(crate) model_name: &'a str,
    pub(crate) model_version: Option<&'a str>,
    pub(crate) text: &'a str,
    pub(crate) finish_reason: Option<&'a str>,
    pub(crate) latency_ms: u64,
    pub(crate) ttft_ms: Option<u64>,
    pub(crate) usage: Usage,
    /// What the call cost in USD at the configured prices; `null` when a price is not set or
    /// the provider reported no token counts (see `crate::cost`).
    pub(crate) cost_usd: Option<f64>,
}

impl<'a> AnswerEvent<'a> {
    /// The answer event as it was sent, from the model's trace in the audit record: the
    /// trace holds every field of it (see `run::report`, which builds the trace).
    pub(crate) fn from_trace(run_id: &'a str, model: Role, t: &'a ModelTrace) -> Self {
        AnswerEvent {
            run_id,
            model,
            provider: &t.provider,
            model_name: &t.model,
            model_version: t.model_version.as_deref(),
            text: &t.text,
            finish_reason: t.finish_reason.as_deref(),
            latency_ms: t.latency_ms,
            ttft_ms: t.ttft_ms,
            usage: t.usage(),
            cost_usd: t.cost_usd,
        }
    }
}

/// The `data` of `error`: one model failed (`model` set) or the run did (`model` null).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorEvent<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) model: Option<Role>,
    pub(crate) error_type: ErrorType,
    pub(crate) retryable: bool,
    pub(crate) message: &'a str,
}

/// The `data` of `done`: always the last event of a stream that started.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct DoneEvent<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) status: RunStatus,
    pub(crate) flash: Outcome,
    pub(crate) pro: Outcome,
    pub(crate) total_ms: u64,
    /// The run's cost in USD (the sum of its models' costs), or `null` when it is not known;
    /// the rule is `crate::cost::of_run`.
    pub(crate) cost_usd: Option<f64>,
    /// How far the Flash preview used the same words as the Pro answer, in [0, 1] (1 = the
    /// same words; see `crate::agreement`); `null` unless both models answered `ok`.
    #[schema(minimum = 0, maximum = 1)]
    pub(crate) agreement: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_and_answers_are_named_after_their_role() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_wire(kind.as_str()), Some(kind));
        }
        assert_eq!(EventKind::from_wire("keep-alive"), None);
        for role in [Role::Flash, Role::Pro] {
            let kind = EventKind::answer(role);
            assert_eq!(kind.as_str(), role.as_str());
            assert_eq!(kind.answer_role(), Some(role));
        }
        assert_eq!(EventKind::Done.answer_role(), None);
    }
}
