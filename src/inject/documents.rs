//! Manifests in and out: a stream of YAML documents or JSON values, `List` objects included.
//!
//! The format is detected from the first non-blank character (`{` or `[` means JSON) and the output
//! uses the same one. Documents keep their order and, because `serde_json` is built with
//! `preserve_order`, their keys keep theirs. What does not survive the trip through a JSON tree:
//! YAML comments, anchors (they are expanded), quoting style and empty documents.
//!
//! YAML goes through serde-saphyr both ways. kubectl reads manifests as YAML 1.1, so both sides
//! follow YAML 1.1 where it differs from 1.2: the writer quotes every string that a 1.1 reader
//! would take for something else (`"off"`, `"yes"`, `"80"`, `"1:20"`), and the reader takes an
//! unquoted `yes`, `no`, `on` or `off` for a boolean and `010` for octal 8, as kubectl would.

use serde_json::Value;

use super::patch::{Outcome, PatchError, type_meta};

/// What `inject` and `uninject` report: the input that could not be read, parsed or patched, or
/// the output that could not be written; nothing is written then.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{source_name}, document {document}: {message}; fix the syntax (nothing was written)")]
    Parse {
        source_name: String,
        document: usize,
        message: String,
    },
    #[error("{source_name}, {document}: {error} (nothing was written)")]
    Document {
        source_name: String,
        document: String,
        error: PatchError,
    },
    #[error("document {document}: cannot write it back: {message}")]
    Render { document: usize, message: String },
    #[error("cannot write the result to stdout: {0}")]
    Write(std::io::Error),
}

/// The format of the input, and so of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Yaml,
    Json,
}

/// Parses a stream of documents; `source` names the input in errors.
pub(crate) fn parse(input: &str, source: &str) -> Result<(Format, Vec<Value>), InjectError> {
    let trimmed = input.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut docs = Vec::new();
        for (i, doc) in serde_json::Deserializer::from_str(input)
            .into_iter::<Value>()
            .enumerate()
        {
            let doc = doc.map_err(|e| InjectError::Parse {
                source_name: source.into(),
                document: i + 1,
                message: format!("invalid JSON: {e}"),
            })?;
            docs.push(doc);
        }
        return Ok((Format::Json, docs));
    }
    let mut options = serde_saphyr::Options::default();
    // YAML 1.1, as kubectl reads it: `010` is 8, not 10.
    options.legacy_octal_numbers = true;
    let mut reader = input.as_bytes();
    let mut docs = Vec::new();
    // Empty documents (`---` with nothing after it) are skipped, as kubectl skips them.
    for (i, doc) in serde_saphyr::read_with_options::<_, Value>(&mut reader, options).enumerate() {
        docs.push(doc.map_err(|e| InjectError::Parse {
            source_name: source.into(),
            document: i + 1,
            message: format!("invalid YAML: {e}"),
        })?);
    }
    Ok((Format::Yaml, docs))
}

/// Writes documents back in `format`.
pub(crate) fn render(format: Format, docs: &[Value]) -> Result<String, InjectError> {
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        match format {
            Format::Json => {
                let text = serde_json::to_string_pretty(doc).map_err(|e| render_error(i, e))?;
                out.push_str(&text);
                out.push('\n');
            }
            Format::Yaml => {
                if i > 0 {
                    out.push_str("---\n");
                }
                out.push_str(&serde_saphyr::to_string(doc).map_err(|e| render_error(i, e))?);
            }
        }
    }
    Ok(out)
}

fn render_error(index: usize, error: impl ToString) -> InjectError {
    InjectError::Render {
        document: index + 1,
        message: error.to_string(),
    }
}

/// One line about a pod template that was left alone, for the user to see on stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Note {
    pub(crate) document: String,
    pub(crate) reason: String,
}

/// One object in, the patched object and what happened out: injection or uninjection.
pub(crate) type Transform<'a> = &'a dyn Fn(&Value) -> Result<(Value, Outcome), PatchError>;

/// Applies `transform` to every document; a `List` (any kind ending in `List` with `items`) has
/// each item transformed.
pub(crate) fn transform_all(
    docs: &[Value],
    transform: Transform<'_>,
    source: &str,
) -> Result<(Vec<Value>, Vec<Note>), InjectError> {
    let mut out = Vec::with_capacity(docs.len());
    let mut notes = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let label = format!("document {} {}", i + 1, describe(doc));
        out.push(transform_one(doc, transform, source, &label, &mut notes)?);
    }
    Ok((out, notes))
}

fn transform_one(
    doc: &Value,
    transform: Transform<'_>,
    source: &str,
    label: &str,
    notes: &mut Vec<Note>,
) -> Result<Value, InjectError> {
    let fail = |error: PatchError| InjectError::Document {
        source_name: source.into(),
        document: label.into(),
        error,
    };
    let (_, kind) = type_meta(doc).map_err(fail)?;
    if kind.ends_with("List")
        && let Some(Value::Array(items)) = doc.get("items")
    {
        let mut injected = Vec::with_capacity(items.len());
        for (j, item) in items.iter().enumerate() {
            let item_label = format!("{label}, items[{j}] {}", describe(item));
            injected.push(transform_one(item, transform, source, &item_label, notes)?);
        }
        let mut list = doc.clone();
        list["items"] = Value::Array(injected);
        return Ok(list);
    }
    let (patched, outcome) = transform(doc).map_err(fail)?;
    if let Outcome::Skipped(reason) = outcome {
        notes.push(Note {
            document: label.into(),
            reason,
        });
    }
    Ok(patched)
}

