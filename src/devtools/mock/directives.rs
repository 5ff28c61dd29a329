//! The `[[mock:…]]` directives a request puts in its text to ask the mock for a fault or a
//! pacing of its own (the table in docs/providers.md).

/// Faults and pacing a request asks for with `[[mock:…]]` directives in its text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Directives {
    /// `status=N`: answer with this HTTP status and the family's error body.
    pub status: Option<u16>,
    /// `retry_after=S`: the `Retry-After` header of an error answer (429 gets 1 s by default).
    pub retry_after: Option<f64>,
    /// `hang`: never answer (no status line, no byte).
    pub hang: bool,
    /// `stall_after=N`: send N tokens, then nothing more while keeping the connection open.
    pub stall_after: Option<usize>,
    /// `malformed`: a chunk of broken JSON after the first token.
    pub malformed: bool,
    /// `midstream-error`: the family's mid-stream error object after two tokens, then the end.
    pub midstream_error: bool,
    /// `endless`: tokens for ever, never a finish.
    pub endless: bool,
    /// `truncate`: the body ends halfway, without a finish or terminator.
    pub truncate: bool,
    /// `no-done`: everything including finish and usage, then the connection stays open
    /// without OpenAI's `[DONE]` (other families: without closing).
    pub no_done: bool,
    /// `ttft_ms=`, `token_ms=`, `tokens=`: pacing for this request.
    pub ttft_ms: Option<u64>,
    pub token_ms: Option<u64>,
    pub tokens: Option<usize>,
}

impl Directives {
    /// Reads every `[[mock:…]]` in a raw request body (directives are ASCII, so the JSON
    /// escaping of the text around them does not matter).
    pub fn parse(body: &[u8]) -> Directives {
        let mut d = Directives::default();
        let text = String::from_utf8_lossy(body);
        let mut rest = text.as_ref();
        while let Some(at) = rest.find("[[mock:") {
            rest = &rest[at + 7..];
            let Some(end) = rest.find("]]") else { break };
            for item in rest[..end].split(',') {
                let (name, value) = item.split_once('=').unwrap_or((item, ""));
                let value = value.trim();
                match name.trim() {
                    "status" => d.status = value.parse().ok(),
                    "retry_after" => d.retry_after = value.parse().ok(),
                    "hang" => d.hang = true,
                    "stall" => d.stall_after = Some(1),
                    "stall_after" => d.stall_after = value.parse().ok(),
                    "malformed" => d.malformed = true,
                    "midstream-error" | "midstream_error" => d.midstream_error = true,
                    "endless" => d.endless = true,
                    "truncate" => d.truncate = true,
                    "no-done" | "no_done" => d.no_done = true,
                    "ttft_ms" => d.ttft_ms = value.parse().ok(),
                    "token_ms" => d.token_ms = value.parse().ok(),
                    "tokens" => d.tokens = value.parse().ok(),
                    _ => {}
                }
            }
            rest = &rest[end..];
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_parse() {
        let body = br#"{"contents":[{"parts":[{"text":"hi [[mock:status=429,retry_after=0.5]] and [[mock:ttft_ms=5, tokens=3]] [[mock:midstream-error]]"}]}]}"#;
        let d = Directives::parse(body);
        assert_eq!(d.status, Some(429));
        assert_eq!(d.retry_after, Some(0.5));
        assert_eq!(d.ttft_ms, Some(5));
        assert_eq!(d.tokens, Some(3));
        assert!(d.midstream_error);
        assert_eq!(Directives::parse(b"plain"), Directives::default());
    }
}
