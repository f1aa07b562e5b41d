//! `amazing-proxy inject`: adds the sidecar to Kubernetes manifests.
//!
//! Reads YAML or JSON (a file or stdin), injects every pod template it finds and writes the result
//! to stdout in the input's format. The work is split so that the webhook can share it:
//! - [`annotations`]: the per-pod settings (flag defaults overridden by annotations);
//! - [`patch`]: the pure injection of one object (`serde_json::Value` in, patched value out);
//! - [`documents`]: multi-document YAML / JSON streams and `List` objects;
//!
//! The whole input is read and injected before anything is written, so that an error in the tenth
//! document leaves stdout empty rather than half a manifest that `kubectl apply` would take.

pub(crate) mod annotations;
pub(crate) mod documents;
pub(crate) mod identity;
pub mod patch;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::vocab::{AccessLogFormat, CidrList, PortList, parse_drain_duration};
use annotations::Settings;
pub(crate) use documents::InjectError;
use documents::Transform;
pub(crate) use patch::{Options, PatchError};

/// The defaults of the per-pod settings; each can be overridden by a pod template annotation.
/// Shared by `inject` and `webhook`.
#[derive(Args, Clone, Debug)]
pub struct InjectDefaults {
    /// The image of both injected containers (annotation `amazing-proxy.io/image`).
    #[arg(long, default_value = concat!("ghcr.io/amazing-proxy/amazing-proxy:", env!("CARGO_PKG_VERSION")), value_parser = annotations::parse_image)]
    pub(crate) image: String,
    /// Write the proxy as a regular container instead of a native sidecar (clusters before 1.29).
    #[arg(long)]
    pub(crate) legacy_sidecar: bool,
    /// Ports whose inbound traffic goes through the proxy; empty means all (`inbound-ports`).
    #[arg(long, default_value = "", value_parser = PortList::from_str)]
    pub(crate) inbound_ports: PortList,
    /// Inbound ports that bypass the proxy (`exclude-inbound-ports`).
    #[arg(long, default_value = "", value_parser = PortList::from_str)]
    pub(crate) exclude_inbound_ports: PortList,
    /// Outbound destination ports that bypass the proxy (`exclude-outbound-ports`).
    #[arg(long, default_value = "", value_parser = PortList::from_str)]
    pub(crate) exclude_outbound_ports: PortList,
    /// Outbound destination CIDRs that bypass the proxy (`exclude-outbound-cidrs`).
    #[arg(long, default_value = "", value_parser = CidrList::from_str)]
    pub(crate) exclude_outbound_cidrs: CidrList,
    /// No outbound redirection and no outbound listener (`disable-outbound`).
    #[arg(long)]
    pub(crate) disable_outbound: bool,
    /// Ports whose traffic is forwarded as opaque TCP, without protocol detection (`opaque-ports`).
    #[arg(long, default_value = "", value_parser = PortList::from_str)]
    pub(crate) opaque_ports: PortList,
    /// The proxy's access log (`access-log`).
    #[arg(long, value_enum, default_value = "json")]
    pub(crate) access_log: AccessLogFormat,
    /// How long the proxy keeps serving after SIGTERM before draining (`drain-delay`).
    #[arg(long, default_value = "5s", value_parser = parse_drain_duration, allow_hyphen_values = true)]
    pub(crate) drain_delay: Duration,
    /// CPU request of each injected container; empty for none (`proxy-cpu-request`).
    #[arg(long, default_value = "10m", value_parser = optional_quantity)]
    pub(crate) proxy_cpu_request: Quantity,
    /// Memory request of each injected container; empty for none (`proxy-memory-request`).
    #[arg(long, default_value = "16Mi", value_parser = optional_quantity)]
    pub(crate) proxy_memory_request: Quantity,
    /// CPU limit of each injected container; none unless set (`proxy-cpu-limit`).
    #[arg(long, default_value = "", value_parser = optional_quantity)]
    pub(crate) proxy_cpu_limit: Quantity,
    /// Memory limit of each injected container; none unless set (`proxy-memory-limit`).
    #[arg(long, default_value = "", value_parser = optional_quantity)]
    pub(crate) proxy_memory_limit: Quantity,
    /// Where the proxy's mTLS identity comes from (`identity`).
    #[arg(long, value_enum, default_value = "none")]
    pub(crate) identity: identity::IdentityKind,
    /// The signer of pod certificates, for `--identity pod-certificate` (`pod-certificate-signer`).
    #[arg(long, value_parser = identity::parse_signer_name)]
    pub(crate) pod_certificate_signer: Option<String>,
}