/// `(Deployment "web")`, or as much of it as the document has.
fn describe(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str);
    let metadata = doc.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(|n| format!(" \"{n}\""))
        .or_else(|| {
            metadata
                .and_then(|m| m.get("generateName"))
                .and_then(Value::as_str)
                .map(|n| format!(" \"{n}*\""))
        })
        .unwrap_or_default();
    match kind {
        Some(kind) => format!("({kind}{name})"),
        None => "(no kind)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_round_trip_keeps_order_and_quotes_ambiguous_strings() {
        let input = "b: 1\na:\n  z: 'off'\n  y: 'yes'\n  x: '80'\n  w: 'true'\n  v: '0.1.0'\n---\n---\nc: [1, 2]\n";
        let (format, docs) = parse(input, "stdin").expect("parses");
        assert_eq!(format, Format::Yaml);
        assert_eq!(docs.len(), 2);
        let out = render(format, &docs).expect("renders");
        let (_, again) = parse(&out, "stdin").expect("parses again");
        assert_eq!(docs, again);
        assert!(out.starts_with("b: 1\na:\n"), "{out}");
        for word in ["\"off\"", "\"yes\"", "\"80\"", "\"true\""] {
            assert!(out.contains(word), "{word} unquoted in {out}");
        }
    }

    fn round_trip(v: &Value) -> String {
        let text = render(Format::Yaml, std::slice::from_ref(v)).expect("renders");
        let (_, back) = parse(&text, "stdin").expect("reads back");
        assert_eq!(back, std::slice::from_ref(v), "{text}");
        text
    }

    #[test]
    fn strings_a_yaml_1_1_reader_would_retype_are_quoted() {
        let v = serde_json::json!({"a": ["off", "yes", "On", "N", "y", "80", "0.1.0", "1e3", "1:20", "2024-01-01", "0x1F",
            "010", "", " x", "a: b", "#c", "-", "~", "*x", "&x", "!x", "%x", "@x", "`x", "a #b", ".inf", "=", "<<",
            "x:", "-1", ".5", "---", "- x", ".dockerconfigjson", "-x", "null", "NULL",
            // Longer than a folded line, with runs of spaces and a trailing one.
            "{\"a\": \"x  y\",   \"b\": [1, 2, 3], \"c\": \"a long value that goes on and on past eighty columns\"} "]});
        let text = round_trip(&v);
        for plain in [
            "off", "yes", "On", "y", "80", "0.1.0", "1e3", "1:20", "010", "null",
        ] {
            assert!(
                !text.contains(&format!("- {plain}\n")),
                "{plain} unquoted:\n{text}"
            );
        }
    }

    #[test]
    fn kubectl_layout_and_literal_blocks() {
        let v = serde_json::json!({"metadata": {"name": "web", "annotations": {"amazing-proxy.io/app-port": "8080"}},
            "spec": {"containers": [{"name": "app", "args": ["run", "--x=1"], "ports": [], "resources": {}}],
                     "f": 0.5, "b": true, "z": null, "m": "10m", "i": "ghcr.io/a/b:0.1.0"},
            "data": {"a": "x\ny\n", "b": "x\n\ny", "c": "x\n\n\n", "d": "  lead\n", "e": "tab\there\n", "f": "cr\r\n"}});
        let text = round_trip(&v);
        let expected_head = "metadata:\n  name: web\n  annotations:\n    amazing-proxy.io/app-port: \"8080\"\nspec:\n  containers:\n  - name: app\n    args:\n    - run\n    - --x=1\n    ports: []\n    resources: {}\n";
        assert!(text.starts_with(expected_head), "{text}");
        assert!(text.contains("  a: |\n    x\n    y\n"), "{text}");
        assert!(text.contains("  b: |-\n    x\n\n    y\n"), "{text}");
    }

    #[test]
    fn unquoted_yaml_1_1_scalars_read_as_kubectl_reads_them() {
        let (_, docs) = parse("a: yes\nb: off\nc: 010\nd: '010'\n", "stdin").expect("parses");
        assert_eq!(
            docs,
            [serde_json::json!({"a": true, "b": false, "c": 8, "d": "010"})]
        );
    }

    #[test]
    fn json_stream() {
        let (format, docs) = parse(" {\"a\": 1}\n{\"b\": 2}", "f.json").expect("parses");
        assert_eq!(format, Format::Json);
        assert_eq!(docs.len(), 2);
        let err = parse("{\"a\": ", "f.json").expect_err("truncated");
        assert!(
            err.to_string().contains("f.json, document 1: invalid JSON"),
            "{err}"
        );
    }
}
