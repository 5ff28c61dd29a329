//! `API_KEYS_FILE` (contract §11): named API keys with their own rate limits and daily
//! budgets, as TOML `[[key]]` tables. Parsed and checked here, once at start and again on
//! each `SIGHUP`; what the service does with the keys lives in `crate::clients`.
//!
//! Every refusal names the file and the line, and never quotes a key: TOML's own error text
//! shows the offending line (which may hold a key), so only its message is kept, with any
//! quoted string in it blanked.

use std::{
    collections::HashMap,
    io::Read,
    num::NonZeroU32,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::domain::Secret;

/// The longest key name; names go into rows, logs and a metric label.
pub const MAX_NAME_LEN: usize = 64;

/// The parsed key file.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyFile {
    pub keys: Vec<NamedKey>,
}

/// One `[[key]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedKey {
    /// `[A-Za-z0-9_.-]{1,64}`, unique in the file: what rows, logs and metrics name.
    pub name: String,
    /// Unique in the file and apart from `API_KEYS`; never stored, logged or echoed.
    pub key: Secret,
    /// `None`: the global `RATE_LIMIT_PER_MINUTE`; `Some(0)`: no limit for this key.
    pub rate_limit_per_minute: Option<u32>,
    /// `None`: the global `RATE_LIMIT_BURST`.
    pub burst: Option<NonZeroU32>,
    /// Input plus output tokens of both models, per UTC day.
    pub daily_token_budget: Option<u64>,
    /// The runs' `cost_usd`, per UTC day; needs the prices (contract §9).
    pub daily_cost_budget_usd: Option<f64>,
}

/// Why a key file cannot be used: `PATH:LINE: problem`, or `PATH: problem` when no line
/// is to blame (the file cannot be read, or has no key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {problem}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct KeyFileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub problem: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    key: Vec<Spanned<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Spanned<String>,
    key: Spanned<String>,
    rate_limit_per_minute: Option<u32>,
    burst: Option<Spanned<u32>>,
    daily_token_budget: Option<u64>,
    daily_cost_budget_usd: Option<Spanned<f64>>,
}

/// What a key file is checked against besides itself.
pub struct Context<'a> {
    /// `API_KEYS`: a key may not be in both (it would have two names, or none).
    pub api_keys: &'a [Secret],
    /// Whether runs have a cost (the prices of contract §9 are set): a cost budget that can
    /// never be counted is a configuration error, not a budget.
    pub prices_set: bool,
}

