//! The I/O half: finding the tools, looking at the namespace, choosing the backend, running
//! `iptables-restore` / `nft`, rolling back. Decisions that need no I/O (`choose`, the scripts)
//! are pure functions of what was observed, and unit-tested as such.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use clap::ValueEnum;

use super::iptables::{self, Family, NatState};
use super::nft;
use super::rules::{Policy, PolicyOptions};

/// `--backend`: where the rules go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// Detect from the rules already present in the namespace.
    Auto,
    /// iptables-restore / ip6tables-restore (legacy or nf_tables variant, detected).
    Iptables,
    /// Native nftables: one `table inet amazing_proxy`.
    Nft,
}

/// `--ipv6`: whether IPv6 rules are installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ipv6Mode {
    /// On when the kernel has IPv6 and ip6tables works in the namespace.
    Auto,
    On,
    Off,
}

/// Every failure says what went wrong and what to do; none leaves a half-applied ruleset.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid options: {0}")]
    Invalid(String),

    #[error("{tool} not found in PATH: {hint}")]
    ToolMissing { tool: String, hint: String },

    #[error(
        "permission denied running {tool}: the init container needs the NET_ADMIN and NET_RAW capabilities and to run as root ({detail})"
    )]
    PermissionDenied { tool: String, detail: String },

    #[error("{tool} rejected the {what} rules, so none of them were applied: {detail}")]
    Rejected {
        tool: String,
        what: String,
        detail: String,
    },

    #[error("{tool} could not read the current rules: {detail}")]
    Read { tool: String, detail: String },

    #[error("could not run {tool}: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },

    #[error(
        "{first}; the IPv4 rules applied just before were rolled back, nothing changed (if this kernel has no IPv6 NAT, use --ipv6 off)"
    )]
    RolledBack { first: Box<InitError> },

    #[error(
        "{first}; rolling the IPv4 rules back failed too ({rollback}): run `amazing-proxy init --clean` and retry"
    )]
    RollbackFailed {
        first: Box<InitError>,
        rollback: Box<InitError>,
    },
}

/// Where the rules go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    /// iptables with the legacy x_tables kernel backend.
    IptablesLegacy,
    /// iptables over nf_tables (the `iptables-nft` variant).
    IptablesNft,
    /// Native nftables, `table inet amazing_proxy`.
    Nft,
}

impl Backend {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Backend::IptablesLegacy => "iptables (legacy)",
            Backend::IptablesNft => "iptables (nf_tables)",
            Backend::Nft => "nft",
        }
    }
}

/// What one iptables variant shows in the namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Rules in all its tables, IPv4 and IPv6.
    pub(crate) rules: usize,
    /// Whether our chains are there (a previous run).
    pub(crate) ours: bool,
}

/// What native nftables shows: tables not made by iptables-nft, and ours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NativeSeen {
    pub(crate) foreign_tables: Vec<String>,
    pub(crate) ours: bool,
}

/// The namespace as seen by each backend whose tools exist (`None`: tools not installed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Observation {
    pub(crate) legacy: Option<Seen>,
    pub(crate) nft_compat: Option<Seen>,
    pub(crate) native: Option<NativeSeen>,
}

impl Observation {
    /// Backends holding rules of ours, most specific first.
    pub(crate) fn ours(&self) -> Vec<Backend> {
        let mut out = Vec::new();
        if self.native.as_ref().is_some_and(|n| n.ours) {
            out.push(Backend::Nft);
        }
        if self.nft_compat.as_ref().is_some_and(|s| s.ours) {
            out.push(Backend::IptablesNft);
        }
        if self.legacy.as_ref().is_some_and(|s| s.ours) {
            out.push(Backend::IptablesLegacy);
        }
        out
    }
}

fn iptables_missing() -> InitError {
    InitError::ToolMissing {
        tool: "iptables-restore".into(),
        hint: "install iptables in the init image or use --backend nft".into(),
    }
}

