//! Request paths in the form the app will resolve them (docs/policy.md, "Paths"): pure, no I/O.
//!
//! A path rule is only as good as the agreement between the proxy and the app about what a path
//! names. `/public/..;/admin` is `/public/..;/admin` to a string comparison and `/admin` to Tomcat;
//! `%2e%2e` is `..` to any server that decodes before resolving. So every inbound request target is
//! first brought to one form, and that form is both what the policy judges and what the app
//! receives (Envoy's `normalize_path`): judging one form and forwarding another is the bug class
//! this module exists to close.
//!
//! [`normalize`]:
//! 1. percent-decodes the unreserved characters ALPHA, DIGIT, `-`, `_`, `~` (RFC 3986 2.3, 6.2.2.2);
//!    every other escape stays encoded, its hex digits upper-cased (6.2.2.1);
//! 2. removes dot segments (RFC 3986 5.2.4);
//! 3. refuses what the app could resolve to a path other than the one judged: an encoded `/`,
//!    `.`, `%` or `\` (`%2F`, `%2E`, `%25`, `%5C`), a raw `\`, a `;` parameter on a `.` or `..`
//!    segment (`..;`, `.;`, also as `%3B`), a `%u` escape, a malformed escape, a control
//!    character raw or encoded (`%00`..`%1F`, `%7F`), bytes that are not UTF-8 once decoded
//!    (overlong `%C0%AE` included), and a `..` that would climb above the root.
//!
//! The query is not part of the path: it passes as it came. `*` (OPTIONS) passes too.
//! Cost: a path with no `%`, `\`, control byte or dot segment (nearly all of them) is one scan and
//! no allocation.

use std::borrow::Cow;

use crate::vocab::{hex_value, percent_decode};

/// Why a path is refused (400, before any policy rule is consulted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ambiguous {
    #[error("the request target is not a path starting with `/`")]
    NotAPath,
    #[error("an encoded `/` (%2F)")]
    EncodedSlash,
    #[error("a backslash, raw or encoded (%5C)")]
    Backslash,
    #[error("an encoded `.` (%2E)")]
    EncodedDot,
    #[error("an encoded `%` (%25: double encoding)")]
    EncodedPercent,
    #[error("a `%u` escape")]
    PercentU,
    #[error("a `%` not followed by two hex digits")]
    MalformedEscape,
    #[error("a control character, raw or encoded")]
    Control,
    #[error("bytes that are not UTF-8 once decoded (overlong or invalid)")]
    InvalidUtf8,
    #[error("a `;` parameter on a `.` or `..` segment")]
    DotSegmentParameter,
    #[error("a `..` segment that climbs above the root")]
    AboveRoot,
}

/// The path of `target` (origin form: path, then an optional `?query`; or `*`) in the form the app
/// resolves, or why it is refused. `Cow::Borrowed` when nothing changes.
pub fn normalize(target: &str) -> Result<Cow<'_, str>, Ambiguous> {
    if target == "*" {
        return Ok(Cow::Borrowed(target));
    }
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    if !path.starts_with('/') {
        return Err(Ambiguous::NotAPath);
    }
    if is_plain(path) {
        return Ok(Cow::Borrowed(target));
    }
    let decoded = decode_unreserved(path)?;
    let mut out = resolve(&decoded)?;
    out.push_str(query);
    Ok(if out == target {
        Cow::Borrowed(target)
    } else {
        Cow::Owned(out)
    })
}

/// The common case, decided in one scan: nothing to decode, refuse or remove.
fn is_plain(path: &str) -> bool {
    path.split('/').all(|segment| {
        let needs_work = segment
            .bytes()
            .any(|b| b == b'%' || b == b'\\' || b.is_ascii_control());
        let dot = segment.starts_with('.') && matches!(dot_name(segment), "." | "..");
        !needs_work && !dot
    })
}

