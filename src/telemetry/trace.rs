//! Trace context, as the wire carries it: W3C Trace Context (`traceparent`, read and written) and
//! B3 (`b3`, `X-B3-*`, read only), and the sampling decision. Pure: the spans themselves are built
//! and exported by [`super::otlp`].
//!
//! Sampling is parent-based, as Envoy's, Linkerd's and the OpenTelemetry SDK's default is: a
//! parent's decision is kept (a hostile client can ask for all its requests to be sampled: the
//! export queue is bounded, so that costs memory only up to its bound, but the client's spans can
//! push others' out, which are counted as dropped), and a trace this proxy starts is sampled when
//! its id falls under the ratio (the SDK's `TraceIdRatioBased` rule, so that every hop that starts
//! from the same id decides the same way). B3's sampling-only `b3: 0` is honoured: no sampling.

/// A span's place in a trace: its trace, its own id and whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: u128,
    pub span_id: u64,
    /// The span it is a child of: the remote caller's, or none for a trace's first span.
    pub parent_span_id: Option<u64>,
    pub sampled: bool,
}

/// What a request says of the span that caused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    /// `None` when the caller left the decision to us (B3's deferred sampling).
    pub sampled: Option<bool>,
}

/// The trace headers this module reads, as a request's raw values.
#[derive(Clone, Copy, Debug, Default)]
pub struct ParentFields<'a> {
    pub traceparent: Option<&'a [u8]>,
    pub b3: Option<&'a [u8]>,
    pub x_b3_trace_id: Option<&'a [u8]>,
    pub x_b3_span_id: Option<&'a [u8]>,
    pub x_b3_sampled: Option<&'a [u8]>,
    pub x_b3_flags: Option<&'a [u8]>,
    /// The parent when the fields name none: the span of the tunnel the request came in.
    pub tunnel: Option<Parent>,
}

impl ParentFields<'_> {
    /// The parent the fields name: `traceparent` first (W3C wins when both are present, as in
    /// Envoy), then single-header `b3`, then the `X-B3-*` fields. A malformed field is ignored, never
    /// refused: trace context decides nothing.
    pub fn parent(&self) -> Option<Parent> {
        if let Some(parent) = self.traceparent.and_then(parse_traceparent) {
            return Some(parent);
        }
        if let Some(parent) = self.b3.and_then(parse_b3) {
            return Some(parent);
        }
        self.multi_b3().or(self.tunnel)
    }

    /// Whether the span continues the caller's W3C trace (a valid `traceparent`): its
    /// `tracestate` goes on only then.
    pub fn continues_w3c(&self) -> bool {
        self.traceparent.and_then(parse_traceparent).is_some()
    }

    fn multi_b3(&self) -> Option<Parent> {
        let trace_id = parse_b3_trace_id(self.x_b3_trace_id?)?;
        let span_id = parse_hex_u64(self.x_b3_span_id?).filter(|&id| id != 0)?;
        // `X-B3-Flags: 1` is debug, which implies sampled.
        let sampled = if self.x_b3_flags == Some(b"1") {
            Some(true)
        } else {
            self.x_b3_sampled.and_then(b3_sampling)
        };
        Some(Parent {
            trace_id,
            span_id,
            sampled,
        })
    }
}