/// The detection heuristic (documented in the module docs of `netfilter`):
/// 1. wherever our own rules already are (re-runs and upgrades stay put);
/// 2. iptables-legacy if it holds more rules than iptables-nft (ties go to nf_tables);
/// 3. iptables-nft if it holds any rule;
/// 4. native nft if the namespace has native nftables tables;
/// 5. nothing anywhere: iptables-nft, else nft, else iptables-legacy, by what is installed.
pub(crate) fn choose(choice: BackendChoice, obs: &Observation) -> Result<Backend, InitError> {
    let legacy_rules = obs.legacy.as_ref().map_or(0, |s| s.rules);
    let compat_rules = obs.nft_compat.as_ref().map_or(0, |s| s.rules);
    let legacy_wins = obs.legacy.is_some() && legacy_rules > compat_rules;
    match choice {
        BackendChoice::Nft => match obs.native {
            Some(_) => Ok(Backend::Nft),
            None => Err(InitError::ToolMissing {
                tool: "nft".into(),
                hint: "install nftables in the init image or use --backend iptables".into(),
            }),
        },
        BackendChoice::Iptables => {
            let ours: Vec<Backend> = obs
                .ours()
                .into_iter()
                .filter(|b| *b != Backend::Nft)
                .collect();
            if let Some(b) = ours.first() {
                Ok(*b)
            } else if legacy_wins {
                Ok(Backend::IptablesLegacy)
            } else if obs.nft_compat.is_some() {
                Ok(Backend::IptablesNft)
            } else if obs.legacy.is_some() {
                Ok(Backend::IptablesLegacy)
            } else {
                Err(iptables_missing())
            }
        }
        BackendChoice::Auto => {
            if let Some(b) = obs.ours().first() {
                Ok(*b)
            } else if legacy_wins {
                Ok(Backend::IptablesLegacy)
            } else if obs.nft_compat.is_some() && compat_rules > 0 {
                Ok(Backend::IptablesNft)
            } else if obs
                .native
                .as_ref()
                .is_some_and(|n| !n.foreign_tables.is_empty())
            {
                Ok(Backend::Nft)
            } else if obs.nft_compat.is_some() {
                Ok(Backend::IptablesNft)
            } else if obs.native.is_some() {
                Ok(Backend::Nft)
            } else if obs.legacy.is_some() {
                Ok(Backend::IptablesLegacy)
            } else {
                Err(InitError::ToolMissing {
                    tool: "iptables-restore or nft".into(),
                    hint: "install iptables or nftables in the init image".into(),
                })
            }
        }
    }
}

/// Tables iptables-nft creates; any other nftables table was written natively.
fn is_compat_table(family: &str, name: &str) -> bool {
    matches!(family, "ip" | "ip6")
        && matches!(name, "filter" | "nat" | "mangle" | "raw" | "security")
        || matches!(
            (family, name),
            ("arp", "filter") | ("bridge", "filter" | "nat" | "broute")
        )
}

/// Reads `nft list tables` output.
pub(crate) fn parse_nft_tables(list: &str) -> NativeSeen {
    let mut seen = NativeSeen::default();
    for line in list.lines() {
        let mut words = line.split_whitespace();
        if let (Some("table"), Some(family), Some(name)) =
            (words.next(), words.next(), words.next())
        {
            if format!("{family} {name}") == nft::TABLE {
                seen.ours = true;
            } else if !is_compat_table(family, name) {
                seen.foreign_tables.push(format!("{family} {name}"));
            }
        }
    }
    seen
}

// ---- tools ----

fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The binaries of one iptables variant.
#[derive(Clone, Debug)]
pub(crate) struct IptTools {
    pub(crate) restore4: PathBuf,
    pub(crate) save4: PathBuf,
    pub(crate) restore6: Option<PathBuf>,
    pub(crate) save6: Option<PathBuf>,
}

