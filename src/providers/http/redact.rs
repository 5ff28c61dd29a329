//! Keeping keys out of logs and records: known secrets and anything shaped like a key are
//! replaced, and upstream bodies are clipped before they go into a `detail`.

/// At most `max` characters of `s`, marked when cut.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…[{} more bytes]", &s[..i], s.len() - i),
    }
}

/// Removes secrets from text bound for a log or a record: every exact occurrence of a known
/// secret, and anything shaped like a provider key (`sk-…`, `AIza…`), a `key=` URL parameter
/// or a bearer token, in case an upstream echoes a key duet does not know about.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for secret in secrets {
        // Very short "secrets" would shred ordinary text; they are not real keys anyway.
        if secret.len() >= 6 {
            out = out.replace(secret, "[redacted]");
        }
    }
    const MARKERS: &[(&str, usize)] = &[
        ("sk-", 12),
        ("AIza", 20),
        ("key=", 1),
        ("Bearer ", 8),
        ("bearer ", 8),
        ("x-api-key: ", 8),
        ("x-goog-api-key: ", 8),
    ];
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    for (marker, min_len) in MARKERS {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(marker) {
            let after = at + marker.len();
            let len = rest[after..]
                .find(|c: char| !is_key_char(c))
                .unwrap_or(rest.len() - after);
            // `sk-` inside a word (a "task-list") is not a key; a key starts a token.
            let starts_token = rest[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !is_key_char(c));
            if len >= *min_len && (starts_token || marker.ends_with(['=', ' '])) {
                let keep = if marker.starts_with("sk-") || marker.starts_with("AIza") {
                    0
                } else {
                    marker.len()
                };
                result.push_str(&rest[..at + keep]);
                result.push_str("[redacted]");
                rest = &rest[after + len..];
            } else {
                result.push_str(&rest[..after]);
                rest = &rest[after..];
            }
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// Where a URL points, safe for a log: scheme, host, port and path only. The user and
/// password, the query (Gemini setups put `?key=` there) and the fragment are left out;
/// text that is not a URL is not echoed, since it may be a key pasted in the wrong place.
pub fn url_for_log(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => target_of(&url, true),
        Err(_) => "(not a valid URL)".to_owned(),
    }
}

/// `scheme://host:port/path` (with `scheme`) or `host:port/path` of a parsed URL.
pub(crate) fn target_of(url: &reqwest::Url, scheme: bool) -> String {
    let host = url.host_str().unwrap_or("");
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let path = url.path();
    if scheme {
        format!("{}://{host}{port}{path}", url.scheme())
    } else {
        format!("{host}{port}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_for_log_keeps_host_and_path_only() {
        assert_eq!(
            url_for_log(
                "https://user:hunter2secret@llm.example:8443/v1beta?key=AIzaSyPLANTED#frag"
            ),
            "https://llm.example:8443/v1beta"
        );
        assert_eq!(
            url_for_log("https://api.openai.com/v1"),
            "https://api.openai.com/v1"
        );
        assert_eq!(url_for_log("sk-not-a-url-PLANTED"), "(not a valid URL)");
    }

    #[test]
    fn redacts_known_keys_and_key_shapes() {
        let key = "sk-test-PLANTED0123456789";
        let text = format!(
            "Incorrect API key provided: {key}. url https://x.test/v1/models/m?key=AIzaSyABCDEFGHIJKLMNOPQRSTUV&alt=sse \
             Authorization: Bearer abcdefghijklmnop, other sk-proj-ZZZZZZZZZZZZZZZZ; a task-list stays"
        );
        let out = redact(&text, &[key]);
        assert!(!out.contains(key), "{out}");
        assert!(!out.contains("AIzaSyABCDEFGHIJKLMNOPQRSTUV"), "{out}");
        assert!(!out.contains("abcdefghijklmnop"), "{out}");
        assert!(!out.contains("ZZZZZZZZZZZZ"), "{out}");
        assert!(out.contains("key=[redacted]&alt=sse"), "{out}");
        assert!(out.contains("Bearer [redacted]"), "{out}");
        assert!(out.contains("a task-list stays"), "{out}");
        assert_eq!(redact("nothing secret here", &[key]), "nothing secret here");
        // Short "secrets" are not applied: they would shred ordinary words.
        assert_eq!(redact("the cat", &["cat"]), "the cat");
    }
}