impl<'a> ParentFields<'a> {
    /// The fields of a parsed head; a field sent twice is ignored (W3C: an invalid traceparent).
    pub fn from_headers(headers: &'a http::HeaderMap) -> ParentFields<'a> {
        let one = |name: &str| {
            let mut values = headers.get_all(name).iter();
            let first = values.next()?;
            values.next().is_none().then_some(first.as_bytes())
        };
        ParentFields {
            traceparent: one(TRACEPARENT),
            b3: one(B3),
            x_b3_trace_id: one(X_B3_TRACE_ID),
            x_b3_span_id: one(X_B3_SPAN_ID),
            x_b3_sampled: one(X_B3_SAMPLED),
            x_b3_flags: one(X_B3_FLAGS),
            tunnel: None,
        }
    }
}

/// The header names read, lower-case (HTTP/2 and the hyper path's maps keep them so).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3: &str = "b3";
pub const X_B3_TRACE_ID: &str = "x-b3-traceid";
pub const X_B3_SPAN_ID: &str = "x-b3-spanid";
pub const X_B3_SAMPLED: &str = "x-b3-sampled";
pub const X_B3_FLAGS: &str = "x-b3-flags";

/// A W3C `traceparent` (Trace Context level 1). Versions after 00 may carry more fields, which
/// are ignored (the spec asks a reader to parse the known prefix); version `ff`, upper-case hex and
/// all-zero ids are invalid.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    let version = value.get(0..2)?;
    let tail_ok = match version {
        b"00" => value.len() == 55,
        b"ff" => false,
        _ => value.len() == 55 || value.get(55) == Some(&b'-'),
    };
    if !tail_ok || parse_hex_u64(version).is_none() || value[2] != b'-' || value[35] != b'-' {
        return None;
    }
    if value[52] != b'-' {
        return None;
    }
    let trace_id = parse_hex_u128(&value[3..35]).filter(|&id| id != 0)?;
    let span_id = parse_hex_u64(&value[36..52]).filter(|&id| id != 0)?;
    let flags = parse_hex_u64(&value[53..55])?;
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
    })
}

/// Single-header B3: `{trace id}-{span id}[-{sampling}[-{parent span id}]]`. The sampling-only
/// form (`b3: 0`) names no parent and is ignored.
fn parse_b3(value: &[u8]) -> Option<Parent> {
    let mut parts = value.split(|&b| b == b'-');
    let trace_id = parse_b3_trace_id(parts.next()?)?;
    let span_id = parse_hex_u64(parts.next()?).filter(|&id| id != 0)?;
    let sampled = match parts.next() {
        None => None,
        Some(state) => Some(b3_sampling(state)?),
    };
    if let Some(parent) = parts.next() {
        parse_hex_u64(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled,
    })
}

/// B3's trace ids are 64 or 128 bits.
fn parse_b3_trace_id(value: &[u8]) -> Option<u128> {
    match value.len() {
        16 => parse_hex_u64(value).map(u128::from),
        32 => parse_hex_u128(value),
        _ => None,
    }
    .filter(|&id| id != 0)
}

