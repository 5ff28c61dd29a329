//! Where an HTTP/1.1 response body ends (RFC 9112 §6.3), decoded in place from the
//! connection's read buffer without I/O: the connection reads, this only says what the bytes
//! it holds mean.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode, header};

use super::Error;

/// Longest chunk-size line (size, extensions and line end) accepted; it only has to stop a
/// line that never ends.
const MAX_CHUNK_LINE_BYTES: usize = 4 << 10;
/// Trailer fields after the last chunk are read and dropped, up to this much.
const MAX_TRAILER_BYTES: usize = 16 << 10;

/// How the body of one response is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body (204, 304).
    Empty,
    /// `Content-Length`: this many bytes are left.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
    /// Neither: the body ends when the upstream closes the connection.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk: this many bytes are left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one; this many bytes read so far.
    Trailers(usize),
}

/// What the buffered bytes gave.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The body is complete.
    End,
    /// The buffer holds no more of the body: read more.
    More,
}

impl Framing {
    /// The framing of a response to a request that may carry a body (not `HEAD`, not
    /// `CONNECT`), from its status and headers.
    pub(super) fn of(status: StatusCode, headers: &HeaderMap) -> Result<Framing, Error> {
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok(Framing::Empty);
        }
        // Transfer-Encoding wins over Content-Length; a coding other than chunked last means
        // the body runs to the connection's close.
        if headers.contains_key(header::TRANSFER_ENCODING) {
            let last = headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .map(<[u8]>::trim_ascii)
                .rfind(|coding| !coding.is_empty());
            return Ok(match last {
                Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => {
                    Framing::Chunked(Chunked::Size)
                }
                _ => Framing::Close,
            });
        }
        let mut length = None;
        for value in headers.get_all(header::CONTENT_LENGTH) {
            // `Content-Length: 5, 5` is the same length said twice; two different ones are
            // a broken (or smuggling) response.
            for part in value.as_bytes().split(|b| *b == b',') {
                let n = parse_length(part.trim_ascii())
                    .ok_or(Error::Framing("an invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Framing("conflicting Content-Length values"));
                }
                length = Some(n);
            }
        }
        Ok(length.map_or(Framing::Close, Framing::Length))
    }

    /// Takes the next piece of the body out of `buf`, or says why it cannot.
    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        match self {
            Framing::Empty | Framing::Length(0) => Ok(Decoded::End),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = take_up_to(buf.len(), *left);
                *left -= n as u64;
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Framing::Close => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                Ok(Decoded::Data(buf.split().freeze()))
            }
            Framing::Chunked(state) => state.decode(buf),
        }
    }

    /// Whether the body is complete when the connection closes here.
    pub(super) fn complete_at_close(&self) -> bool {
        matches!(self, Framing::Close | Framing::Empty | Framing::Length(0))
    }
}

impl Chunked {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE_BYTES, "chunk-size line")?
                    else {
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&line)?;
                    *self = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = take_up_to(buf.len(), left);
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|b| *b != b'\r') {
                            return Err(Error::Framing("a chunk not followed by CRLF"));
                        }
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Framing("a chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers(read) => {
                    let room = MAX_TRAILER_BYTES.saturating_sub(read);
                    let Some(line) = take_line(buf, room, "trailer section")? else {
                        return Ok(Decoded::More);
                    };
                    if line.is_empty() {
                        return Ok(Decoded::End);
                    }
                    *self = Chunked::Trailers(read + line.len() + 2);
                }
            }
        }
    }
}

/// How many of `available` buffered bytes belong to a piece with `left` bytes to go.
fn take_up_to(available: usize, left: u64) -> usize {
    usize::try_from(left).map_or(available, |left| left.min(available))
}

/// Takes one CRLF-terminated line (without its CRLF) off the front of `buf`, if it holds a
/// whole one.
fn take_line(buf: &mut BytesMut, max: usize, what: &'static str) -> Result<Option<Bytes>, Error> {
    let Some(lf) = memchr::memchr(b'\n', buf) else {
        if buf.len() > max {
            return Err(Error::Framing(too_long(what)));
        }
        return Ok(None);
    };
    if lf + 1 > max {
        return Err(Error::Framing(too_long(what)));
    }
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(Error::Framing("a bare LF in the chunked framing"));
    }
    let line = buf.split_to(lf + 1).freeze();
    Ok(Some(line.slice(..lf - 1)))
}

fn too_long(what: &'static str) -> &'static str {
    match what {
        "trailer section" => "a trailer section too long",
        _ => "a chunk-size line too long",
    }
}

/// The size of a chunk-size line: hex digits, then optional whitespace and extensions
/// (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(Error::Framing("an invalid chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';')
        || rest.iter().any(|b| b.is_ascii_control() && *b != b'\t')
    {
        return Err(Error::Framing("an invalid chunk size"));
    }
    line[..digits].iter().try_fold(0u64, |n, b| {
        let digit = (*b as char).to_digit(16).unwrap_or(0);
        n.checked_mul(16)
            .and_then(|n| n.checked_add(u64::from(digit)))
            .ok_or(Error::Framing("an invalid chunk size"))
    })
}

