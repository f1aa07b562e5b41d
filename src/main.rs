//! The command line: parse, then hand over to the module that owns the job.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use amazing_proxy::{config, identity, inject, install, netfilter, run, view, webhook};
use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc: the data plane allocates and frees small objects per request and per stream (header
/// maps, futures, h2 frames); glibc's malloc spent a tenth of the proxy's core on them under HTTP/2
/// (perf), mimalloc's free lists are thread-local. Measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--version`: the package version, the commit and the build date (stamped by build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BUILD_GIT_COMMIT"),
    ", built ",
    env!("BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "amazing-proxy",
    version = VERSION,
    about = "A small, fast sidecar proxy for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy (the data plane).
    Run(Box<config::RunArgs>),
    /// Install the pod's traffic redirection rules (run once, in an init container).
    Init(netfilter::InitArgs),
    /// Add the sidecar to Kubernetes manifests (YAML or JSON, stdin or -f).
    Inject(inject::InjectArgs),
    /// Remove what `inject` added from Kubernetes manifests (YAML or JSON, stdin or -f).
    Uninject(inject::UninjectArgs),
    /// Serve the sidecar injection as a Kubernetes mutating admission webhook.
    Webhook(webhook::WebhookArgs),
    /// Print the manifests that install the injection webhook on a cluster.
    Install(install::InstallArgs),
    /// Make a development CA and workload identities (the --identity-dir layout).
    #[command(subcommand)]
    Identity(identity::issue::IdentityCommand),
    /// Print a running proxy's exchanges as they happen (from its admin listener, in the pod).
    Tap(view::tap::TapArgs),
    /// A live view of a running proxy's traffic by route or peer (in the pod's terminal).
    Top(view::top::TopArgs),
}

fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|err| {
        let argv: Vec<String> = std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        config::name_env_source(err, &Cli::command(), &argv, |v| {
            std::env::var_os(v).is_some()
        })
        .exit()
    });
    amazing_proxy::telemetry::init_diagnostics();
    let result: anyhow::Result<()> = match cli.command {
        Command::Run(args) => run::main(*args).map_err(Into::into),
        Command::Init(args) => netfilter::main(args).map_err(Into::into),
        Command::Inject(args) => inject::main(args).map_err(Into::into),
        Command::Uninject(args) => inject::uninject_main(args).map_err(Into::into),
        Command::Webhook(args) => webhook::main(args).map_err(Into::into),
        Command::Install(args) => install::main(args).map_err(Into::into),
        Command::Identity(command) => identity::issue::main(command).map_err(Into::into),
        Command::Tap(args) => view::tap::main(args).map_err(Into::into),
        Command::Top(args) => view::top::main(args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("amazing-proxy: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
