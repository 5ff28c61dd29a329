//! What a run asks the models (contract §7): a [`Conversation`] (an optional system prompt,
//! then user and assistant turns ending with a user message) and the generation parameters
//! ([`RunParams`]: `max_tokens`, `temperature`, `thinking`, for both models and per model; and
//! the sampling fields of OpenAI's route, [`Sampling`], for both models).
//!
//! These are the validated forms. Every entry point (`POST /query*`, `GET /query/stream`,
//! `POST /v1/chat/completions`) parses its own wire shape, then builds these through
//! [`Conversation::new`] and [`GenParams::check`], so the rules (and the messages naming the
//! field at fault) are the same everywhere. Providers map them to their own request fields.
//! A leaf beside `domain`: it imports nothing of duet but [`Role`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::domain::Role;

/// Who speaks a message of a conversation, as clients write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    System,
    User,
    Assistant,
}

impl Speaker {
    pub const fn as_str(self) -> &'static str {
        match self {
            Speaker::System => "system",
            Speaker::User => "user",
            Speaker::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = ChatMessage)]
pub struct Message {
    pub role: Speaker,
    /// At least one non-whitespace character.
    #[schema(min_length = 1, pattern = r"[^\s\u0085]")]
    pub content: String,
}

/// Why a conversation is refused; each message names the field at fault, for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {
    #[error("\"messages\" must hold at least one message")]
    Empty,
    #[error("\"messages[{0}].content\" must not be blank")]
    BlankContent(usize),
    #[error("\"messages[{0}]\" has role \"system\", which may only be the first message")]
    LateSystem(usize),
    #[error("the last message of \"messages\" must have role \"user\"")]
    LastNotUser,
    #[error("\"system\" cannot be given with \"messages\"; put a \"system\" message first")]
    SystemTwice,
    #[error("\"query\" must not be blank")]
    BlankQuery,
    #[error("the text of the request is {bytes} bytes; the limit is {limit}")]
    TooLarge { bytes: usize, limit: usize },
}

/// A validated conversation: an optional system prompt, then turns whose roles are `user` or
/// `assistant`, the last a `user` message; no content is blank. Shared by both models'
/// calls and the audit record, hence behind an [`Arc`] where it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    system: Option<String>,
    turns: Vec<Message>,
    /// The client sent `messages` (not `query`): the audit record keeps them.
    sent_as_messages: bool,
}

impl Conversation {
    /// A one-question conversation: `query` with an optional system prompt (blank means none).
    /// `limit` bounds the bytes of both together (`MAX_QUERY_BYTES`).
    pub fn from_query(
        query: String,
        system: Option<String>,
        limit: usize,
    ) -> Result<Self, ConversationError> {
        if is_blank(&query) {
            return Err(ConversationError::BlankQuery);
        }
        let conversation = Conversation {
            system: system.filter(|s| !is_blank(s)),
            turns: vec![Message {
                role: Speaker::User,
                content: query,
            }],
            sent_as_messages: false,
        };
        conversation.within(limit)
    }

    /// A conversation from `messages` as a client sent them: a `system` message may only come
    /// first, the last is `user`, every content is non-blank, and all contents together are at
    /// most `limit` bytes.
    pub fn new(messages: Vec<Message>, limit: usize) -> Result<Self, ConversationError> {
        let mut turns = messages.into_iter().enumerate().peekable();
        let system = match turns.next_if(|(_, m)| m.role == Speaker::System) {
            Some((i, m)) if is_blank(&m.content) => return Err(ConversationError::BlankContent(i)),
            Some((_, m)) => Some(m.content),
            None => None,
        };
        let turns = turns
            .map(|(i, m)| match m.role {
                Speaker::System => Err(ConversationError::LateSystem(i)),
                _ if is_blank(&m.content) => Err(ConversationError::BlankContent(i)),
                _ => Ok(m),
            })
            .collect::<Result<Vec<_>, _>>()?;
        match turns.last() {
            None if system.is_none() => return Err(ConversationError::Empty),
            Some(m) if m.role == Speaker::User => {}
            _ => return Err(ConversationError::LastNotUser),
        }
        Conversation {
            system,
            turns,
            sent_as_messages: true,
        }
        .within(limit)
    }

    fn within(self, limit: usize) -> Result<Self, ConversationError> {
        let bytes = self.content_bytes();
        if bytes > limit {
            return Err(ConversationError::TooLarge { bytes, limit });
        }
        Ok(self)
    }

    /// The system prompt, if any.
    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// The user and assistant turns, oldest first; never empty, the last is `user`.
    pub fn turns(&self) -> &[Message] {
        &self.turns
    }

