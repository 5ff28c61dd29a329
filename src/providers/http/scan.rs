//! A small JSON reader for the decoders' hot paths: walks one document in place, hands out
//! the few values an adapter reads (strings borrowed unless escaped, unsigned integers) and
//! skips everything else without building anything.
//!
//! Why not serde: an upstream chunk is ~300 bytes of which a decoder reads a dozen, and
//! serde_json (even into a borrowed struct that names only those fields) spends ~20
//! instructions per byte going through its visitor machinery for every key and skipped
//! value; this reader spends a few.
//!
//! Every method returns `None` for anything it does not accept, and the caller then parses
//! the document with serde_json as before (the "general path"). It must therefore never
//! accept what serde_json would refuse as a [`serde_json::Value`]: whatever it walks, even
//! skipped, is checked as strictly (string escapes and lone surrogates, control characters,
//! number syntax and range, nesting depth, trailing characters). The reverse need not hold:
//! a few valid but unusual documents (escaped keys, numbers near the edge of `f64`, deep
//! nesting) are simply left to serde.

use std::borrow::Cow;

/// Deeper documents are left to serde (whose own limit is 128).
const MAX_DEPTH: u32 = 64;

/// Bytes that end a plain run inside a string: the closing quote, an escape, or a control
/// character (which JSON does not allow raw).
const STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