/// `1` and `d` (debug) sample, `0` does not; B3 also allowed `true`/`false` once.
fn b3_sampling(value: &[u8]) -> Option<bool> {
    match value {
        b"1" | b"d" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// Lower-case hex, at most 16 digits.
fn parse_hex_u64(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 16 {
        return None;
    }
    value
        .iter()
        .try_fold(0u64, |acc, &c| Some(acc << 4 | u64::from(hex_digit(c)?)))
}

/// Lower-case hex, exactly 32 digits.
fn parse_hex_u128(value: &[u8]) -> Option<u128> {
    if value.len() != 32 {
        return None;
    }
    let high = parse_hex_u64(&value[..16])?;
    let low = parse_hex_u64(&value[16..])?;
    Some(u128::from(high) << 64 | u128::from(low))
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Which traces this proxy starts are sampled (`--trace-sampling`).
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    /// Sampled when the trace id's low 63 bits are under this: ratio × 2^63.
    threshold: u64,
}

impl Sampler {
    /// Samples every trace it starts.
    pub const ALWAYS: Sampler = Sampler { threshold: 1 << 63 };
    /// Samples none.
    pub const NEVER: Sampler = Sampler { threshold: 0 };

    /// `ratio` in [0, 1] (validated by the configuration; clamped here).
    pub fn new(ratio: f64) -> Sampler {
        let ratio = ratio.clamp(0.0, 1.0);
        // 2^63 as f64 is exact; the product rounds down to a u64 that fits (saturating cast).
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let threshold = (ratio * 9_223_372_036_854_775_808.0) as u64;
        Sampler { threshold }
    }

    /// The ids of the span of a request with these trace fields: [`Self::start`] with the parent
    /// they name, and unsampled when they name none but say `b3: 0` (or `X-B3-Sampled: 0`).
    pub fn start_for(&self, fields: &ParentFields<'_>) -> SpanIds {
        let parent = fields.parent();
        let mut ids = self.start(parent);
        let denied = fields.b3 == Some(b"0") || fields.x_b3_sampled == Some(b"0");
        if parent.is_none() && denied {
            ids.sampled = false;
        }
        ids
    }

    /// The ids of a new span: a child of `parent` (its decision kept; a deferred one made by the
    /// ratio on its trace id), else the first span of a new trace.
    pub fn start(&self, parent: Option<Parent>) -> SpanIds {
        let span_id = fastrand::u64(1..);
        match parent {
            Some(parent) => SpanIds {
                trace_id: parent.trace_id,
                span_id,
                parent_span_id: Some(parent.span_id),
                sampled: parent
                    .sampled
                    .unwrap_or_else(|| self.samples(parent.trace_id)),
            },
            None => {
                let trace_id = fastrand::u128(1..);
                SpanIds {
                    trace_id,
                    span_id,
                    parent_span_id: None,
                    sampled: self.samples(trace_id),
                }
            }
        }
    }

    fn samples(&self, trace_id: u128) -> bool {
        // The SDK's rule: the low 64 bits, shifted right once, against ratio × 2^63.
        #[allow(clippy::cast_possible_truncation)]
        let low = trace_id as u64;
        (low >> 1) < self.threshold
    }
}

impl SpanIds {
    /// This span as the `traceparent` its callee reads: `00-<trace>-<span>-<flags>`.
    pub fn traceparent(&self) -> [u8; 55] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 55];
        out[0] = b'0';
        out[1] = b'0';
        for (i, slot) in out[3..35].iter_mut().enumerate() {
            *slot = HEX[((self.trace_id >> (124 - 4 * i)) & 0xf) as usize];
        }
        for (i, slot) in out[36..52].iter_mut().enumerate() {
            *slot = HEX[((self.span_id >> (60 - 4 * i)) & 0xf) as usize];
        }
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        out
    }

    /// The same, as text (for the access log and HBONE's `CONNECT`).
    pub fn traceparent_string(&self) -> String {
        // Hex digits and dashes only.
        String::from_utf8_lossy(&self.traceparent()).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_w3c_traceparent_is_read_with_its_sampled_flag() {
        let parent = parse_traceparent(GOOD).expect("valid");
        assert_eq!(parent.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(parent.span_id, 0xb7ad6b7169203331);
        assert_eq!(parent.sampled, Some(true));
        let unsampled = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert_eq!(
            parse_traceparent(unsampled).and_then(|p| p.sampled),
            Some(false)
        );
        // A later version may append fields; its flags are still read.
        let future = b"cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what";
        assert_eq!(
            parse_traceparent(future).map(|p| p.span_id),
            Some(0xb7ad6b7169203331)
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-01",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "0g-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_traceparent_written_reads_back() {
        let sampler = Sampler::new(1.0);
        for _ in 0..100 {
            let ids = sampler.start(None);
            let parent = parse_traceparent(&ids.traceparent()).expect("valid");
            assert_eq!(
                (parent.trace_id, parent.span_id, parent.sampled),
                (ids.trace_id, ids.span_id, Some(true))
            );
        }
        let ids = SpanIds {
            trace_id: 1,
            span_id: 0xab,
            parent_span_id: None,
            sampled: false,
        };
        assert_eq!(
            ids.traceparent_string(),
            "00-00000000000000000000000000000001-00000000000000ab-00"
        );
    }

    #[test]
    fn b3_is_read_in_both_forms() {
        let single = ParentFields {
            b3: Some(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"),
            ..ParentFields::default()
        };
        assert_eq!(
            single.parent(),
            Some(Parent {
                trace_id: 0x80f198ee56343ba864fe8b2a57d3eff7,
                span_id: 0xe457b5a2e4d86bd1,
                sampled: Some(true)
            })
        );
        let deferred = ParentFields {
            b3: Some(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1"),
            ..ParentFields::default()
        };
        assert_eq!(
            deferred.parent(),
            Some(Parent {
                trace_id: 0x64fe8b2a57d3eff7,
                span_id: 0xe457b5a2e4d86bd1,
                sampled: None
            })
        );
        let multi = ParentFields {
            x_b3_trace_id: Some(b"80f198ee56343ba864fe8b2a57d3eff7"),
            x_b3_span_id: Some(b"e457b5a2e4d86bd1"),
            x_b3_sampled: Some(b"0"),
            ..ParentFields::default()
        };
        assert_eq!(multi.parent().and_then(|p| p.sampled), Some(false));
        let debug = ParentFields {
            x_b3_flags: Some(b"1"),
            ..multi
        };
        assert_eq!(debug.parent().and_then(|p| p.sampled), Some(true));
        for bad in [
            &b"0"[..],
            b"80f198ee56343ba864fe8b2a57d3eff7",
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-x",
            b"80f198ee56343ba8-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-more",
            b"80f198ee56343ba864fe8b2a57d3eff-e457b5a2e4d86bd1",
            b"0000000000000000-e457b5a2e4d86bd1",
        ] {
            let fields = ParentFields {
                b3: Some(bad),
                ..ParentFields::default()
            };
            assert_eq!(fields.parent(), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn b3_saying_no_is_heard_when_it_names_no_parent() {
        let always = Sampler::ALWAYS;
        let no = ParentFields {
            b3: Some(b"0"),
            ..ParentFields::default()
        };
        assert!(!always.start_for(&no).sampled);
        let multi_no = ParentFields {
            x_b3_sampled: Some(b"0"),
            ..ParentFields::default()
        };
        assert!(!always.start_for(&multi_no).sampled);
        assert!(always.start_for(&ParentFields::default()).sampled);
        // A zero span id names no parent in either form.
        let zero = ParentFields {
            x_b3_trace_id: Some(b"80f198ee56343ba864fe8b2a57d3eff7"),
            x_b3_span_id: Some(b"0000000000000000"),
            ..ParentFields::default()
        };
        assert_eq!(zero.parent(), None);
        // The tunnel's span is the parent only when the fields name none.
        let tunnel = Parent {
            trace_id: 7,
            span_id: 9,
            sampled: Some(true),
        };
        let inside = ParentFields {
            tunnel: Some(tunnel),
            ..ParentFields::default()
        };
        assert_eq!(inside.parent(), Some(tunnel));
        let own = ParentFields {
            traceparent: Some(GOOD),
            tunnel: Some(tunnel),
            ..ParentFields::default()
        };
        assert_eq!(own.parent().map(|p| p.span_id), Some(0xb7ad6b7169203331));
    }

    #[test]
    fn w3c_wins_over_b3() {
        let both = ParentFields {
            traceparent: Some(GOOD),
            b3: Some(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
            ..ParentFields::default()
        };
        assert_eq!(both.parent().map(|p| p.span_id), Some(0xb7ad6b7169203331));
        // A malformed traceparent leaves B3 to be read.
        let broken = ParentFields {
            traceparent: Some(b"00-zz"),
            ..both
        };
        assert_eq!(broken.parent().map(|p| p.span_id), Some(0xe457b5a2e4d86bd1));
    }

    #[test]
    fn a_parents_decision_is_kept_and_its_trace_continued() {
        let never = Sampler::new(0.0);
        let parent = parse_traceparent(GOOD).expect("valid");
        let child = never.start(Some(parent));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.parent_span_id, Some(parent.span_id));
        assert_ne!(child.span_id, parent.span_id);
        assert!(child.sampled, "the parent sampled it");
        let always = Sampler::new(1.0);
        let unsampled = Parent {
            sampled: Some(false),
            ..parent
        };
        assert!(!always.start(Some(unsampled)).sampled);
        // Deferred: decided by the ratio.
        let deferred = Parent {
            sampled: None,
            ..parent
        };
        assert!(always.start(Some(deferred)).sampled);
        assert!(!never.start(Some(deferred)).sampled);
    }

    #[test]
    fn new_traces_are_sampled_at_the_ratio() {
        assert!((0..1000).all(|_| Sampler::new(1.0).start(None).sampled));
        assert!((0..1000).all(|_| !Sampler::new(0.0).start(None).sampled));
        let tenth = Sampler::new(0.1);
        let sampled = (0..20_000).filter(|_| tenth.start(None).sampled).count();
        // 2000 expected; the bounds are 10 standard deviations (42) wide, not a flaky edge.
        assert!((1580..2420).contains(&sampled), "{sampled}");
        // The same trace id gets the same decision wherever it is made.
        let ids = tenth.start(None);
        let again = Parent {
            trace_id: ids.trace_id,
            span_id: 1,
            sampled: None,
        };
        assert_eq!(tenth.start(Some(again)).sampled, ids.sampled);
    }
}