/// A segment's name as a server that strips path parameters sees it: up to the first `;`, or the
/// first `%3B` (`..%3B` is `..;` to a server that decodes before it strips parameters). Escapes
/// are upper-case here (raw input with an escape never reaches this in lower case: see `is_plain`).
fn dot_name(segment: &str) -> &str {
    let end = [segment.find(';'), segment.find("%3B")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(segment.len());
    &segment[..end]
}

/// Step 1: unreserved characters decoded, other escapes kept in upper case, the ambiguous refused.
fn decode_unreserved(path: &str) -> Result<String, Ambiguous> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    // An escape of a non-ASCII byte: the whole path, decoded, must then be checked as UTF-8.
    let mut high = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            return Err(Ambiguous::Backslash);
        }
        if b.is_ascii_control() {
            return Err(Ambiguous::Control);
        }
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex_value),
            bytes.get(i + 2).copied().and_then(hex_value),
        ) else {
            return Err(match bytes.get(i + 1) {
                Some(b'u' | b'U') => Ambiguous::PercentU,
                _ => Ambiguous::MalformedEscape,
            });
        };
        let value = hi << 4 | lo;
        match value {
            b'/' => return Err(Ambiguous::EncodedSlash),
            b'\\' => return Err(Ambiguous::Backslash),
            b'.' => return Err(Ambiguous::EncodedDot),
            b'%' => return Err(Ambiguous::EncodedPercent),
            v if v.is_ascii_control() => return Err(Ambiguous::Control),
            v if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'_' | b'~') => out.push(v),
            v => {
                high |= v >= 0x80;
                out.extend_from_slice(&[b'%', HEX[usize::from(hi)], HEX[usize::from(lo)]]);
            }
        }
        i += 3;
    }
    if high && std::str::from_utf8(&percent_decode(&out)).is_err() {
        return Err(Ambiguous::InvalidUtf8);
    }
    // Only ASCII was added to what was a `str`, and `%XX` stays ASCII: still UTF-8.
    String::from_utf8(out).map_err(|_| Ambiguous::InvalidUtf8)
}

