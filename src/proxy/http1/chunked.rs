//! Finds where a chunked body (RFC 9112 section 7.1) ends, without decoding it.
//!
//! The fast HTTP/1.1 path forwards chunked bodies byte for byte; it only needs to know where the
//! body stops so that the connection can carry the next message. This tracker is fed the bytes as
//! they pass and reports the end.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Size { digits: u8 },
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerLineStart,
    TrailerLine,
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
}

impl Default for ChunkedTracker {
    fn default() -> Self {
        ChunkedTracker {
            state: State::Size { digits: 0 },
            size: 0,
            remaining: 0,
            payload: 0,
        }
    }
}

impl ChunkedTracker {
    /// The body's size without the chunk framing, so far.
    pub fn payload(&self) -> u64 {
        self.payload
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes `data`; returns `Some(n)` when the body ends after the first `n` bytes.
    pub fn advance(&mut self, data: &[u8]) -> Result<Option<usize>, InvalidChunk> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
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
                    continue;
                }
                State::Size { digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // 16 hex digits overflow u64: no real body is that large.
                        if digits >= 15 {
                            return Err(InvalidChunk);
                        }
                        let v = (b as char).to_digit(16).ok_or(InvalidChunk)?;
                        self.size = self.size * 16 + u64::from(v);
                        self.state = State::Size { digits: digits + 1 };
                    }
                    b';' | b' ' | b'\t' if digits > 0 => self.state = State::Extension,
                    b'\r' if digits > 0 => self.state = State::SizeLf,
                    _ => return Err(InvalidChunk),
                },
                State::Extension => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(InvalidChunk);
                    }
                    if self.size == 0 {
                        self.state = State::TrailerLineStart;
                    } else {
                        self.remaining = self.size;
                        self.size = 0;
                        self.state = State::Data;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(InvalidChunk);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(InvalidChunk);
                    }
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerLineStart => {
                    self.state = if b == b'\r' {
                        State::EndLf
                    } else {
                        State::TrailerLine
                    };
                }
                State::TrailerLine => {
                    if b == b'\n' {
                        self.state = State::TrailerLineStart;
                    }
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(InvalidChunk);
                    }
                    self.state = State::Done;
                    return Ok(Some(i + 1));
                }
            }
            i += 1;
        }
        Ok(self.is_done().then_some(data.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(input: &[u8]) -> Result<Option<usize>, InvalidChunk> {
        ChunkedTracker::default().advance(input)
    }

    #[test]
    fn finds_the_end_of_a_body_followed_by_the_next_message() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut tracker = ChunkedTracker::default();
        assert_eq!(tracker.advance(&input), Ok(Some(body.len())));
        assert_eq!(tracker.payload(), 9);
    }

    #[test]
    fn trailers_are_part_of_the_body() {
        let body = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx: y\r\n\r\n";
        assert_eq!(end_of(body), Ok(Some(body.len())));
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

    #[test]
    fn incomplete_and_invalid() {
        assert_eq!(end_of(b"5\r\nab"), Ok(None));
        assert_eq!(end_of(b"zz\r\n"), Err(InvalidChunk));
        assert_eq!(end_of(b"\r\n"), Err(InvalidChunk));
        assert_eq!(end_of(b"3\r\nabcX"), Err(InvalidChunk));
        assert_eq!(end_of(b"ffffffffffffffffff\r\n"), Err(InvalidChunk));
    }
}