    /// The last user message: the question this run answers (the audit record's `query`).
    pub fn last_user(&self) -> &str {
        self.turns.last().map_or("", |m| m.content.as_str())
    }

    /// True when the conversation is one user message (with or without a system prompt), as
    /// `query` gives it (a `messages` request may be one too: see [`Self::sent_as_messages`]).
    pub fn is_single_question(&self) -> bool {
        self.turns.len() == 1
    }

    /// True when the client sent `messages` rather than `query`: the audit record then keeps
    /// the whole conversation (`messages`), even when it is one question.
    pub fn sent_as_messages(&self) -> bool {
        self.sent_as_messages
    }

    /// The same conversation with every content passed through `f` (e.g. the audit's
    /// redaction under `AUDIT_STORE_TEXT=none`).
    pub fn map_contents(&self, mut f: impl FnMut(&str) -> String) -> Conversation {
        Conversation {
            system: self.system.as_deref().map(&mut f),
            turns: self
                .turns
                .iter()
                .map(|m| Message {
                    role: m.role,
                    content: f(&m.content),
                })
                .collect(),
            sent_as_messages: self.sent_as_messages,
        }
    }

    /// The whole conversation as owned messages, the system prompt first: what the audit
    /// record stores (`messages`).
    pub fn to_messages(&self) -> Vec<Message> {
        self.messages()
            .map(|(role, content)| Message {
                role,
                content: content.to_owned(),
            })
            .collect()
    }

    /// Bytes of every content together (what `MAX_QUERY_BYTES` bounds).
    pub fn content_bytes(&self) -> usize {
        self.system.as_ref().map_or(0, String::len)
            + self.turns.iter().map(|m| m.content.len()).sum::<usize>()
    }

    /// The whole conversation as messages, the system prompt first: the audit record's
    /// `messages` and the shape OpenAI-compatible providers take.
    pub fn messages(&self) -> impl Iterator<Item = (Speaker, &str)> {
        self.system
            .as_deref()
            .map(|s| (Speaker::System, s))
            .into_iter()
            .chain(self.turns.iter().map(|m| (m.role, m.content.as_str())))
    }
}

/// Nothing but white space. Unicode's White_Space (what `str::trim` removes) plus U+FEFF, so
/// that the rule is exactly the OpenAPI pattern `[^\s\u0085]` read as an ECMAScript regex
/// (whose `\s` has U+FEFF but not U+0085): a text is valid here iff it is valid there.
pub fn is_blank(s: &str) -> bool {
    s.chars().all(|c| c.is_whitespace() || c == '\u{FEFF}')
}

/// How much a model may think before answering; each provider maps it to its own knob
/// (documented in docs/providers.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Thinking {
    Off,
    Low,
    Medium,
    High,
}

impl Thinking {
    pub const fn as_str(self) -> &'static str {
        match self {
            Thinking::Off => "off",
            Thinking::Low => "low",
            Thinking::Medium => "medium",
            Thinking::High => "high",
        }
    }
}

/// The largest `max_tokens` a client may ask for.
pub const MAX_TOKENS_LIMIT: u32 = 1_000_000;
/// The largest `temperature`.
pub const MAX_TEMPERATURE: f64 = 2.0;

/// Generation parameters of one model; `None` means the provider's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GenParams {
    /// The most tokens the answer may have: 1 to 1,000,000.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature: 0 to 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    /// How much the model may think before answering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thinking: Option<Thinking>,
}

/// A parameter out of its range; the message names it (`field` is its path, e.g.
/// `pro.temperature`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{field}\" must be {range}")]
pub struct ParamError {
    pub field: String,
    pub range: &'static str,
}

impl GenParams {
    /// Checks the ranges; `prefix` is where these sit in the request (`""`, `"flash."`,
    /// `"pro."`), for the message.
    pub fn check(&self, prefix: &str) -> Result<(), ParamError> {
        if self
            .max_tokens
            .is_some_and(|n| !(1..=MAX_TOKENS_LIMIT).contains(&n))
        {
            return Err(ParamError {
                field: format!("{prefix}max_tokens"),
                range: "an integer from 1 to 1000000",
            });
        }
        if self
            .temperature
            .is_some_and(|t| !(0.0..=MAX_TEMPERATURE).contains(&t))
        {
            return Err(ParamError {
                field: format!("{prefix}temperature"),
                range: "a number from 0 to 2",
            });
        }
        Ok(())
    }

