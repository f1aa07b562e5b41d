//! A small YAML writer for JSON trees, in kubectl's block style.
//!
//! Why not `serde_yaml::to_string`: serde_yaml 0.9 follows YAML 1.2 and writes `off`, `yes`, `on` and
//! `no` unquoted, but kubectl reads manifests as YAML 1.1, where those are booleans. Our own output
//! contains such strings (`AMAZING_PROXY_ACCESS_LOG: off`, `amazing-proxy.io/access-log: off`), and
//! an annotation or env value read as a boolean makes kubectl reject the object. This writer quotes
//! any string that YAML 1.1 or 1.2 could read as something else; it quotes more than strictly needed
//! (anything numeric-looking, anything with unusual punctuation), which costs only looks.
//! Multi-line strings are written as literal blocks (`|`) when that is exact, so that scripts and
//! config files in ConfigMaps stay readable.

use serde_json::{Map, Value};

/// One document, ending with a newline.
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(m) if !m.is_empty() => write_map(&mut out, m, 0),
        Value::Array(a) if !a.is_empty() => write_seq(&mut out, a, 0),
        scalar => {
            write_scalar(&mut out, scalar, 2);
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// The cursor is where the first key goes (column `indent`, or just after `- `).
fn write_map(out: &mut String, map: &Map<String, Value>, indent: usize) {
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            pad(out, indent);
        }
        if plain_ok(key) {
            out.push_str(key);
        } else {
            quoted(out, key);
        }
        out.push(':');
        match value {
            Value::Object(m) if !m.is_empty() => {
                out.push('\n');
                pad(out, indent + 2);
                write_map(out, m, indent + 2);
            }
            // kubectl's style: a sequence under a key is not indented further.
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                pad(out, indent);
                write_seq(out, a, indent);
            }
            scalar => {
                out.push(' ');
                write_scalar(out, scalar, indent + 2);
                out.push('\n');
            }
        }
    }
}

fn write_seq(out: &mut String, items: &[Value], indent: usize) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            pad(out, indent);
        }
        out.push_str("- ");
        match item {
            Value::Object(m) if !m.is_empty() => write_map(out, m, indent + 2),
            Value::Array(a) if !a.is_empty() => write_seq(out, a, indent + 2),
            scalar => {
                write_scalar(out, scalar, indent + 2);
                out.push('\n');
            }
        }
    }
}

/// A scalar or an empty collection; a literal block's lines are indented by `block_indent`.
fn write_scalar(out: &mut String, value: &Value, block_indent: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) if plain_ok(s) => out.push_str(s),
        Value::String(s) if literal_ok(s) => literal(out, s, block_indent),
        Value::String(s) => quoted(out, s),
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
    }
}

/// A double-quoted scalar: JSON's string escapes are all valid YAML escapes.
fn quoted(out: &mut String, s: &str) {
    out.push_str(&Value::String(s.to_string()).to_string());
}

/// Whether `s` can be written unquoted and be read back as the same string by YAML 1.1 and 1.2.
fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let first_ok = first.is_ascii_alphanumeric()
        || "/_.".contains(first)
        || (first == '-' && s.len() > 1 && !s.starts_with("- "));
    if !first_ok || s.ends_with([' ', ':']) || s.starts_with("---") || s.starts_with("...") {
        return false;
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_./-: =@+,()".contains(c))
        || s.contains(": ")
    {
        return false;
    }
    const SPECIAL: &[&str] = &[
        "y", "n", "yes", "no", "true", "false", "on", "off", "null", ".inf", "-.inf", "+.inf",
        ".nan",
    ];
    if SPECIAL.contains(&s.to_ascii_lowercase().as_str()) {
        return false;
    }
    // Numbers, hex, octal, sexagesimal (`1:20`), dates: anything made of these that starts with a digit
    // (after a sign or a dot).
    let numeric_like = s
        .trim_start_matches(['-', '+', '.'])
        .starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() || "xXoO._:+-".contains(c));
    !numeric_like
}

fn literal_ok(s: &str) -> bool {
    let body = s.trim_end_matches('\n');
    s.contains('\n')
        && !body.is_empty()
        && !body.starts_with([' ', '\t'])
        && !body.contains('\r')
        && s.chars().all(|c| c == '\n' || c == '\t' || !c.is_control())
        // A line with only spaces would be read back as an empty line.
        && body.split('\n').all(|line| line.is_empty() || !line.trim_start_matches(' ').is_empty())
        // A leading BOM or similar would be taken for something else.
        && !body.starts_with('\u{feff}')
}

fn literal(out: &mut String, s: &str, indent: usize) {
    let body = s.trim_end_matches('\n');
    let trailing = s.len() - body.len();
    out.push_str(match trailing {
        0 => "|-",
        1 => "|",
        _ => "|+",
    });
    for line in body.split('\n') {
        out.push('\n');
        if !line.is_empty() {
            pad(out, indent);
            out.push_str(line);
        }
    }
    for _ in 1..trailing {
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    fn round_trip(v: &Value) -> String {
        let text = to_string(v);
        let back =
            Value::deserialize(serde_yaml::Deserializer::from_str(&text)).expect("reads back");
        assert_eq!(&back, v, "{text}");
        text
    }

    #[test]
    fn ambiguous_strings_are_quoted() {
        let v = json!({"a": ["off", "yes", "On", "N", "80", "0.1.0", "1e3", "1:20", "2024-01-01", "0x1F", "", " x", "a: b",
            "#c", "-", "~", "*x", "&x", "!x", "%x", "@x", "`x", "a #b", ".inf", "=", "<<", "x:", "-1", ".5", "---", "- x", ".dockerconfigjson", "-x"]});
        let text = round_trip(&v);
        for plain in ["off", "yes", "80", "0.1.0", "1e3", "1:20"] {
            assert!(
                !text.contains(&format!("- {plain}\n")),
                "{plain} unquoted:\n{text}"
            );
        }
    }

    #[test]
    fn plain_where_safe_and_kubectl_layout() {
        let v = json!({"metadata": {"name": "web", "annotations": {"amazing-proxy.io/app-port": "8080"}},
            "spec": {"containers": [{"name": "app", "args": ["run", "--x=1"], "ports": [], "resources": {}}],
                     "n": 1, "f": 0.5, "b": true, "z": null, "m": "10m", "i": "ghcr.io/a/b:0.1.0", "addr": "127.0.0.1:80"}});
        let text = round_trip(&v);
        let expected = "metadata:\n  name: web\n  annotations:\n    amazing-proxy.io/app-port: \"8080\"\nspec:\n  containers:\n  - name: app\n    args:\n    - run\n    - --x=1\n    ports: []\n    resources: {}\n  \"n\": 1\n  f: 0.5\n  b: true\n  z: null\n  m: 10m\n  i: ghcr.io/a/b:0.1.0\n  addr: \"127.0.0.1:80\"\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn multi_line_strings() {
        let v = json!({"data": {"a": "x\ny\n", "b": "x\n\ny", "c": "x\n\n\n", "d": "  lead\n", "e": "tab\there\n", "f": "cr\r\n"},
                       "l": [["x", {"k": "v\n"}]]});
        let text = round_trip(&v);
        assert!(text.contains("  a: |\n    x\n    y\n"), "{text}");
        assert!(text.contains("  b: |-\n    x\n\n    y\n"), "{text}");
    }
}