impl KeyFile {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path, cx: &Context<'_>) -> Result<KeyFile, KeyFileError> {
        KeyFile::parse(path, &read(path)?, cx)
    }

    /// Checks `text`, the contents of the file at `path` (named in errors).
    pub fn parse(path: &Path, text: &str, cx: &Context<'_>) -> Result<KeyFile, KeyFileError> {
        let at = |span: Option<Range<usize>>, problem: String| KeyFileError {
            path: path.to_owned(),
            line: span.map(|s| line_of(text, s.start)),
            problem,
        };
        let raw: RawFile =
            toml::from_str(text).map_err(|e| at(e.span(), redact_quoted(e.message())))?;
        if raw.key.is_empty() {
            // An empty file would turn authentication off on a reload: refused instead.
            return Err(at(
                None,
                "has no [[key]] table; list at least one key".into(),
            ));
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        // Comparing keys here is not on a request's path: no timing to protect.
        let mut keys: HashMap<String, (usize, String)> = HashMap::new();
        let mut out = Vec::with_capacity(raw.key.len());
        for table in raw.key {
            let table_span = table.span();
            let k = table.into_inner();
            let name_span = k.name_span_or(table_span);
            let name_line = line_of(text, name_span.start);
            let name = k.name.into_inner();
            if !valid_name(&name) {
                return Err(at(
                    Some(name_span),
                    format!(
                        "name {name:?} must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -"
                    ),
                ));
            }
            if let Some(first) = names.insert(name.clone(), name_line) {
                return Err(at(
                    Some(name_span),
                    format!("name {name:?} is also the name on line {first}; names must be unique"),
                ));
            }
            let key_span = k.key.span();
            let key_line = line_of(text, key_span.start);
            let key = k.key.into_inner();
            if key.is_empty() {
                return Err(at(Some(key_span), format!("the key of {name:?} is empty")));
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(at(
                    Some(key_span),
                    format!(
                        "the key of {name:?} must be printable ASCII without spaces (it is sent \
                         in an Authorization header)"
                    ),
                ));
            }
            if let Some((line, other)) = keys.get(&key) {
                return Err(at(
                    Some(key_span),
                    format!(
                        "the key of {name:?} is also the key of {other:?} (line {line}); keys \
                         must be unique"
                    ),
                ));
            }
            if cx.api_keys.iter().any(|k| k.expose() == key) {
                return Err(at(
                    Some(key_span),
                    format!(
                        "the key of {name:?} is also listed in API_KEYS; list each key in one \
                         place"
                    ),
                ));
            }
            keys.insert(key.clone(), (key_line, name.clone()));
            let burst = match k.burst {
                None => None,
                Some(b) => {
                    let span = b.span();
                    Some(NonZeroU32::new(b.into_inner()).ok_or_else(|| {
                        at(Some(span), format!("burst of {name:?} must be at least 1"))
                    })?)
                }
            };
            let daily_cost_budget_usd = match k.daily_cost_budget_usd {
                None => None,
                Some(c) => {
                    let span = c.span();
                    let usd = c.into_inner();
                    if !usd.is_finite() || usd < 0.0 {
                        return Err(at(
                            Some(span),
                            format!(
                                "daily_cost_budget_usd of {name:?} must be a finite number of \
                                 dollars, 0 or more"
                            ),
                        ));
                    }
                    if !cx.prices_set {
                        return Err(at(
                            Some(span),
                            format!(
                                "daily_cost_budget_usd of {name:?} needs the prices: set \
                                 FLASH_PRICE_INPUT_PER_MTOK, FLASH_PRICE_OUTPUT_PER_MTOK, \
                                 PRO_PRICE_INPUT_PER_MTOK and PRO_PRICE_OUTPUT_PER_MTOK, or \
                                 runs have no cost to count"
                            ),
                        ));
                    }
                    Some(usd)
                }
            };
            out.push(NamedKey {
                name,
                key: Secret::new(key),
                rate_limit_per_minute: k.rate_limit_per_minute,
                burst,
                daily_token_budget: k.daily_token_budget,
                daily_cost_budget_usd,
            });
        }
        Ok(KeyFile { keys: out })
    }
}

impl RawKey {
    fn name_span_or(&self, fallback: Range<usize>) -> Range<usize> {
        let span = self.name.span();
        if span.is_empty() { fallback } else { span }
    }
}

/// `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The largest key file read: room for thousands of keys. A bigger one is a mistake (a log
/// or a dump in the wrong place), refused before it fills the memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The text of the key file at `path`. Only a regular file of at most [`MAX_FILE_BYTES`] is
/// read: opening a FIFO with no writer blocks for ever, and a link to a device such as
/// `/dev/zero` never ends; on SIGHUP either would hold the signal loop, and SIGTERM with it.
/// Blocking: on the runtime, call it from `spawn_blocking`.
pub fn read(path: &Path) -> Result<String, KeyFileError> {
    let refuse = |problem: String| KeyFileError {
        path: path.to_owned(),
        line: None,
        problem,
    };
    let cannot = |e: std::io::Error| refuse(format!("cannot read it: {e}"));
    if !std::fs::metadata(path).map_err(cannot)?.is_file() {
        return Err(refuse("cannot read it: not a regular file".into()));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(refuse(format!(
            "is larger than {} KiB; a key file holds [[key]] tables only",
            MAX_FILE_BYTES / 1024
        )));
    }
    Ok(text)
}

/// The fields of a `[[key]]` table, which messages may name.
const FIELDS: [&str; 6] = [
    "name",
    "key",
    "rate_limit_per_minute",
    "burst",
    "daily_token_budget",
    "daily_cost_budget_usd",
];

