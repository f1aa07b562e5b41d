//! `amazing-proxy inject`: adds the sidecar to Kubernetes manifests.
//!
//! Reads YAML or JSON (a file or stdin), injects every pod template it finds and writes the result
//! to stdout in the input's format. The work is split so that the webhook can share it:
//! - [`annotations`]: the per-pod settings (flag defaults overridden by annotations);
//! - [`patch`]: the pure injection of one object (`serde_json::Value` in, patched value out);
//! - [`documents`]: multi-document YAML / JSON streams and `List` objects;
//! - [`yaml`]: the YAML writer (kubectl reads YAML 1.1; serde_yaml writes 1.2).
//!
//! The whole input is read and injected before anything is written, so that an error in the tenth
//! document leaves stdout empty rather than half a manifest that `kubectl apply` would take.

pub mod annotations;
pub mod documents;
pub mod patch;
pub mod yaml;

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::Args;

use annotations::{AccessLog, Settings};
pub use patch::{Options, Outcome, PatchError};

/// The defaults of the per-pod settings; each can be overridden by a pod template annotation.
/// Shared by `inject` and `webhook`.
#[derive(Args, Clone, Debug)]
pub struct InjectDefaults {
    /// The image of both injected containers (annotation `amazing-proxy.io/image`).
    #[arg(long, default_value = concat!("ghcr.io/amazing-proxy/amazing-proxy:", env!("CARGO_PKG_VERSION")), value_parser = annotations::parse_image)]
    pub image: String,
    /// Write the proxy as a regular container instead of a native sidecar (clusters before 1.29).
    #[arg(long)]
    pub legacy_sidecar: bool,
    /// Ports whose inbound traffic goes through the proxy; empty means all (`inbound-ports`).
    #[arg(long, default_value = "", value_parser = annotations::parse_ports)]
    pub inbound_ports: Ports,
    /// Inbound ports that bypass the proxy (`exclude-inbound-ports`).
    #[arg(long, default_value = "", value_parser = annotations::parse_ports)]
    pub exclude_inbound_ports: Ports,
    /// Outbound destination ports that bypass the proxy (`exclude-outbound-ports`).
    #[arg(long, default_value = "", value_parser = annotations::parse_ports)]
    pub exclude_outbound_ports: Ports,
    /// Outbound destination CIDRs that bypass the proxy (`exclude-outbound-cidrs`).
    #[arg(long, default_value = "", value_parser = annotations::parse_cidrs)]
    pub exclude_outbound_cidrs: Cidrs,
    /// No outbound redirection and no outbound listener (`disable-outbound`).
    #[arg(long)]
    pub disable_outbound: bool,
    /// Ports whose traffic is forwarded as opaque TCP, without protocol detection (`opaque-ports`).
    #[arg(long, default_value = "", value_parser = annotations::parse_ports)]
    pub opaque_ports: Ports,
    /// The proxy's access log (`access-log`).
    #[arg(long, value_enum, default_value = "json")]
    pub access_log: AccessLog,
    /// How long the proxy keeps serving after SIGTERM before draining (`drain-delay`).
    #[arg(long, default_value = "5s", value_parser = annotations::parse_duration)]
    pub drain_delay: String,
    /// CPU request of each injected container; empty for none (`proxy-cpu-request`).
    #[arg(long, default_value = "10m", value_parser = optional_quantity)]
    pub proxy_cpu_request: Quantity,
    /// Memory request of each injected container; empty for none (`proxy-memory-request`).
    #[arg(long, default_value = "16Mi", value_parser = optional_quantity)]
    pub proxy_memory_request: Quantity,
    /// CPU limit of each injected container; none unless set (`proxy-cpu-limit`).
    #[arg(long, default_value = "", value_parser = optional_quantity)]
    pub proxy_cpu_limit: Quantity,
    /// Memory limit of each injected container; none unless set (`proxy-memory-limit`).
    #[arg(long, default_value = "", value_parser = optional_quantity)]
    pub proxy_memory_limit: Quantity,
}

// clap treats fields spelt `Vec<T>` and `Option<T>` specially (many values, optional flag); these aliases
// keep each flag a single value parsed by the same function as its annotation.
pub type Ports = Vec<u16>;
pub type Cidrs = Vec<String>;
pub type Quantity = Option<String>;

fn optional_quantity(s: &str) -> Result<Quantity, String> {
    if s.is_empty() {
        Ok(None)
    } else {
        annotations::parse_quantity(s).map(Some)
    }
}

impl InjectDefaults {
    pub fn options(&self) -> Options {
        Options {
            defaults: Settings {
                image: self.image.clone(),
                inbound_ports: self.inbound_ports.clone(),
                exclude_inbound_ports: self.exclude_inbound_ports.clone(),
                exclude_outbound_ports: self.exclude_outbound_ports.clone(),
                exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
                disable_outbound: self.disable_outbound,
                opaque_ports: self.opaque_ports.clone(),
                app_port: None,
                access_log: self.access_log,
                drain_delay: self.drain_delay.clone(),
                cpu_request: self.proxy_cpu_request.clone(),
                memory_request: self.proxy_memory_request.clone(),
                cpu_limit: self.proxy_cpu_limit.clone(),
                memory_limit: self.proxy_memory_limit.clone(),
            },
            legacy_sidecar: self.legacy_sidecar,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct InjectArgs {
    /// The manifests to read (YAML or JSON); `-` or absent reads stdin. The result goes to stdout.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub filename: Option<PathBuf>,
    #[command(flatten)]
    pub defaults: InjectDefaults,
}

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

/// Injects a whole input text; returns the output text and the notes about skipped pods.
pub fn inject_text(
    input: &str,
    source: &str,
    options: &Options,
) -> Result<(String, Vec<documents::Note>), InjectError> {
    let (format, docs) = documents::parse(input, source)?;
    let (docs, notes) = documents::inject_all(&docs, options, source)?;
    Ok((documents::render(format, &docs)?, notes))
}

pub fn main(args: InjectArgs) -> Result<(), InjectError> {
    let (source, input) = match args.filename.as_deref() {
        None => ("stdin".to_string(), read_stdin()?),
        Some(p) if p.as_os_str() == "-" => ("stdin".to_string(), read_stdin()?),
        Some(p) => {
            let name = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|source| InjectError::Read {
                path: name.clone(),
                source,
            })?;
            (name, text)
        }
    };
    let (output, notes) = inject_text(&input, &source, &args.defaults.options())?;
    for note in notes {
        eprintln!(
            "amazing-proxy inject: {source}, {}: not injected: {}",
            note.document, note.reason
        );
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(InjectError::Write)
}

fn read_stdin() -> Result<String, InjectError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|source| InjectError::Read {
            path: "stdin".into(),
            source,
        })?;
    Ok(text)
}
