//! Finds where a chunked body (RFC 9112 section 7.1) ends, without decoding it.
//!
//! The fast HTTP/1.1 path forwards chunked bodies byte for byte, requests and responses alike; it
//! only needs to know where the body stops so that the connection can carry the next message.
//! This tracker is fed the bytes as they pass and reports the end.
//!
//! It is strict on purpose: whatever it lets through reaches the other side unchanged, and a
//! lenient peer (one that takes a bare LF for a line end, say) would otherwise find a different end
//! than ours, which is request smuggling. So every chunk line must match the grammar of RFC 9112
//! 7.1 exactly: chunk-size `1*HEXDIG`, extensions per 7.1.1, lines ending in CRLF, trailer fields
//! per 7.1.2 (RFC 9110 5.1, 5.5). Anything else is `InvalidChunk`: 400 for a request, 502 for a
//! response. The state lives in a few bytes, so splitting the input anywhere gives the same answer.

/// At most 15 hex digits in a chunk size (under 2^60 bytes): the value never overflows.
const MAX_SIZE_DIGITS: u8 = 15;
/// Chunk extensions of one body, all chunk lines together (hyper allows 16 KiB; nobody sends them).
const MAX_EXTENSION_BYTES: u32 = 4 * 1024;
/// The trailer section's size and field count (hyper: 16 KiB and 100).
const MAX_TRAILER_BYTES: u32 = 8 * 1024;
const MAX_TRAILER_FIELDS: u16 = 64;
/// The longest trailer field name a request may not send (`x-forwarded-client-cert`).
const FORBIDDEN_NAME_MAX: usize = 23;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading chunk-size hex digits.
    Size {
        digits: u8,
    },
    /// BWS after the size or an extension, before `;` (7.1.1).
    BeforeSemicolon,
    /// After `;`: BWS, then the extension name.
    ExtensionNameStart,
    ExtensionName,
    /// BWS after the name: `=`, or `;` for the next extension.
    AfterExtensionName,
    /// After `=`: BWS, then a token or a quoted-string.
    ExtensionValueStart,
    ExtensionToken,
    Quoted,
    QuotedPair,
    /// After the closing quote.
    AfterQuoted,
    /// Got the CR of a chunk line.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer field line, or of the final empty line.
    TrailerLineStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    /// Got the CR of the final empty line.
    EndLf,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub struct InvalidChunk;

impl std::fmt::Display for InvalidChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid chunked encoding")
    }
}

impl std::error::Error for InvalidChunk {}

#[derive(Clone, Debug)]
pub struct ChunkedTracker {
    state: State,
    size: u64,
    remaining: u64,
    payload: u64,
    extension_bytes: u32,
    trailer_bytes: u32,
    trailer_fields: u16,
    /// How much of `grpc-status` the trailer field's name matched so far (`NOT_GRPC_STATUS`: not
    /// it), then whether its value is being read.
    grpc_name: u8,
    grpc_value: Option<u16>,
    grpc_status: Option<u16>,
    /// A request's body: its trailer section may not name a forbidden field
    /// (`phases::forbidden_in_request_trailers`).
    request: bool,
    /// The trailer field name being read, lower-cased, while it is short enough to be forbidden.
    name: [u8; FORBIDDEN_NAME_MAX],
    /// Its length; above `FORBIDDEN_NAME_MAX`: longer than any forbidden name.
    name_len: u8,
}

const GRPC_STATUS: &[u8] = b"grpc-status";
const NOT_GRPC_STATUS: u8 = u8::MAX;

impl Default for ChunkedTracker {
    fn default() -> Self {
        ChunkedTracker {
            state: State::Size { digits: 0 },
            size: 0,
            remaining: 0,
            payload: 0,
            extension_bytes: 0,
            trailer_bytes: 0,
            trailer_fields: 0,
            grpc_name: 0,
            grpc_value: None,
            grpc_status: None,
            request: false,
            name: [0; FORBIDDEN_NAME_MAX],
            name_len: 0,
        }
    }
}

/// tchar of RFC 9110 5.6.2.
pub(crate) fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`'
        | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// qdtext of RFC 9110 5.6.4: HTAB, SP, VCHAR except `"` and `\`, obs-text.
fn is_qdtext(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff)
}

/// field-vchar or the SP/HTAB between them (RFC 9110 5.5).
fn is_field_value_byte(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff)
}

impl ChunkedTracker {
    /// The tracker of a request's body, whose trailer section is also checked for the fields it
    /// may not carry.
    pub fn request() -> ChunkedTracker {
        ChunkedTracker {
            request: true,
            ..ChunkedTracker::default()
        }
    }