impl IptTools {
    fn restore(&self, family: Family) -> Option<&Path> {
        match family {
            Family::V4 => Some(&self.restore4),
            Family::V6 => self.restore6.as_deref(),
        }
    }
    fn save(&self, family: Family) -> Option<&Path> {
        match family {
            Family::V4 => Some(&self.save4),
            Family::V6 => self.save6.as_deref(),
        }
    }
}

/// Finds `iptables-<variant>-restore` and friends, or the unsuffixed names when their
/// `--version` says they are that variant (images shipping only `iptables-restore`).
fn find_variant(nft_variant: bool) -> Option<IptTools> {
    let suffix = if nft_variant { "nft" } else { "legacy" };
    let find = |tool: &str, ext: &str| find_in_path(&format!("{tool}-{suffix}-{ext}"));
    if let (Some(restore4), Some(save4)) = (find("iptables", "restore"), find("iptables", "save")) {
        return Some(IptTools {
            restore4,
            save4,
            restore6: find("ip6tables", "restore"),
            save6: find("ip6tables", "save"),
        });
    }
    let restore4 = find_in_path("iptables-restore")?;
    let save4 = find_in_path("iptables-save")?;
    let version = Command::new(&restore4)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let is_nft = String::from_utf8_lossy(&version.stdout).contains("nf_tables");
    (is_nft == nft_variant).then(|| IptTools {
        restore4,
        save4,
        restore6: find_in_path("ip6tables-restore"),
        save6: find_in_path("ip6tables-save"),
    })
}

fn tool_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn run(tool: &Path, args: &[&str], stdin: Option<&str>) -> Result<Output, InitError> {
    let name = tool_name(tool);
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| InitError::Spawn {
            tool: name.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that dies early closes its stdin; its exit status tells the real story.
        let _ = pipe.write_all(input.as_bytes());
    }
    child
        .wait_with_output()
        .map_err(|source| InitError::Spawn { tool: name, source })
}

fn stderr_of(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let text = text.trim();
    if text.is_empty() {
        format!("exit status {}", out.status)
    } else {
        text.replace('\n', "; ")
    }
}

fn is_permission_error(detail: &str) -> bool {
    [
        "Permission denied",
        "Operation not permitted",
        "you must be root",
    ]
    .iter()
    .any(|m| detail.contains(m))
}

/// Runs a tool that reads the current rules.
fn read(tool: &Path, args: &[&str]) -> Result<String, InitError> {
    let out = run(tool, args, None)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let detail = stderr_of(&out);
    Err(if is_permission_error(&detail) {
        InitError::PermissionDenied {
            tool: tool_name(tool),
            detail,
        }
    } else {
        InitError::Read {
            tool: tool_name(tool),
            detail,
        }
    })
}

/// Runs a tool that changes the rules, feeding it `script`.
fn write(tool: &Path, args: &[&str], script: &str, what: &str) -> Result<(), InitError> {
    let out = run(tool, args, Some(script))?;
    if out.status.success() {
        return Ok(());
    }
    let detail = stderr_of(&out);
    Err(if is_permission_error(&detail) {
        InitError::PermissionDenied {
            tool: tool_name(tool),
            detail,
        }
    } else {
        InitError::Rejected {
            tool: tool_name(tool),
            what: what.to_string(),
            detail,
        }
    })
}

const RESTORE_ARGS: [&str; 3] = ["--noflush", "-w", "10"];

// ---- observation ----

struct Env {
    legacy: Option<IptTools>,
    compat: Option<IptTools>,
    nft: Option<PathBuf>,
}

impl Env {
    fn discover() -> Env {
        Env {
            legacy: find_variant(false),
            compat: find_variant(true),
            nft: find_in_path("nft"),
        }
    }

    fn tools(&self, backend: Backend) -> Option<&IptTools> {
        match backend {
            Backend::IptablesLegacy => self.legacy.as_ref(),
            Backend::IptablesNft => self.compat.as_ref(),
            Backend::Nft => None,
        }
    }
}