/// TOML's and serde's messages quote what they refuse: a value in double quotes (`invalid
/// type: string "sk-..", expected u32`), a field name in backticks (`unknown field
/// `sk-..``), either of which could be a key typed in the wrong place. Every double-quoted
/// part is blanked, and every backticked one that is not a field of the file; the line
/// number says where to look.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted: Option<(char, String)> = None;
    // Inside double quotes a backslash escapes the next character (Rust's `{:?}` of a string
    // with a quote in it): that quote does not end the blanked part.
    let mut escaped = false;
    for c in message.chars() {
        match &mut quoted {
            None if c == '"' || c == '`' => quoted = Some((c, String::new())),
            None => out.push(c),
            Some(('"', _)) if escaped => escaped = false,
            Some(('"', _)) if c == '\\' => escaped = true,
            Some((open, text)) if c == *open => {
                let shown = *open == '`' && (FIELDS.contains(&text.as_str()) || text == "key");
                let (open, text) = (*open, std::mem::take(text));
                out.push(open);
                out.push_str(if shown { &text } else { "…" });
                out.push(open);
                quoted = None;
            }
            Some((_, text)) => text.push(c),
        }
    }
    if let Some((open, _)) = quoted {
        out.push(open);
        out.push('…');
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KeyFile, KeyFileError> {
        KeyFile::parse(
            Path::new("keys.toml"),
            text,
            &Context {
                api_keys: &[Secret::new("sk-env")],
                prices_set: true,
            },
        )
    }

    fn refused(text: &str) -> KeyFileError {
        let e = parse(text).unwrap_err();
        let shown = e.to_string();
        for secret in ["sk-one", "sk-two", "sk-env", "sk-secret"] {
            assert!(!shown.contains(secret), "{shown} shows a key");
        }
        e
    }

    #[test]
    fn a_whole_file_is_read() {
        let f = parse(
            r#"
[[key]]
name = "web-app"
key = "sk-one"
rate_limit_per_minute = 600
burst = 100
daily_token_budget = 2000000
daily_cost_budget_usd = 25.0

[[key]]
name = "batch.job_2"
key = "sk-two"
"#,
        )
        .unwrap();
        assert_eq!(f.keys.len(), 2);
        let web = &f.keys[0];
        assert_eq!(web.name, "web-app");
        assert_eq!(web.key.expose(), "sk-one");
        assert_eq!(web.rate_limit_per_minute, Some(600));
        assert_eq!(web.burst.map(NonZeroU32::get), Some(100));
        assert_eq!(web.daily_token_budget, Some(2_000_000));
        assert_eq!(web.daily_cost_budget_usd, Some(25.0));
        let batch = &f.keys[1];
        assert_eq!(batch.name, "batch.job_2");
        assert_eq!(batch.rate_limit_per_minute, None);
        assert_eq!(batch.daily_token_budget, None);
    }

    #[test]
    fn refusals_name_the_line_and_never_the_key() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\n[[key]]\nname = \"a\"\nkey = \"sk-two\"\n",
                5,
                "unique",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\n[[key]]\nname = \"b\"\nkey = \"sk-one\"\n",
                6,
                "keys must be unique",
            ),
            ("[[key]]\nname = \"a\"\nkey = \"sk-env\"\n", 3, "API_KEYS"),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\ndaily_token_budget = -5\n",
                4,
                "",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\ndaily_cost_budget_usd = -1.0\n",
                4,
                "finite",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\ndaily_cost_budget_usd = nan\n",
                4,
                "finite",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\ndaily_cost_budget_usd = inf\n",
                4,
                "finite",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\nrate_limit_per_minute = -1\n",
                4,
                "",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\nburst = 0\n",
                4,
                "at least 1",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\nbudget = 5\n",
                4,
                "unknown field",
            ),
            (
                "[[key]]\nname = \"a b\"\nkey = \"sk-one\"\n",
                2,
                "characters",
            ),
            ("[[key]]\nname = \"a\"\nkey = \"\"\n", 3, "empty"),
            ("[[key]]\nname = \"a\"\nkey = \"sk one\"\n", 3, "printable"),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\nrate_limit_per_minute = \"sk-secret\"\n",
                4,
                "invalid type",
            ),
            ("\n\n[[key]\nname = \"a\"\n", 3, ""),
            ("[[key]]\nname = \"a\"\nkey = \"sk-secret\n", 3, ""),
            ("[[key]]\nname = \"a\"\nkey = sk-secret\n", 3, ""),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\nsk-secret = 1\n",
                4,
                "unknown field",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\"\n\"sk-secret\"\n",
                4,
                "",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"sk-one\" \"sk-secret\"\n",
                3,
                "",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = [\"sk-secret\"]\n",
                3,
                "invalid type",
            ),
        ];
        for (text, line, words) in cases {
            let e = refused(text);
            assert_eq!(e.line, Some(*line), "{text:?}: {e}");
            assert!(e.problem.contains(words), "{text:?}: {e}");
            assert!(
                e.to_string().starts_with(&format!("keys.toml:{line}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_file_without_keys_is_refused() {
        assert!(refused("").problem.contains("no [[key]]"));
        assert!(refused("# nothing\n").problem.contains("no [[key]]"));
    }

    #[test]
    fn a_cost_budget_without_prices_is_refused() {
        let e = KeyFile::parse(
            Path::new("k.toml"),
            "[[key]]\nname = \"a\"\nkey = \"sk-one\"\ndaily_cost_budget_usd = 1.5\n",
            &Context {
                api_keys: &[],
                prices_set: false,
            },
        )
        .unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(e.problem.contains("PRICE"), "{e}");
    }

    #[test]
    fn names_are_bounded() {
        assert!(valid_name("a"));
        assert!(valid_name(&"x".repeat(64)));
        assert!(!valid_name(&"x".repeat(65)));
        assert!(!valid_name(""));
        assert!(!valid_name("é"));
        assert!(!valid_name("a/b"));
    }

    #[test]
    fn quoted_values_are_blanked() {
        assert_eq!(
            redact_quoted("invalid type: string \"sk-123\", expected u32"),
            "invalid type: string \"…\", expected u32"
        );
        assert_eq!(
            redact_quoted("unknown field `sk-123`, expected one of `name`, `key`"),
            "unknown field `…`, expected one of `name`, `key`"
        );
        assert_eq!(redact_quoted("unclosed \"sk-1"), "unclosed \"…");
    }

    /// A key with a quote in it, typed where a number goes: the message escapes the quote
    /// (`"sk-se\\"cret"`), which must not end the blanked part and show the rest.
    #[test]
    fn a_quote_inside_a_refused_key_does_not_show_its_tail() {
        let e = refused("[[key]]\nname = \"a\"\nkey = \"sk-one\"\nburst = 'sk-se\"cret-tail'\n");
        let shown = e.to_string();
        assert!(!shown.contains("cret-tail"), "{shown}");
        assert_eq!(e.line, Some(4));
    }

    /// Only a regular file of bounded size is read: a FIFO would block the open, a device
    /// or a huge file would fill the memory.
    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        let line = "# padding padding padding padding padding padding padding padding\n";
        let text = line.repeat(usize::try_from(MAX_FILE_BYTES).unwrap() / line.len() + 1);
        std::fs::write(&big, text).unwrap();
        let e = read(&big).unwrap_err();
        assert!(e.problem.contains("larger than"), "{e}");
        let e = read(Path::new("/dev/zero")).unwrap_err();
        assert!(e.problem.contains("not a regular file"), "{e}");
        let e = read(dir.path()).unwrap_err();
        assert!(e.problem.contains("not a regular file"), "{e}");
        let fine = dir.path().join("keys.toml");
        std::fs::write(&fine, "[[key]]\nname = \"a\"\nkey = \"k\"\n").unwrap();
        assert!(read(&fine).unwrap().contains("[[key]]"));
    }
}