/// Step 2: dot segments removed (RFC 3986 5.2.4), parameters on them and climbing refused.
fn resolve(path: &str) -> Result<String, Ambiguous> {
    let mut kept: Vec<&str> = Vec::new();
    // Whether the path ends in a dot segment: `/a/.` and `/a/b/..` both resolve to `/a/`.
    let mut ends_in_dot = false;
    // The path starts with `/`: the first split element is the empty string before it.
    for segment in path.split('/').skip(1) {
        let name = dot_name(segment);
        let dot = matches!(name, "." | "..");
        if dot && name != segment {
            return Err(Ambiguous::DotSegmentParameter);
        }
        ends_in_dot = dot;
        match segment {
            "." => {}
            ".." => {
                kept.pop().ok_or(Ambiguous::AboveRoot)?;
            }
            _ => kept.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if ends_in_dot || kept.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// How servers behind the proxy resolve a path, for the tests and the fuzz target to check that
/// the form forwarded means to them what the original meant.
pub mod reference {
    use crate::vocab::percent_decode;

    /// A server that decodes every escape, then removes dot segments (climbing stops at the root).
    pub fn decoding_app(target: &str) -> Vec<u8> {
        let path = target.split('?').next().unwrap_or_default();
        resolve(&percent_decode(path.as_bytes()))
    }

    /// Tomcat's order: `;` parameters stripped from each segment, then decoded, then resolved.
    pub fn parameter_stripping_app(target: &str) -> Vec<u8> {
        let path = target.split('?').next().unwrap_or_default();
        let stripped: Vec<&str> = path
            .split('/')
            .map(|s| s.split(';').next().unwrap_or_default())
            .collect();
        resolve(&percent_decode(stripped.join("/").as_bytes()))
    }

    fn resolve(path: &[u8]) -> Vec<u8> {
        let mut kept: Vec<&[u8]> = Vec::new();
        let mut trailing = false;
        for segment in path.split(|&b| b == b'/').skip(1) {
            trailing = matches!(segment, b"." | b"..");
            match segment {
                b"." => {}
                b".." => {
                    kept.pop();
                }
                s => kept.push(s),
            }
        }
        let mut out = Vec::new();
        for s in &kept {
            out.push(b'/');
            out.extend_from_slice(s);
        }
        if trailing || kept.is_empty() {
            out.push(b'/');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (target, what the app gets) for the accepted; the refusal's reason for the others.
    const CASES: &[(&str, Result<&str, Ambiguous>)] = &[
        ("/", Ok("/")),
        ("/public/a?b=c", Ok("/public/a?b=c")),
        ("*", Ok("*")),
        ("/public/./a", Ok("/public/a")),
        ("/public/a/../b", Ok("/public/b")),
        ("/a/b/..", Ok("/a/")),
        ("/a/.", Ok("/a/")),
        ("/.", Ok("/")),
        ("/a/..", Ok("/")),
        ("/a//..", Ok("/a/")),
        ("/public//../admin", Ok("/public/admin")),
        ("/a/..?x=/../..", Ok("/?x=/../..")),
        ("/%7Euser/%41%2d%5f", Ok("/~user/A-_")),
        ("/a%20b%3b%3Fc", Ok("/a%20b%3B%3Fc")),
        ("/caf%c3%a9", Ok("/caf%C3%A9")),
        ("/caf\u{e9}", Ok("/caf\u{e9}")),
        ("/a;b/../c", Ok("/c")),
        ("/a/...", Ok("/a/...")),
        ("/a/..x/.y", Ok("/a/..x/.y")),
        ("/..", Err(Ambiguous::AboveRoot)),
        ("/../x", Err(Ambiguous::AboveRoot)),
        ("/a/../../x", Err(Ambiguous::AboveRoot)),
        ("/public/..;/admin", Err(Ambiguous::DotSegmentParameter)),
        (
            "/public/..;jsessionid=1/admin",
            Err(Ambiguous::DotSegmentParameter),
        ),
        ("/public/.;/admin", Err(Ambiguous::DotSegmentParameter)),
        ("/public/..%3b/admin", Err(Ambiguous::DotSegmentParameter)),
        ("/public/.%3B/admin", Err(Ambiguous::DotSegmentParameter)),
        ("/public/%2e%2e/admin", Err(Ambiguous::EncodedDot)),
        ("/public/%2E./admin", Err(Ambiguous::EncodedDot)),
        ("/file%2etxt", Err(Ambiguous::EncodedDot)),
        ("/public/%252e%252e/admin", Err(Ambiguous::EncodedPercent)),
        ("/public%2fadmin", Err(Ambiguous::EncodedSlash)),
        ("/public%2F..%2Fadmin", Err(Ambiguous::EncodedSlash)),
        ("/public\\..\\admin", Err(Ambiguous::Backslash)),
        ("/public/%5c../admin", Err(Ambiguous::Backslash)),
        ("/public/%c0%ae%c0%ae/admin", Err(Ambiguous::InvalidUtf8)),
        ("/public/%e0%80%ae", Err(Ambiguous::InvalidUtf8)),
        ("/%ff", Err(Ambiguous::InvalidUtf8)),
        ("/caf\u{e9}%a9", Err(Ambiguous::InvalidUtf8)),
        ("/public/%u002e%u002e/admin", Err(Ambiguous::PercentU)),
        ("/public/%U002E", Err(Ambiguous::PercentU)),
        ("/public/..%09/admin", Err(Ambiguous::Control)),
        ("/a%00", Err(Ambiguous::Control)),
        ("/a%7f", Err(Ambiguous::Control)),
        ("/a\u{7f}", Err(Ambiguous::Control)),
        ("/a\tb", Err(Ambiguous::Control)),
        ("/a%", Err(Ambiguous::MalformedEscape)),
        ("/a%4", Err(Ambiguous::MalformedEscape)),
        ("/a%zz", Err(Ambiguous::MalformedEscape)),
        ("a/b", Err(Ambiguous::NotAPath)),
        ("", Err(Ambiguous::NotAPath)),
    ];

    #[test]
    fn table() {
        for (target, want) in CASES {
            let got = normalize(target);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{target:?}");
        }
    }

    #[test]
    fn unchanged_paths_are_borrowed() {
        for target in ["/", "/public/a?b=c", "/a%20b", "/a/...", "*"] {
            assert!(
                matches!(normalize(target), Ok(Cow::Borrowed(_))),
                "{target}"
            );
        }
        assert!(matches!(normalize("/a/./b"), Ok(Cow::Owned(_))));
    }

    /// The form is a fixed point: normalising it again changes nothing.
    #[test]
    fn normal_form_is_stable() {
        for (target, want) in CASES {
            if want.is_ok() {
                let once = normalize(target).expect("accepted").into_owned();
                assert_eq!(normalize(&once).as_deref(), Ok(once.as_str()), "{target:?}");
            }
        }
    }

    /// What servers that decode before resolving (and strip `;` parameters first, as Tomcat does)
    /// make of the original and of the form forwarded is the same path.
    #[test]
    fn apps_resolve_the_original_as_the_form_forwarded() {
        for (target, want) in CASES {
            if let Ok(normal) = want {
                for view in [reference::decoding_app, reference::parameter_stripping_app] {
                    assert_eq!(view(target), view(normal), "{target:?}");
                }
            }
        }
    }
}