/// Reads both families of one variant. Reading failures other than permission count as empty:
/// a kernel without ip6tables or without legacy x_tables simply has no rules there.
fn see_variant(tools: &IptTools) -> Result<Seen, InitError> {
    let mut seen = Seen::default();
    for family in [Family::V4, Family::V6] {
        let Some(save) = tools.save(family) else {
            continue;
        };
        match read(save, &[]) {
            Ok(text) => {
                seen.rules += iptables::count_rules(&text);
                seen.ours |= !iptables::parse_nat(&text).is_empty();
            }
            Err(e @ InitError::PermissionDenied { .. }) => return Err(e),
            Err(e) => tracing::debug!("ignoring: {e}"),
        }
    }
    Ok(seen)
}

fn observe(env: &Env, choice: BackendChoice) -> Result<Observation, InitError> {
    let mut obs = Observation::default();
    if choice != BackendChoice::Nft {
        if let Some(t) = &env.legacy {
            obs.legacy = Some(see_variant(t)?);
        }
        if let Some(t) = &env.compat {
            obs.nft_compat = Some(see_variant(t)?);
        }
    }
    if choice != BackendChoice::Iptables
        && let Some(nft) = &env.nft
    {
        obs.native = Some(match read(nft, &["list", "tables"]) {
            Ok(text) => parse_nft_tables(&text),
            Err(e @ InitError::PermissionDenied { .. }) => return Err(e),
            Err(e) => {
                tracing::debug!("ignoring: {e}");
                NativeSeen::default()
            }
        });
    }
    if obs.legacy.is_none() {
        // Without legacy tools we cannot count legacy rules, but the kernel lists the legacy
        // tables that exist in this namespace: say so rather than silently pick another backend.
        let names = std::fs::read_to_string("/proc/net/ip_tables_names").unwrap_or_default();
        if !names.trim().is_empty() {
            tracing::warn!(
                "legacy iptables tables exist in this namespace ({}) but no iptables-legacy tools are installed to inspect them",
                names.split_whitespace().collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(obs)
}

fn kernel_has_ipv6() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// The interfaces other than `lo` holding an IPv6 address, from `/proc/net/if_inet6` (each line:
/// address, index, prefix length, scope, flags, name).
pub(crate) fn ipv6_interfaces(if_inet6: &str) -> Vec<String> {
    let mut names: Vec<String> = if_inet6
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|name| *name != "lo")
        .map(String::from)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Says so when the rules leave IPv6 alone in a namespace where the app could use it.
fn warn_if_ipv6_uncovered(ipv6: bool) {
    if ipv6 {
        return;
    }
    let names = ipv6_interfaces(&std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default());
    if !names.is_empty() {
        tracing::warn!(
            "no IPv6 rules (--ipv6 off, or no working ip6tables) but {} has IPv6 addresses: the app's IPv6 connections bypass the proxy and its policy",
            names.join(", ")
        );
    }
}

// ---- the job ----

/// Everything `init` needs, parsed and not yet validated against the namespace.
pub(crate) struct Settings {
    pub(crate) backend: BackendChoice,
    pub(crate) ipv6: Ipv6Mode,
    pub(crate) dry_run: bool,
    pub(crate) clean: bool,
    pub(crate) options: PolicyOptions,
}

pub(crate) fn run_init(s: &Settings) -> Result<(), InitError> {
    // Validate before touching anything, whatever the namespace says about IPv6.
    Policy::new(&s.options, false).map_err(InitError::Invalid)?;
    let env = Env::discover();
    let obs = match observe(&env, s.backend) {
        Ok(obs) => obs,
        // Printing the script needs no privilege: assume an empty namespace and say so.
        Err(e) if s.dry_run => {
            tracing::warn!("{e}; --dry-run assumes no rules are present");
            Observation {
                legacy: env.legacy.as_ref().map(|_| Seen::default()),
                nft_compat: env.compat.as_ref().map(|_| Seen::default()),
                native: env.nft.as_ref().map(|_| NativeSeen::default()),
            }
        }
        Err(e) => return Err(e),
    };
    tracing::debug!(?obs, "namespace observed");
    if s.clean {
        return clean(s, &env, &obs);
    }
    let backend = choose(s.backend, &obs)?;
    tracing::info!("backend: {}", backend.describe());
    match (backend, env.tools(backend)) {
        (Backend::Nft, _) => apply_nft(s, &env),
        (_, Some(tools)) => apply_iptables(s, backend, tools),
        (_, None) => Err(iptables_missing()),
    }
}

fn resolve_ipv6_nft(mode: Ipv6Mode) -> bool {
    match mode {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        Ipv6Mode::Auto => kernel_has_ipv6(),
    }
}

fn resolve_ipv6_iptables(mode: Ipv6Mode, tools: &IptTools) -> Result<bool, InitError> {
    let usable = || match (&tools.save6, &tools.restore6) {
        (Some(save), Some(_)) => read(save, &[]).is_ok(),
        _ => false,
    };
    match mode {
        Ipv6Mode::Off => Ok(false),
        Ipv6Mode::Auto => Ok(kernel_has_ipv6() && usable()),
        Ipv6Mode::On if tools.save6.is_none() || tools.restore6.is_none() => {
            Err(InitError::ToolMissing {
                tool: "ip6tables-restore/ip6tables-save".into(),
                hint:
                    "install ip6tables in the init image (it ships with iptables) or use --ipv6 off"
                        .into(),
            })
        }
        Ipv6Mode::On => Ok(true),
    }
}

fn apply_nft(s: &Settings, env: &Env) -> Result<(), InitError> {
    let nft = env.nft.as_deref().ok_or_else(|| InitError::ToolMissing {
        tool: "nft".into(),
        hint: "install nftables in the init image or use --backend iptables".into(),
    })?;
    let ipv6 = resolve_ipv6_nft(s.ipv6);
    warn_if_ipv6_uncovered(ipv6);
    let policy = Policy::new(&s.options, ipv6).map_err(InitError::Invalid)?;
    let script = nft::render(&policy);
    if s.dry_run {
        print!("# backend: nft; would run: nft -f -\n{script}");
        return Ok(());
    }
    write(nft, &["-f", "-"], &script, "nftables")?;
    tracing::info!("installed table {} (IPv6: {ipv6})", nft::TABLE);
    Ok(())
}

fn current(tools: &IptTools, family: Family) -> Result<NatState, InitError> {
    match tools.save(family) {
        Some(save) => Ok(iptables::parse_nat(&read(save, &[])?)),
        None => Ok(NatState::default()),
    }
}

/// `--dry-run` for the iptables backends: the tool that would run and each family's script.
fn print_dry_run(backend: Backend, tools: &IptTools, plan: &[(Family, NatState, Option<String>)]) {
    let parts: Vec<(Family, Option<String>)> =
        plan.iter().map(|(f, _, sc)| (*f, sc.clone())).collect();
    print!(
        "# backend: {}; would run: {} {}\n{}",
        backend.describe(),
        tool_name(&tools.restore4),
        RESTORE_ARGS.join(" "),
        iptables::render_dry_run(&parts)
    );
}

fn apply_iptables(s: &Settings, backend: Backend, tools: &IptTools) -> Result<(), InitError> {
    let ipv6 = resolve_ipv6_iptables(s.ipv6, tools)?;
    warn_if_ipv6_uncovered(ipv6);
    let policy = Policy::new(&s.options, ipv6).map_err(InitError::Invalid)?;
    let families: &[Family] = if ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    let mut plan = Vec::new();
    for &family in families {
        let before = match current(tools, family) {
            Ok(state) => state,
            Err(e) if s.dry_run => {
                tracing::warn!("{e}; --dry-run assumes no rules of ours are present");
                NatState::default()
            }
            Err(e) => return Err(e),
        };
        let script = iptables::transition(&before, &iptables::desired(&policy, family));
        plan.push((family, before, script));
    }
    if s.dry_run {
        print_dry_run(backend, tools, &plan);
        return Ok(());
    }
    let mut applied: Vec<(Family, &NatState)> = Vec::new();
    for (family, before, script) in &plan {
        let Some(script) = script else { continue };
        let Some(restore) = tools.restore(*family) else {
            continue;
        };
        if let Err(err) = write(restore, &RESTORE_ARGS, script, family.label()) {
            return Err(rollback(tools, &applied, err));
        }
        applied.push((*family, before));
    }
    tracing::info!(
        "installed chains {} in the nat table ({}, IPv6: {ipv6})",
        iptables::OUR_CHAINS.join(", "),
        backend.describe()
    );
    Ok(())
}

/// Puts back our part of each already-changed table as it was, after a later family failed.
fn rollback(tools: &IptTools, applied: &[(Family, &NatState)], err: InitError) -> InitError {
    if applied.is_empty() {
        return err;
    }
    for (family, before) in applied {
        let undo = current(tools, *family).and_then(|now| {
            match (iptables::transition(&now, before), tools.restore(*family)) {
                (Some(script), Some(restore)) => write(restore, &RESTORE_ARGS, &script, "rollback"),
                _ => Ok(()),
            }
        });
        if let Err(rollback) = undo {
            return InitError::RollbackFailed {
                first: Box::new(err),
                rollback: Box::new(rollback),
            };
        }
    }
    InitError::RolledBack {
        first: Box::new(err),
    }
}

fn clean(s: &Settings, env: &Env, obs: &Observation) -> Result<(), InitError> {
    let targets: Vec<Backend> = match s.backend {
        BackendChoice::Auto => obs.ours(),
        BackendChoice::Nft => vec![choose(BackendChoice::Nft, obs)?],
        BackendChoice::Iptables => {
            let ours: Vec<Backend> = obs
                .ours()
                .into_iter()
                .filter(|b| *b != Backend::Nft)
                .collect();
            if ours.is_empty() {
                vec![choose(BackendChoice::Iptables, obs)?]
            } else {
                ours
            }
        }
    };
    if targets.is_empty() {
        if s.dry_run {
            println!("# nothing to clean: no rules of amazing-proxy found");
        }
        tracing::info!("nothing to clean: no rules of amazing-proxy found");
        return Ok(());
    }
    for backend in targets {
        if backend == Backend::Nft {
            let nft = env.nft.as_deref().ok_or_else(|| InitError::ToolMissing {
                tool: "nft".into(),
                hint: "install nftables in the init image".into(),
            })?;
            let script = nft::render_clean();
            if s.dry_run {
                print!("# backend: nft; would run: nft -f -\n{script}");
            } else {
                write(nft, &["-f", "-"], &script, "nftables clean")?;
                tracing::info!("removed table {}", nft::TABLE);
            }
            continue;
        }
        let tools = env.tools(backend).ok_or_else(iptables_missing)?;
        let mut plan = Vec::new();
        for family in [Family::V4, Family::V6] {
            if tools.save(family).is_none() {
                continue;
            }
            let before = match current(tools, family) {
                Ok(b) => b,
                // No IPv6 in this kernel: there is nothing of ours to remove there either.
                Err(InitError::Read { .. }) if family == Family::V6 => continue,
                Err(e) if s.dry_run => {
                    tracing::warn!("{e}; --dry-run assumes no rules of ours are present");
                    NatState::default()
                }
                Err(e) => return Err(e),
            };
            let script = iptables::transition(&before, &NatState::default());
            plan.push((family, before, script));
        }
        if s.dry_run {
            print_dry_run(backend, tools, &plan);
            continue;
        }
        let mut applied: Vec<(Family, &NatState)> = Vec::new();
        for (family, before, script) in &plan {
            let (Some(script), Some(restore)) = (script, tools.restore(*family)) else {
                continue;
            };
            if let Err(err) = write(restore, &RESTORE_ARGS, script, family.label()) {
                return Err(rollback(tools, &applied, err));
            }
            applied.push((*family, before));
        }
        tracing::info!("removed our chains and jumps ({})", backend.describe());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn seen(rules: usize, ours: bool) -> Option<Seen> {
        Some(Seen { rules, ours })
    }

    fn native(tables: &[&str], ours: bool) -> Option<NativeSeen> {
        Some(NativeSeen {
            foreign_tables: tables.iter().map(ToString::to_string).collect(),
            ours,
        })
    }

    fn auto(obs: Observation) -> Option<Backend> {
        choose(BackendChoice::Auto, &obs).ok()
    }

    #[test]
    fn auto_follows_existing_rules() {
        let empty = || Observation {
            legacy: seen(0, false),
            nft_compat: seen(0, false),
            native: native(&[], false),
        };
        assert_eq!(auto(empty()), Some(Backend::IptablesNft), "default");
        let mut o = empty();
        o.legacy = seen(3, false);
        assert_eq!(auto(o), Some(Backend::IptablesLegacy));
        let mut o = empty();
        o.legacy = seen(3, false);
        o.nft_compat = seen(5, false);
        assert_eq!(auto(o), Some(Backend::IptablesNft));
        let mut o = empty();
        o.native = native(&["inet cilium"], false);
        assert_eq!(auto(o), Some(Backend::Nft));
        let mut o = empty();
        o.legacy = seen(30, false);
        o.native = native(&[], true);
        assert_eq!(auto(o), Some(Backend::Nft), "ours first");
    }

    #[test]
    fn auto_with_partial_tools() {
        let o = Observation {
            legacy: seen(0, false),
            nft_compat: None,
            native: None,
        };
        assert_eq!(auto(o), Some(Backend::IptablesLegacy));
        let o = Observation {
            legacy: None,
            nft_compat: None,
            native: native(&[], false),
        };
        assert_eq!(auto(o), Some(Backend::Nft));
        let err = choose(BackendChoice::Auto, &Observation::default()).unwrap_err();
        assert!(err.to_string().contains("install"), "{err}");
    }

    #[test]
    fn explicit_backends() {
        let o = Observation {
            legacy: seen(2, false),
            nft_compat: seen(1, false),
            native: None,
        };
        assert_eq!(
            choose(BackendChoice::Iptables, &o).ok(),
            Some(Backend::IptablesLegacy)
        );
        let err = choose(BackendChoice::Nft, &o).unwrap_err().to_string();
        assert!(err.contains("nft not found in PATH"), "{err}");
        let err = choose(BackendChoice::Iptables, &Observation::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--backend nft"), "{err}");
    }

    #[test]
    fn ipv6_interfaces_leave_out_loopback() {
        let proc = "00000000000000000000000000000001 01 80 10 80       lo\n\
            fe80000000000000a8c1abfffe123456 02 40 20 80     eth0\n\
            20010db8000000000000000000000001 02 40 00 80     eth0\n";
        assert_eq!(ipv6_interfaces(proc), ["eth0"]);
        assert!(ipv6_interfaces("00000000000000000000000000000001 01 80 10 80 lo\n").is_empty());
    }

    #[test]
    fn native_tables_exclude_iptables_nft_ones() {
        let s = parse_nft_tables(
            "table ip nat\ntable ip6 filter\ntable inet amazing_proxy\ntable inet cilium\n",
        );
        assert!(s.ours);
        assert_eq!(s.foreign_tables, ["inet cilium"]);
    }
}