    /// These, with every unset one taken from `fallback`.
    pub fn or(self, fallback: GenParams) -> GenParams {
        GenParams {
            max_tokens: self.max_tokens.or(fallback.max_tokens),
            temperature: self.temperature.or(fallback.temperature),
            thinking: self.thinking.or(fallback.thinking),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == GenParams::default()
    }
}

/// The most `stop` strings a request may give (OpenAI's limit; Gemini takes five, Anthropic
/// more).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// The largest `frequency_penalty` and `presence_penalty` (and the smallest is its negative).
pub const MAX_PENALTY: f64 = 2.0;

/// Sampling fields of OpenAI's request that providers have too, for both models; only
/// `POST /v1/chat/completions` takes them. Unset (or empty `stop`) means the provider's
/// default; each provider sends what it has of them (docs/providers.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Sampling {
    /// Nucleus sampling: 0 to 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// Asks for repeatable sampling, where the provider offers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Up to 4 non-empty strings; the answer ends before the first of them it would contain.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 4)]
    pub stop: Vec<String>,
    /// -2 to 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    /// -2 to 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
}

impl Sampling {
    /// Checks OpenAI's ranges, naming the field at fault.
    pub fn check(&self) -> Result<(), ParamError> {
        let refuse = |field: &'static str, range| {
            Err(ParamError {
                field: field.to_owned(),
                range,
            })
        };
        if self.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            return refuse("top_p", "a number from 0 to 1");
        }
        for (field, penalty) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if penalty.is_some_and(|p| !(-MAX_PENALTY..=MAX_PENALTY).contains(&p)) {
                return refuse(field, "a number from -2 to 2");
            }
        }
        if self.stop.len() > MAX_STOP_SEQUENCES || self.stop.iter().any(String::is_empty) {
            return refuse(
                "stop",
                "a non-empty string or an array of at most 4 non-empty strings",
            );
        }
        Ok(())
    }

    /// The bytes of text these hold (the `stop` strings), for memory accounting.
    pub fn text_bytes(&self) -> usize {
        self.stop.iter().map(String::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        *self == Sampling::default()
    }
}

/// The parameters of a run as the client sent them: for both models, and per model
/// overrides. Stored as sent in the audit record (`params`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunParams {
    #[serde(flatten)]
    pub both: GenParams,
    /// OpenAI's sampling fields, for both models (only `POST /v1/chat/completions` sets them).
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Flash's own parameters, over the ones for both.
    #[serde(skip_serializing_if = "GenParams::is_empty", default)]
    pub flash: GenParams,
    /// Pro's own parameters, over the ones for both.
    #[serde(skip_serializing_if = "GenParams::is_empty", default)]
    pub pro: GenParams,
}

impl RunParams {
    /// Checks every range, naming the field at fault.
    pub fn check(&self) -> Result<(), ParamError> {
        self.both.check("")?;
        self.flash.check("flash.")?;
        self.pro.check("pro.")?;
        self.sampling.check()
    }

    /// What `role` is sent: its own overrides, then the ones for both.
    pub fn for_role(&self, role: Role) -> GenParams {
        match role {
            Role::Flash => self.flash.or(self.both),
            Role::Pro => self.pro.or(self.both),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == RunParams::default()
    }
}

/// What both models of a run are asked; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ask {
    pub conversation: Arc<Conversation>,
    pub params: RunParams,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: Speaker, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn conversations_follow_the_contract_rules() {
        use Speaker::*;
        let ok = Conversation::new(
            vec![
                m(System, "be brief"),
                m(User, "hi"),
                m(Assistant, "hello"),
                m(User, "why?"),
            ],
            100,
        )
        .unwrap();
        assert_eq!(ok.system(), Some("be brief"));
        assert_eq!(ok.turns().len(), 3);
        assert_eq!(ok.last_user(), "why?");
        assert_eq!(ok.content_bytes(), 8 + 2 + 5 + 4);
        assert_eq!(ok.messages().count(), 4);

        let err = |msgs: Vec<Message>| Conversation::new(msgs, 100).unwrap_err().to_string();
        assert_eq!(err(vec![]), "\"messages\" must hold at least one message");
        assert_eq!(
            err(vec![m(System, "s")]),
            "the last message of \"messages\" must have role \"user\""
        );
        assert_eq!(
            err(vec![m(User, "a"), m(Assistant, "b")]),
            "the last message of \"messages\" must have role \"user\""
        );
        assert_eq!(
            err(vec![m(User, "a"), m(System, "s"), m(User, "b")]),
            "\"messages[1]\" has role \"system\", which may only be the first message"
        );
        assert_eq!(
            err(vec![m(User, "a"), m(Assistant, " \u{feff}"), m(User, "b")]),
            "\"messages[1].content\" must not be blank"
        );
        assert_eq!(
            err(vec![m(System, "\n"), m(User, "b")]),
            "\"messages[0].content\" must not be blank"
        );
        assert!(matches!(
            Conversation::new(vec![m(User, &"x".repeat(101))], 100),
            Err(ConversationError::TooLarge {
                bytes: 101,
                limit: 100
            })
        ));
    }