/// A Content-Length value: decimal digits only (no sign, no spaces inside).
fn parse_length(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn framing(pairs: &[(&str, &str)]) -> Result<Framing, Error> {
        Framing::of(StatusCode::OK, &headers(pairs))
    }

    /// Feeds `wire` to a decoder cut into pieces of `step` bytes; returns the body and
    /// whether it ended, or the error.
    fn feed(mut framing: Framing, wire: &[u8], step: usize) -> Result<(Vec<u8>, bool), Error> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut pieces = wire.chunks(step.max(1));
        loop {
            match framing.decode(&mut buf)? {
                Decoded::Data(bytes) => body.extend_from_slice(&bytes),
                Decoded::End => return Ok((body, true)),
                Decoded::More => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => return Ok((body, false)),
                },
            }
        }
    }

    #[test]
    fn framing_follows_the_headers() {
        assert_eq!(framing(&[]).unwrap(), Framing::Close);
        assert_eq!(
            framing(&[("content-length", "12")]).unwrap(),
            Framing::Length(12)
        );
        assert_eq!(
            framing(&[("content-length", "12, 12"), ("content-length", "12")]).unwrap(),
            Framing::Length(12)
        );
        assert!(framing(&[("content-length", "12"), ("content-length", "13")]).is_err());
        assert!(framing(&[("content-length", "-1")]).is_err());
        assert!(framing(&[("content-length", "1 2")]).is_err());
        assert!(framing(&[("content-length", "99999999999999999999")]).is_err());
        assert_eq!(
            framing(&[("transfer-encoding", "chunked"), ("content-length", "3")]).unwrap(),
            Framing::Chunked(Chunked::Size)
        );
        assert_eq!(
            framing(&[("transfer-encoding", "gzip, Chunked")]).unwrap(),
            Framing::Chunked(Chunked::Size)
        );
        assert_eq!(
            framing(&[("transfer-encoding", "chunked, gzip")]).unwrap(),
            Framing::Close
        );
        assert_eq!(
            Framing::of(StatusCode::NO_CONTENT, &headers(&[("content-length", "5")])).unwrap(),
            Framing::Empty
        );
    }

    #[test]
    fn a_chunked_body_decodes_the_same_however_it_is_cut() {
        let wire =
            b"5\r\nhello\r\n1;name=value\r\n \r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 5, 7, wire.len()] {
            let (body, ended) = feed(Framing::Chunked(Chunked::Size), wire, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "cut every {step} bytes");
            assert!(ended);
        }
    }

    #[test]
    fn a_length_body_ends_at_its_length() {
        for step in [1, 4, 100] {
            let (body, ended) = feed(Framing::Length(5), b"hello", step).unwrap();
            assert_eq!((body.as_slice(), ended), (&b"hello"[..], true));
        }
        let (body, ended) = feed(Framing::Length(6), b"hello", 2).unwrap();
        assert_eq!((body.as_slice(), ended), (&b"hello"[..], false));
        // What follows the body is not part of it.
        let mut buf = BytesMut::from(&b"helloEXTRA"[..]);
        let mut framing = Framing::Length(5);
        assert_eq!(
            framing.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"hello"))
        );
        assert_eq!(framing.decode(&mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"EXTRA");
    }

    #[test]
    fn an_unfinished_chunked_body_asks_for_more() {
        let (body, ended) = feed(Framing::Chunked(Chunked::Size), b"5\r\nhel", 1).unwrap();
        assert_eq!((body.as_slice(), ended), (&b"hel"[..], false));
        let (_, ended) = feed(Framing::Chunked(Chunked::Size), b"0\r\n", 1).unwrap();
        assert!(!ended, "the trailer section's empty line is missing");
    }

    #[test]
    fn broken_chunked_framing_is_an_error() {
        for wire in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\nhello\r\n",
        ] {
            assert!(
                feed(Framing::Chunked(Chunked::Size), wire, 64).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(wire)
            );
        }
        let endless = vec![b'1'; 5000];
        assert!(feed(Framing::Chunked(Chunked::Size), &endless[..], 64).is_err());
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILER_BYTES + 100 {
            trailers.extend_from_slice(b"x-t: 1\r\n");
        }
        assert!(feed(Framing::Chunked(Chunked::Size), &trailers, 512).is_err());
    }

    #[test]
    fn the_largest_chunk_size_is_read_without_overflow() {
        assert_eq!(chunk_size(b"ffffffffffffffff").unwrap(), u64::MAX);
        assert_eq!(chunk_size(b"1F ;ext").unwrap(), 31);
    }
}