    /// The body's size without the chunk framing, so far.
    pub fn payload(&self) -> u64 {
        self.payload
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The `grpc-status` trailer field's value, when the body had one (the record's gRPC status,
    /// as the hyper path reads it from HTTP/2 trailers).
    pub(crate) fn grpc_status(&self) -> Option<u16> {
        self.grpc_status
    }

    /// Follows a trailer field's name and value for `grpc-status`.
    fn note_trailer_byte(&mut self, state: State, b: u8) {
        match state {
            State::TrailerLineStart | State::TrailerName if b != b':' && b != b'\r' => {
                let at = usize::from(self.grpc_name);
                self.grpc_name = match GRPC_STATUS.get(at) {
                    Some(&c) if c == b.to_ascii_lowercase() => self.grpc_name + 1,
                    _ => NOT_GRPC_STATUS,
                };
            }
            State::TrailerName if b == b':' => {
                self.grpc_value = (usize::from(self.grpc_name) == GRPC_STATUS.len()).then_some(0);
            }
            State::TrailerValue => match (self.grpc_value, b) {
                (Some(v), b'0'..=b'9') => {
                    self.grpc_value = v
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u16::from(b - b'0')));
                }
                (_, b' ' | b'\t' | b'\r') => {
                    if b == b'\r' {
                        self.grpc_status = self.grpc_value.or(self.grpc_status);
                        self.grpc_value = None;
                        self.grpc_name = 0;
                    }
                }
                _ => self.grpc_value = None,
            },
            _ => {}
        }
    }

    /// Follows a request's trailer field name; a forbidden one is invalid: the request is refused
    /// before its end reaches the app (a field the proxy owns would get there past its rules).
    fn note_trailer_name(&mut self, b: u8) -> Result<(), InvalidChunk> {
        match (self.state, b) {
            (State::TrailerLineStart, _) => self.name_len = 0,
            (State::TrailerName, b':') => {
                let name = self.name.get(..usize::from(self.name_len));
                if name.is_some_and(crate::proxy::phases::forbidden_in_request_trailers) {
                    return Err(InvalidChunk);
                }
                return Ok(());
            }
            _ => {}
        }
        if matches!(self.state, State::TrailerLineStart | State::TrailerName) {
            if let Some(slot) = self.name.get_mut(usize::from(self.name_len)) {
                *slot = b.to_ascii_lowercase();
            }
            self.name_len = self.name_len.saturating_add(1);
        }
        Ok(())
    }

    /// Consumes `data`; returns `Some(n)` when the body ends after the first `n` bytes. Once done,
    /// it keeps answering `Some(0)`: the bytes after the body belong to the next message.
    pub fn advance(&mut self, data: &[u8]) -> Result<Option<usize>, InvalidChunk> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Done => return Ok(Some(i)),
                State::Data => {
                    let take =
                        (data.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    self.remaining -= take as u64;
                    self.payload += take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                }
                _ => {
                    self.state = self.step(data[i])?;
                    i += 1;
                    if self.state == State::Done {
                        return Ok(Some(i));
                    }
                }
            }
        }
        Ok(self.is_done().then_some(data.len()))
    }

    /// One byte of a chunk line or the trailer section.
    fn step(&mut self, b: u8) -> Result<State, InvalidChunk> {
        use State::*;
        if matches!(
            self.state,
            BeforeSemicolon
                | ExtensionNameStart
                | ExtensionName
                | AfterExtensionName
                | ExtensionValueStart
                | ExtensionToken
                | Quoted
                | QuotedPair
                | AfterQuoted
        ) {
            self.extension_bytes += 1;
            if self.extension_bytes > MAX_EXTENSION_BYTES {
                return Err(InvalidChunk);
            }
        }
        if matches!(
            self.state,
            TrailerLineStart | TrailerName | TrailerValue | TrailerLf | EndLf
        ) {
            self.trailer_bytes += 1;
            if self.trailer_bytes > MAX_TRAILER_BYTES {
                return Err(InvalidChunk);
            }
            self.note_trailer_byte(self.state, b);
            if self.request {
                self.note_trailer_name(b)?;
            }
        }
        let next = match (self.state, b) {
            // chunk-size = 1*HEXDIG (7.1)
            (Size { digits }, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                if digits >= MAX_SIZE_DIGITS {
                    return Err(InvalidChunk);
                }
                let v = (b as char).to_digit(16).ok_or(InvalidChunk)?;
                self.size = self.size * 16 + u64::from(v);
                Size { digits: digits + 1 }
            }
            (Size { digits }, b'\r') if digits > 0 => SizeLf,
            (Size { digits }, b';') if digits > 0 => ExtensionNameStart,
            (Size { digits }, b' ' | b'\t') if digits > 0 => BeforeSemicolon,
            // chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ) (7.1.1):
            // whitespace only ever leads to `;` or `=`, never to the line end.
            (BeforeSemicolon, b' ' | b'\t') => BeforeSemicolon,
            (BeforeSemicolon, b';') => ExtensionNameStart,
            (ExtensionNameStart, b' ' | b'\t') => ExtensionNameStart,
            (ExtensionNameStart | ExtensionName, b) if is_tchar(b) => ExtensionName,
            (ExtensionName, b'\r') => SizeLf,
            (ExtensionName | AfterExtensionName, b' ' | b'\t') => AfterExtensionName,
            (ExtensionName | AfterExtensionName, b'=') => ExtensionValueStart,
            (ExtensionName | AfterExtensionName, b';') => ExtensionNameStart,
            // chunk-ext-val = token / quoted-string
            (ExtensionValueStart, b' ' | b'\t') => ExtensionValueStart,
            (ExtensionValueStart | ExtensionToken, b) if is_tchar(b) => ExtensionToken,
            (ExtensionValueStart, b'"') => Quoted,
            (Quoted, b'"') => AfterQuoted,
            (Quoted, b'\\') => QuotedPair,
            (Quoted, b) if is_qdtext(b) => Quoted,
            // quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text )
            (QuotedPair, b) if is_field_value_byte(b) => Quoted,
            (ExtensionToken | AfterQuoted, b'\r') => SizeLf,
            (ExtensionToken | AfterQuoted, b' ' | b'\t') => BeforeSemicolon,
            (ExtensionToken | AfterQuoted, b';') => ExtensionNameStart,
            // Every chunk line ends in CRLF: a bare LF is invalid (7.1).
            (SizeLf, b'\n') => {
                if self.size == 0 {
                    // last-chunk: the trailer section follows (7.1.2).
                    TrailerLineStart
                } else {
                    self.remaining = self.size;
                    self.size = 0;
                    Data
                }
            }
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size { digits: 0 },
            // trailer-section = *( field-line CRLF ); field-line = field-name ":" OWS
            // field-value OWS (RFC 9112 5, 7.1.2): no obs-fold, no bare LF, no control bytes.
            (TrailerLineStart, b'\r') => EndLf,
            (TrailerLineStart | TrailerName, b) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerValue, b) if is_field_value_byte(b) => TrailerValue,
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerLf, b'\n') => {
                self.trailer_fields += 1;
                if self.trailer_fields > MAX_TRAILER_FIELDS {
                    return Err(InvalidChunk);
                }
                TrailerLineStart
            }
            (EndLf, b'\n') => Done,
            _ => return Err(InvalidChunk),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grpc_status_trailer_is_read() {
        for (body, status) in [
            (
                &b"0\r\ngrpc-status: 7\r\ngrpc-message: no\r\n\r\n"[..],
                Some(7),
            ),
            (b"0\r\nGrpc-Status:14\r\n\r\n", Some(14)),
            (
                b"1\r\na\r\n0\r\nx-grpc-status: 3\r\ngrpc-statusx: 4\r\n\r\n",
                None,
            ),
            (b"0\r\ngrpc-status: seven\r\n\r\n", None),
            (b"0\r\n\r\n", None),
        ] {
            for cut in 0..body.len() {
                let mut t = ChunkedTracker::default();
                let first = t.advance(&body[..cut]).expect("valid");
                if first.is_none() {
                    t.advance(&body[cut..]).expect("valid");
                }
                assert_eq!(
                    t.grpc_status(),
                    status,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    fn end_of(input: &[u8]) -> Result<Option<usize>, InvalidChunk> {
        ChunkedTracker::default().advance(input)
    }

    /// Feeds `input` in the pieces `cuts` makes; the first answer that is not `Ok(None)`.
    fn end_of_split(input: &[u8], cuts: &[usize]) -> Result<Option<usize>, InvalidChunk> {
        let mut t = ChunkedTracker::default();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(start, input.len());
            match t.advance(&input[start..cut])? {
                Some(n) => return Ok(Some(start + n)),
                None => start = cut,
            }
        }
        Ok(None)
    }

    #[test]
    fn finds_the_end_of_a_body_followed_by_the_next_message() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut tracker = ChunkedTracker::default();
        assert_eq!(tracker.advance(&input), Ok(Some(body.len())));
        assert_eq!(tracker.payload(), 9);
        assert!(tracker.is_done());
        assert_eq!(tracker.advance(b"more"), Ok(Some(0)));
    }

    #[test]
    fn trailers_are_part_of_the_body() {
        let body = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx:y \t\r\nEmpty:\r\n\r\n";
        assert_eq!(end_of(body), Ok(Some(body.len())));
    }

    #[test]
    fn extensions_follow_the_grammar() {
        // RFC 9112 7.1.1: BWS around `;` and `=`, token or quoted-string values.
        for line in [
            &b"5;a"[..],
            b"5;a=b",
            b"5 ; a = b",
            b"5\t;\ta\t=\t\"q \\\" ; x\"",
            b"5;a;b=c;d=\"\"",
            b"5;a=\"\x80\xff\"",
            b"000005;a=b ;c",
        ] {
            let mut body = line.to_vec();
            body.extend_from_slice(b"\r\nhello\r\n0;last\r\n\r\n");
            assert_eq!(
                end_of(&body),
                Ok(Some(body.len())),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let body = b"A\r\n0123456789\r\n0\r\n\r\n";
        let mut t = ChunkedTracker::default();
        for (i, b) in body.iter().enumerate() {
            let r = t.advance(std::slice::from_ref(b)).expect("valid");
            assert_eq!(r.is_some(), i == body.len() - 1, "byte {i}");
        }
    }

    /// Property: any split of the input gives the answer of the whole input, valid or not.
    #[test]
    fn any_split_equals_the_whole() {
        let inputs: [&[u8]; 8] = [
            b"4\r\nWiki\r\n5;e=\"x\"\r\npedia\r\n0\r\nt: v\r\n\r\nGET",
            b"1\r\na\r\n0\r\n\n",
            b"5 junk\r\nhello\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0;\n\r\n",
            b"0\r\nt: v\nx: y\r\n\r\n",
            b"2\r\nab\r\n0\r\n\r\n",
            b"f\r\n0123456789abcde\r\n",
            b"1;a=\"\\\"\r\nx\r\n0\r\n\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(9);
        for input in inputs {
            let whole = end_of(input);
            for _ in 0..300 {
                let mut cuts: Vec<usize> = (0..rng.usize(0..6))
                    .map(|_| rng.usize(0..=input.len()))
                    .collect();
                cuts.sort_unstable();
                assert_eq!(
                    end_of_split(input, &cuts),
                    whole,
                    "{} split at {cuts:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn incomplete_and_invalid() {
        assert_eq!(end_of(b"5\r\nab"), Ok(None));
        assert_eq!(end_of(b"5;a=\"x"), Ok(None));
        assert_eq!(end_of(b"0\r\nx: y\r\n"), Ok(None));
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"3\r\nabcX",
            b"ffffffffffffffffff\r\n",
            b"0x5\r\n",
            b"-1\r\n",
            // Issue 9, defect 2: each of these was forwarded and could smuggle a request.
            b"5 junk\r\nhello\r\n0\r\n\r\n",
            b"5;a\x00b\r\nhello\r\n0\r\n\r\n",
            b"0\r\n\n",
            b"0;\n\r\n",
            b"0\r\nx: y\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\n\r\r",
            // Whitespace leads only to `;` or `=` (7.1.1), never to the line end.
            b"5 \r\n",
            b"5;a \r\n",
            b"5;a=b \r\n",
            b"5;=b\r\n",
            b"5;a=\r\n",
            b"5;a=b=c\r\n",
            b"5;a=\"x\"y\r\n",
            b"5;a=\"\x7f\"\r\n",
            b";a\r\n",
            // Trailers follow the field grammar: no space before the colon, no obs-fold.
            b"0\r\nx : y\r\n\r\n",
            b"0\r\nx: y\r\n z\r\n\r\n",
            b"0\r\n: y\r\n\r\n",
            b"0\r\nx\r\n\r\n",
            b"0\r\nx: a\x00b\r\n\r\n",
        ] {
            assert_eq!(
                end_of(bad),
                Err(InvalidChunk),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn extension_and_trailer_sizes_are_bounded() {
        let mut long = b"1;a=".to_vec();
        long.resize(long.len() + MAX_EXTENSION_BYTES as usize, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(end_of(&long), Err(InvalidChunk));
        // The bound is for the whole body, not one chunk line.
        let mut many = Vec::new();
        for _ in 0..MAX_EXTENSION_BYTES / 4 {
            many.extend_from_slice(b"1;abcdef\r\nx\r\n");
        }
        assert_eq!(end_of(&many), Err(InvalidChunk));
        let mut trailers = b"0\r\n".to_vec();
        for i in 0..=MAX_TRAILER_FIELDS {
            trailers.extend_from_slice(format!("t{i}: v\r\n").as_bytes());
        }
        assert_eq!(end_of(&trailers), Err(InvalidChunk));
        let mut big = b"0\r\nt: ".to_vec();
        big.resize(big.len() + MAX_TRAILER_BYTES as usize, b'v');
        assert_eq!(end_of(&big), Err(InvalidChunk));
    }
}