    #[test]
    fn a_query_is_a_one_message_conversation() {
        let c = Conversation::from_query("q".into(), Some("  ".into()), 10).unwrap();
        assert_eq!(c.system(), None, "a blank system prompt is none");
        assert!(c.is_single_question());
        assert_eq!(
            Conversation::from_query(" ".into(), None, 10).unwrap_err(),
            ConversationError::BlankQuery
        );
        assert!(Conversation::from_query("q".into(), Some("s".repeat(10)), 10).is_err());
    }

    #[test]
    fn params_check_ranges_and_fall_back_per_model() {
        let params = RunParams {
            both: GenParams {
                max_tokens: Some(100),
                temperature: Some(0.5),
                thinking: None,
            },
            pro: GenParams {
                thinking: Some(Thinking::High),
                temperature: Some(1.0),
                ..GenParams::default()
            },
            ..RunParams::default()
        };
        params.check().unwrap();
        assert_eq!(params.for_role(Role::Flash), params.both);
        let pro = params.for_role(Role::Pro);
        assert_eq!(pro.max_tokens, Some(100));
        assert_eq!(pro.temperature, Some(1.0));
        assert_eq!(pro.thinking, Some(Thinking::High));
        let bad = RunParams {
            flash: GenParams {
                temperature: Some(2.5),
                ..GenParams::default()
            },
            ..RunParams::default()
        };
        assert_eq!(
            bad.check().unwrap_err().to_string(),
            "\"flash.temperature\" must be a number from 0 to 2"
        );
        let zero = GenParams {
            max_tokens: Some(0),
            ..GenParams::default()
        };
        assert!(zero.check("").is_err());
        assert_eq!(
            serde_json::to_value(&params).unwrap(),
            serde_json::json!({"max_tokens": 100, "temperature": 0.5,
                               "pro": {"temperature": 1.0, "thinking": "high"}})
        );
    }

    #[test]
    fn sampling_checks_openai_ranges_and_is_stored_beside_the_rest() {
        let err = |sampling: Sampling| sampling.check().unwrap_err().to_string();
        let stop = |n: usize, s: &str| Sampling {
            stop: vec![s.to_owned(); n],
            ..Sampling::default()
        };
        stop(4, "\n").check().unwrap();
        assert_eq!(
            err(stop(5, "x")),
            "\"stop\" must be a non-empty string or an array of at most 4 non-empty strings"
        );
        assert!(err(stop(1, "")).starts_with("\"stop\""));
        let top_p = |p| Sampling {
            top_p: Some(p),
            ..Sampling::default()
        };
        top_p(0.0).check().unwrap();
        top_p(1.0).check().unwrap();
        assert_eq!(err(top_p(1.01)), "\"top_p\" must be a number from 0 to 1");
        assert_eq!(err(top_p(-0.1)), "\"top_p\" must be a number from 0 to 1");
        let penalties = |f, p| Sampling {
            frequency_penalty: Some(f),
            presence_penalty: Some(p),
            seed: Some(i64::MIN),
            ..Sampling::default()
        };
        penalties(-2.0, 2.0).check().unwrap();
        assert_eq!(
            err(penalties(2.5, 0.0)),
            "\"frequency_penalty\" must be a number from -2 to 2"
        );
        assert_eq!(
            err(penalties(0.0, -2.5)),
            "\"presence_penalty\" must be a number from -2 to 2"
        );
        // In `RunParams`, checked with the rest and stored flat beside `max_tokens`; unset
        // ones leave no trace, so the records of runs without them do not change.
        let params = RunParams {
            both: GenParams {
                max_tokens: Some(5),
                ..GenParams::default()
            },
            sampling: Sampling {
                top_p: Some(0.5),
                stop: vec!["END".into()],
                ..Sampling::default()
            },
            ..RunParams::default()
        };
        params.check().unwrap();
        let json = serde_json::to_value(&params).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"max_tokens": 5, "top_p": 0.5, "stop": ["END"]})
        );
        assert_eq!(serde_json::from_value::<RunParams>(json).unwrap(), params);
        assert_eq!(
            serde_json::from_value::<RunParams>(serde_json::json!({"max_tokens": 5}))
                .unwrap()
                .sampling,
            Sampling::default()
        );
        let bad = RunParams {
            sampling: top_p(2.0),
            ..RunParams::default()
        };
        assert!(bad.check().is_err());
    }
}