pub struct Scanner<'a> {
    text: &'a str,
    at: usize,
    depth: u32,
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str) -> Self {
        Scanner {
            text,
            at: 0,
            depth: 0,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// The next byte that is not JSON whitespace, left unread.
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.bytes();
        while let Some(&b) = bytes.get(self.at) {
            if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Nothing but whitespace is left: the document is complete.
    pub fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// `null`, read if it is next (whitespace before it is skipped either way).
    pub fn null(&mut self) -> bool {
        if self.peek() == Some(b'n') && self.bytes()[self.at..].starts_with(b"null") {
            self.at += 4;
            return true;
        }
        false
    }

    /// An object, handing each key to `field`, which must read (or skip) exactly its value.
    /// Keys with escapes in them are not read here.
    pub fn object(
        &mut self,
        mut field: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.eat(b'{')?;
        self.enter()?;
        if self.peek()? == b'}' {
            self.at += 1;
        } else {
            loop {
                if self.peek()? != b'"' {
                    return None;
                }
                let (key, escaped) = self.raw_string()?;
                if escaped {
                    return None;
                }
                self.eat(b':')?;
                field(self, key)?;
                if self.closed(b'}')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Some(())
    }

    /// An array, handing each element's index to `element`, which must read (or skip)
    /// exactly that element.
    pub fn array(&mut self, mut element: impl FnMut(&mut Self, usize) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        self.enter()?;
        if self.peek()? == b']' {
            self.at += 1;
        } else {
            let mut index = 0;
            loop {
                element(self, index)?;
                index += 1;
                if self.closed(b']')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Some(())
    }

    /// After a member or element: `true` past the `close` that ends its object or array,
    /// `false` past the comma before the next; `None` for anything else.
    fn closed(&mut self, close: u8) -> Option<bool> {
        let next = self.peek()?;
        self.at += 1;
        match next {
            b',' => Some(false),
            _ if next == close => Some(true),
            _ => None,
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    /// A string, unescaped (borrowed when it has no escapes).
    pub fn string(&mut self) -> Option<Cow<'a, str>> {
        if self.peek()? != b'"' {
            return None;
        }
        let (raw, escaped) = self.raw_string()?;
        Some(if escaped {
            Cow::Owned(unescape(raw))
        } else {
            Cow::Borrowed(raw)
        })
    }

    /// A string or `null`.
    pub fn opt_string(&mut self) -> Option<Option<Cow<'a, str>>> {
        if self.null() {
            return Some(None);
        }
        self.string().map(Some)
    }

    /// A non-negative integer that fits `u64` (what `Value::as_u64` reads), or `null`. Any
    /// other number is left to serde.
    pub fn opt_u64(&mut self) -> Option<Option<u64>> {
        if self.null() {
            return Some(None);
        }
        self.peek()?;
        let bytes = self.bytes();
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(&b) = bytes.get(self.at).filter(|b| b.is_ascii_digit()) {
            n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            self.at += 1;
        }
        let len = self.at - start;
        // No digits, a leading zero, or a fraction or exponent (a float to serde).
        if len == 0
            || (len > 1 && bytes[start] == b'0')
            || matches!(bytes.get(self.at), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        Some(Some(n))
    }

    /// Any one value, checked and dropped.
    pub fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.raw_string().map(drop),
            b'{' => self.object(|s, _| s.skip()),
            b'[' => self.array(|s, _| s.skip()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.bytes()[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    /// A number in JSON's grammar that serde_json also reads without an error (it refuses
    /// numbers beyond `f64`'s range).
    fn number(&mut self) -> Option<()> {
        let bytes = self.bytes();
        let start = self.at;
        let digits = |at: &mut usize| {
            let from = *at;
            while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at - from
        };
        let mut at = self.at;
        if bytes.get(at) == Some(&b'-') {
            at += 1;
        }
        let int_start = at;
        let int = digits(&mut at);
        if int == 0 || (int > 1 && bytes[int_start] == b'0') {
            return None;
        }
        let mut plain = true;
        if bytes.get(at) == Some(&b'.') {
            at += 1;
            if digits(&mut at) == 0 {
                return None;
            }
            plain = false;
        }
        if matches!(bytes.get(at), Some(b'e' | b'E')) {
            at += 1;
            if matches!(bytes.get(at), Some(b'+' | b'-')) {
                at += 1;
            }
            if digits(&mut at) == 0 {
                return None;
            }
            plain = false;
        }
        // An integer of up to 18 digits fits serde's i64 or u64; anything else becomes an
        // `f64`, which must be well inside its range (at the very edge serde's rounding and
        // Rust's might differ).
        if !plain || int > 18 {
            let value: f64 = self.text[start..at].parse().ok()?;
            if value.abs() >= 1e300 {
                return None;
            }
        }
        self.at = at;
        Some(())
    }

    /// A string's text between its quotes (the reader is at the opening quote), checked as
    /// serde_json checks a string it reads (escapes, paired surrogates, no raw control
    /// characters), and whether it has escapes.
    fn raw_string(&mut self) -> Option<(&'a str, bool)> {
        let bytes = self.bytes();
        let start = self.at + 1;
        let mut at = start;
        let mut escaped = false;
        loop {
            at = plain_run(bytes, at);
            match *bytes.get(at)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    at += 1;
                    match bytes.get(at)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 1,
                        b'u' => {
                            let unit = hex4(bytes, at + 1)?;
                            at += 5;
                            if (0xDC00..=0xDFFF).contains(&unit) {
                                return None;
                            }
                            if (0xD800..=0xDBFF).contains(&unit) {
                                if bytes.get(at..at + 2)? != b"\\u" {
                                    return None;
                                }
                                let low = hex4(bytes, at + 2)?;
                                if !(0xDC00..=0xDFFF).contains(&low) {
                                    return None;
                                }
                                at += 6;
                            }
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        self.at = at + 1;
        // Both ends are ASCII quotes, so this is a whole slice of the text.
        Some((self.text.get(start..at)?, escaped))
    }
}

/// Where the plain run of string bytes from `at` ends: the first quote, backslash or control
/// character (or the end). Eight bytes at a time while there are eight: this is most of the
/// reader's work, as most of a chunk is strings it skips.
fn plain_run(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A high bit in each byte that is zero; false hits only above a true one (borrows
    // propagate upwards), so the lowest hit is exact.
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    while let Some(word) = bytes.get(at..at + 8) {
        let mut eight = [0; 8];
        eight.copy_from_slice(word);
        let x = u64::from_le_bytes(eight);
        // Below 0x20, a quote, a backslash.
        let hits = (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')));
        if hits != 0 {
            return at + (hits.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while bytes.get(at).is_some_and(|&b| !STOP[usize::from(b)]) {
        at += 1;
    }
    at
}

/// Four hex digits at `at`, as serde_json reads them.
fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(bytes.get(at..at + 4)?).ok()?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(digits, 16).ok()
}

/// The text of a string [`Scanner::raw_string`] has checked.
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let bytes = rest.as_bytes();
        let (c, used) = match bytes[i + 1] {
            b'b' => ('\u{8}', 2),
            b'f' => ('\u{c}', 2),
            b'n' => ('\n', 2),
            b'r' => ('\r', 2),
            b't' => ('\t', 2),
            b'u' => {
                let unit = hex4(bytes, i + 2).map_or(0, u32::from);
                if (0xD800..=0xDBFF).contains(&unit) {
                    let low = hex4(bytes, i + 8).map_or(0, u32::from);
                    let code = 0x10000 + ((unit - 0xD800) << 10) + (low.wrapping_sub(0xDC00));
                    (char::from_u32(code).unwrap_or('\u{fffd}'), 12)
                } else {
                    (char::from_u32(unit).unwrap_or('\u{fffd}'), 6)
                }
            }
            // `"`, `\` and `/` stand for themselves.
            other => (char::from(other), 2),
        };
        out.push(c);
        rest = &rest[i + used..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// Every value the scanner can skip, and whether serde_json reads it as a `Value`.
    fn agree(doc: &str) {
        let mut s = Scanner::new(doc);
        let ours = s.skip().and_then(|()| s.end()).is_some();
        let theirs = serde_json::from_str::<Value>(doc).is_ok();
        // The scanner may refuse what serde takes (it then falls back), never the reverse.
        assert!(!ours || theirs, "scanner took what serde refuses: {doc:?}");
    }

    #[test]
    fn never_takes_what_serde_refuses() {
        let docs = [
            "0",
            "-0",
            "01",
            "-",
            "1.",
            ".5",
            "1e",
            "1e+",
            "1E-5",
            "-1.5e10",
            "1e400",
            "-1e400",
            "1e-400",
            "123456789012345678901234567890",
            "18446744073709551616",
            "tru",
            "nul",
            "true",
            "nulll",
            "[1,]",
            "[,1]",
            "[1 2]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{a:1}",
            "{\"a\":1}}",
            "\"\\u12\"",
            "\"\\uD800\"",
            "\"\\uDC00\"",
            "\"\\uD800\\u0041\"",
            "\"\\uD83D\\uDE00\"",
            "\"\\x\"",
            "\"a\tb\"",
            "\"a\u{7f}b\"",
            "\"\\/\"",
            "\"",
            "\"\\",
            "\"\\u00e9\"",
            "[[[[]]]]",
            "{\"a\":[{\"b\":null}]}",
            " [ 1 , 2 ] ",
            "\"\\uD83D\\\"",
            "\"\\uD83D\\uD83D\"",
            "1.0e",
            "-01",
            "-a",
            "[\"\\u0000\"]",
            "0e99999999999999999999",
            "1e99999999999999999999",
            "1e-99999999999999999999",
            "1.7976931348623157e308",
            "-",
            "[",
            "{",
            "{\"a\"",
            "{\"a\":",
            "",
        ];
        for doc in docs {
            agree(doc);
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        agree(&deep);
    }

    #[test]
    fn strings_unescape_as_serde_does() {
        let docs = [
            r#""plain""#,
            r#""a\nb\t\"c\"\\d\/e\b\f\r""#,
            r#""\u00e9\u4e2d\uD83D\uDE00 end""#,
            r#""caf\u00E9 \u2014 \u0000""#,
            "\"caf\u{e9} \u{1F600}\"",
        ];
        for doc in docs {
            let theirs: String = serde_json::from_str(doc).unwrap();
            let ours = Scanner::new(doc).string().unwrap();
            assert_eq!(ours, theirs, "{doc}");
            assert_eq!(matches!(ours, Cow::Borrowed(_)), !doc.contains('\\'));
        }
    }

    #[test]
    fn plain_runs_end_where_a_byte_by_byte_walk_ends() {
        for len in 0..20 {
            for stop in [
                b'"', b'\\', 0x00, 0x1f, 0x20, 0x7f, 0x80, 0xff, b'!', b'#', b'[', b']',
            ] {
                for pos in 0..len {
                    let mut bytes = vec![b'a'; len];
                    bytes[pos] = stop;
                    // A later stop byte too: the first one counts.
                    bytes.push(b'"');
                    let want = bytes.iter().position(|&b| STOP[usize::from(b)]);
                    assert_eq!(Some(plain_run(&bytes, 0)), want, "{bytes:?}");
                }
            }
        }
    }

    #[test]
    fn integers_as_value_reads_them() {
        for (doc, want) in [
            ("0", Some(Some(0))),
            ("27", Some(Some(27))),
            ("null", Some(None)),
            ("18446744073709551615", Some(Some(u64::MAX))),
            ("18446744073709551616", None),
            ("-1", None),
            ("1.0", None),
            ("1e2", None),
            ("007", None),
        ] {
            assert_eq!(Scanner::new(doc).opt_u64(), want, "{doc}");
        }
    }
}
