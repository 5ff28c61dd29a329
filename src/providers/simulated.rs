//! The simulated provider: no key, no network, deterministic answers with real-model pacing.
//!
//! The text is derived from a hash of (role, query, system), so the same query always gets the
//! same answer, and Flash and Pro answer differently. In a conversation it answers the last
//! user message, says which turn it is (the number of user messages so far), and the turn
//! number is part of the hash. `max_tokens` cuts the answer short with finish reason
//! `length`, as real models do, and `stop` strings end it just before the first of them
//! (finish reason `stop`). Pacing comes from [`SimulatedTiming`]:
//! a first-token delay, then one token per interval. Everything is `tokio::time::sleep`, so
//! the paused test clock controls it and dropping the stream cancels it at once.

use std::sync::Arc;

use futures::StreamExt;

use super::{Completion, ModelRequest, Provider, ProviderEvent, ProviderStream, Usage};
use crate::{config::SimulatedTiming, conversation::Speaker, domain::Role};

pub struct Simulated {
    model: String,
    timing: SimulatedTiming,
}

impl Simulated {
    pub fn new(model: String, timing: SimulatedTiming) -> Self {
        Simulated { model, timing }
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Sentences the simulated models answer with. They read as an answer without pretending to
/// know anything: the point is the streaming, not the content.
const SENTENCES: &[&str] = &[
    "The short answer depends on what matters most in your situation.",
    "Start from the evidence you already have, then look for what would change your mind.",
    "Most of the difference comes from a few factors, not from many small ones.",
    "Measure first, because intuition is least reliable exactly where the stakes are high.",
    "A simple approach that you can check usually beats a clever one that you cannot.",
    "It helps to separate what is known from what is assumed.",
    "Cost, speed and accuracy pull in different directions, so decide which one leads.",
    "Small experiments answer this faster than long debates.",
    "The common explanation is right in broad strokes but misses an important detail.",
    "Context changes the answer more than any general rule does.",
    "Write down the trade-off you are making, so you can revisit it later.",
    "When in doubt, prefer the option that is easiest to undo.",
];

/// The deterministic answer of a role to a request, split into tokens (each but the first
/// starts with a space, as real tokenizers emit them).
pub fn answer_tokens(role: Role, request: &ModelRequest) -> Vec<String> {
    // FNV-1a and xorshift64: tiny and fixed. std's `DefaultHasher` and `rand`'s generators
    // may change between releases, and this text must stay the same for the same query.
    let turn = user_turns(request);
    // The turn is hashed only from the second on, so one question keeps the answer it has
    // always had.
    let turn_bytes = if turn > 1 {
        turn.to_le_bytes().to_vec()
    } else {
        Vec::new()
    };
    let mut seed = fnv1a(&[
        role.as_str().as_bytes(),
        request.conversation.last_user().as_bytes(),
        request.conversation.system().unwrap_or("").as_bytes(),
        &turn_bytes,
    ]) | 1;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let topic: String = request.conversation.last_user().chars().take(60).collect();
    let topic = topic.split_whitespace().collect::<Vec<_>>().join(" ");
    let (mut opening, sentences) = match role {
        Role::Flash => (format!("Quick take on \u{201c}{topic}\u{201d}"), 2),
        Role::Pro => (format!("Considered answer on \u{201c}{topic}\u{201d}"), 5),
    };
    if turn > 1 {
        opening.push_str(&format!(" (turn {turn})"));
    }
    opening.push(':');
    let mut text = opening;
    let mut used = Vec::with_capacity(sentences);
    while used.len() < sentences {
        // Bounded by SENTENCES.len(), so the index is always in range.
        let i = (next() % SENTENCES.len() as u64) as usize;
        if !used.contains(&i) {
            used.push(i);
            text.push(' ');
            text.push_str(SENTENCES[i]);
        }
    }
    text.split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

impl Provider for Simulated {
    fn provider_name(&self) -> &str {
        "simulated"
    }

    fn model_name(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: &ModelRequest) -> ProviderStream {
        let mut tokens = answer_tokens(request.role, request);
        cut_at_stop(&mut tokens, &request.sampling.stop);
        let mut finish_reason = "stop";
        if let Some(max) = request.params.max_tokens.map(|n| n as usize)
            && tokens.len() > max
        {
            tokens.truncate(max);
            finish_reason = "length";
        }
        let input_tokens = request
            .conversation
            .messages()
            .map(|(_, content)| approx_tokens(content))
            .sum();
        let completion = Completion {
            finish_reason: Some(finish_reason.into()),
            usage: Usage {
                input_tokens: Some(input_tokens),
                output_tokens: Some(tokens.len() as u64),
            },
            model_version: Some(format!("{}-001", self.model)),
        };
        let timing = self.timing;
        let tokens: Arc<[String]> = tokens.into();
        futures::stream::unfold(0usize, move |i| {
            let tokens = Arc::clone(&tokens);
            let completion = completion.clone();
            async move {
                if i > tokens.len() {
                    return None;
                }
                let pause = if i == 0 {
                    timing.first_token
                } else {
                    timing.per_token
                };
                if i < tokens.len() {
                    tokio::time::sleep(pause).await;
                    Some((Ok(ProviderEvent::Delta(tokens[i].clone())), i + 1))
                } else {
                    Some((Ok(ProviderEvent::Finished(completion)), i + 1))
                }
            }
        })
        .boxed()
    }
}

/// Ends the answer just before the first place any of `stop` occurs in it, as real models
/// do (the stop string itself is not part of the answer); a token the cut falls inside keeps
/// its part before the cut.
fn cut_at_stop(tokens: &mut Vec<String>, stop: &[String]) {
    let text = tokens.concat();
    let Some(cut) = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    else {
        return;
    };
    let mut start = 0;
    let mut kept = 0;
    for token in tokens.iter_mut() {
        let end = start + token.len();
        if end > cut {
            // `cut` and `start` are both on character boundaries of `text`, and the token
            // starts at `start`, so this is on one of the token's.
            token.truncate(cut - start);
            if !token.is_empty() {
                kept += 1;
            }
            break;
        }
        kept += 1;
        start = end;
    }
    tokens.truncate(kept);
}

/// How many user messages the conversation has: the turn this answer is for.
fn user_turns(request: &ModelRequest) -> usize {
    request
        .conversation
        .turns()
        .iter()
        .filter(|m| m.role == Speaker::User)
        .count()
}

/// Roughly four bytes per token, as for English with common tokenizers; never zero.
fn approx_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;

    fn req(role: Role, q: &str) -> ModelRequest {
        ModelRequest {
            role,
            conversation: Arc::new(
                crate::conversation::Conversation::from_query(q.into(), None, usize::MAX).unwrap(),
            ),
            params: Default::default(),
            sampling: Default::default(),
            trace: None,
        }
    }

    #[test]
    fn answers_are_deterministic_and_differ_by_role() {
        let a = answer_tokens(Role::Flash, &req(Role::Flash, "why is the sky blue?"));
        let b = answer_tokens(Role::Flash, &req(Role::Flash, "why is the sky blue?"));
        let c = answer_tokens(Role::Pro, &req(Role::Pro, "why is the sky blue?"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(c.len() > a.len());
    }

    fn conversation_req(role: Role, max_tokens: Option<u32>) -> ModelRequest {
        use crate::conversation::{Conversation, GenParams, Message};
        let m = |role, content: &str| Message {
            role,
            content: content.into(),
        };
        ModelRequest {
            role,
            conversation: Arc::new(
                Conversation::new(
                    vec![
                        m(Speaker::System, "be brief"),
                        m(Speaker::User, "why is the sky blue?"),
                        m(Speaker::Assistant, "Rayleigh scattering."),
                        m(Speaker::User, "and at sunset?"),
                    ],
                    usize::MAX,
                )
                .unwrap(),
            ),
            params: GenParams {
                max_tokens,
                ..GenParams::default()
            },
            sampling: Default::default(),
            trace: None,
        }
    }

    #[test]
    fn a_conversation_is_answered_at_its_last_turn() {
        let tokens = answer_tokens(Role::Pro, &conversation_req(Role::Pro, None));
        let text = tokens.concat();
        assert!(
            text.starts_with("Considered answer on \u{201c}and at sunset?\u{201d} (turn 2):"),
            "{text}"
        );
        let single = answer_tokens(Role::Pro, &req(Role::Pro, "and at sunset?")).concat();
        assert!(single.starts_with("Considered answer on \u{201c}and at sunset?\u{201d}:"));
    }

    #[tokio::test(start_paused = true)]
    async fn max_tokens_cuts_the_answer_with_finish_reason_length() {
        let sim = Simulated::new(
            "sim".into(),
            SimulatedTiming {
                first_token: Duration::from_millis(10),
                per_token: Duration::from_millis(1),
            },
        );
        let all = answer_tokens(Role::Pro, &conversation_req(Role::Pro, None)).len();
        let mut s = sim.stream(&conversation_req(Role::Pro, Some(3)));
        let mut deltas = 0;
        let mut finished = None;
        while let Some(ev) = s.next().await {
            match ev.unwrap() {
                ProviderEvent::Delta(_) => deltas += 1,
                ProviderEvent::Finished(c) => finished = Some(c),
            }
        }
        assert!(all > 3);
        assert_eq!(deltas, 3);
        let c = finished.unwrap();
        assert_eq!(c.finish_reason.as_deref(), Some("length"));
        assert_eq!(c.usage.output_tokens, Some(3));
        // Input counts every message: "be brief" 2, "why is the sky blue?" 5,
        // "Rayleigh scattering." 5, "and at sunset?" 4.
        assert_eq!(c.usage.input_tokens, Some(16));
    }

    #[test]
    fn stop_cuts_before_the_first_stop_string_even_inside_a_token() {
        let whole = vec![
            "Quick".to_owned(),
            " take".into(),
            " on".into(),
            " it".into(),
        ];
        let cut = |stop: &[&str]| {
            let mut tokens = whole.clone();
            cut_at_stop(
                &mut tokens,
                &stop.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            );
            tokens
        };
        // The earliest in the text wins, whatever the order of `stop`.
        assert_eq!(cut(&["on", "ake"]), ["Quick", " t"]);
        assert_eq!(cut(&[" take"]), ["Quick"]);
        assert_eq!(cut(&["Quick"]), Vec::<String>::new());
        assert_eq!(cut(&["nowhere"]), whole);
        assert_eq!(cut(&[]), whole);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_streamed_answer_with_finish_reason_stop() {
        let sim = Simulated::new(
            "sim".into(),
            SimulatedTiming {
                first_token: Duration::from_millis(10),
                per_token: Duration::from_millis(1),
            },
        );
        let mut request = req(Role::Pro, "why is the sky blue?");
        let all = answer_tokens(Role::Pro, &request).concat();
        let colon = all.find(':').unwrap();
        request.sampling.stop = vec!["zzz".into(), ":".into()];
        let mut s = sim.stream(&request);
        let mut text = String::new();
        let mut finished = None;
        while let Some(ev) = s.next().await {
            match ev.unwrap() {
                ProviderEvent::Delta(d) => text.push_str(&d),
                ProviderEvent::Finished(c) => finished = Some(c),
            }
        }
        assert_eq!(text, all[..colon]);
        assert_eq!(finished.unwrap().finish_reason.as_deref(), Some("stop"));
    }

    #[tokio::test(start_paused = true)]
    async fn paces_tokens_and_finishes() {
        let timing = SimulatedTiming {
            first_token: Duration::from_millis(300),
            per_token: Duration::from_millis(10),
        };
        let sim = Simulated::new("simulated-flash".into(), timing);
        let start = tokio::time::Instant::now();
        let mut s = sim.stream(&req(Role::Flash, "hello"));
        let first = s.next().await;
        assert!(matches!(first, Some(Ok(ProviderEvent::Delta(_)))));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        let mut n = 1;
        let mut finished = None;
        while let Some(ev) = s.next().await {
            match ev.unwrap() {
                ProviderEvent::Delta(_) => n += 1,
                ProviderEvent::Finished(c) => finished = Some(c),
            }
        }
        let c = finished.unwrap();
        assert_eq!(c.usage.output_tokens, Some(n));
        assert_eq!(c.model_version.as_deref(), Some("simulated-flash-001"));
        assert_eq!(start.elapsed(), Duration::from_millis(300 + 10 * (n - 1)));
    }
}