// clap treats fields spelt `Option<T>` specially (an optional flag); this alias keeps each flag a
// single value parsed by the same function as its annotation.
pub(crate) type Quantity = Option<String>;

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
                drain_delay: self.drain_delay,
                cpu_request: self.proxy_cpu_request.clone(),
                memory_request: self.proxy_memory_request.clone(),
                cpu_limit: self.proxy_cpu_limit.clone(),
                memory_limit: self.proxy_memory_limit.clone(),
                identity: self.identity,
                pod_certificate_signer: self.pod_certificate_signer.clone(),
                policy: None,
                routes: None,
                peer_identities: None,
            },
            legacy_sidecar: self.legacy_sidecar,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct InjectArgs {
    #[command(flatten)]
    pub(crate) input: Input,
    #[command(flatten)]
    pub(crate) defaults: InjectDefaults,
}
/// Injects a whole input text; returns the output text and the notes about skipped pods.
pub(crate) fn inject_text(
    input: &str,
    source: &str,
    options: &Options,
) -> Result<(String, Vec<documents::Note>), InjectError> {
    transform_text(input, source, &|doc| patch::inject_object(doc, options))
}

/// Removes what `inject` added from a whole input text; the notes name the pod templates that
/// were not injected.
pub(crate) fn uninject_text(
    input: &str,
    source: &str,
) -> Result<(String, Vec<documents::Note>), InjectError> {
    transform_text(input, source, &patch::uninject_object)
}

fn transform_text(
    input: &str,
    source: &str,
    transform: Transform<'_>,
) -> Result<(String, Vec<documents::Note>), InjectError> {
    let (format, docs) = documents::parse(input, source)?;
    let (docs, notes) = documents::transform_all(&docs, transform, source)?;
    Ok((documents::render(format, &docs)?, notes))
}

/// The manifests to read, for `inject` and `uninject`.
#[derive(Args, Clone, Debug)]
pub(crate) struct Input {
    /// The manifests to read (YAML or JSON); `-` or absent reads stdin. The result goes to stdout.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub(crate) filename: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct UninjectArgs {
    #[command(flatten)]
    pub(crate) input: Input,
}

pub fn main(args: InjectArgs) -> Result<(), InjectError> {
    let (source, input) = read_input(&args.input)?;
    let (output, notes) = inject_text(&input, &source, &args.defaults.options())?;
    for note in notes {
        eprintln!(
            "amazing-proxy inject: {source}, {}: not injected: {}",
            note.document, note.reason
        );
    }
    write_stdout(&output)
}

/// `amazing-proxy uninject`: the manifests without what `inject` added.
pub fn uninject_main(args: UninjectArgs) -> Result<(), InjectError> {
    let (source, input) = read_input(&args.input)?;
    let (output, notes) = uninject_text(&input, &source)?;
    for note in notes {
        eprintln!(
            "amazing-proxy uninject: {source}, {}: left as it was: {}",
            note.document, note.reason
        );
    }
    write_stdout(&output)
}

/// The input's name for messages, and its text.
fn read_input(input: &Input) -> Result<(String, String), InjectError> {
    match input.filename.as_deref() {
        None => Ok(("stdin".to_string(), read_stdin()?)),
        Some(p) if p.as_os_str() == "-" => Ok(("stdin".to_string(), read_stdin()?)),
        Some(p) => {
            let name = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|source| InjectError::Read {
                path: name.clone(),
                source,
            })?;
            Ok((name, text))
        }
    }
}

fn write_stdout(output: &str) -> Result<(), InjectError> {
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
