//! scripts/release.sh hands its flags (static glibc, and scripts/pgo.sh's profile flags through
//! RELEASE_RUSTFLAGS) to the one variable cargo will read: cargo takes the first of
//! CARGO_ENCODED_RUSTFLAGS, RUSTFLAGS and the target's rustflags that is set and ignores the rest,
//! so a flag put anywhere else would be dropped without a word (a dynamic build, or a build
//! without its profile). Run with a stand-in for cargo that prints what it was given.

use std::path::Path;
use std::process::Command;

use super::support::process::run;
use super::support::tools;

const HOST: &str = "x86_64-unknown-linux-gnu";
const TARGET_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS";

/// What each of cargo's three flag variables held when release.sh ran `cargo build`, with
/// `env` set for the script (`None`: unset).
fn flags_cargo_saw(env: &[(&str, &str)]) -> [Option<String>; 3] {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = dir.path().join("cargo");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = -vV ]; then echo 'host: {HOST}'; exit 0; fi\n\
         for v in CARGO_ENCODED_RUSTFLAGS RUSTFLAGS {TARGET_VAR}; do\n\
           eval \"set=\\${{$v+set}}\"; eval \"val=\\${{$v-}}\"\n\
           if [ -n \"$set\" ]; then printf '%s=%s\\n' \"$v\" \"$val\" >&2; fi\n\
         done\n"
    );
    std::fs::write(&fake, script).expect("writing the stand-in cargo");
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&fake, mode).expect("making it executable");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(root.join("scripts/release.sh"));
    cmd.env("CARGO", &fake).env("CARGO_TARGET_DIR", dir.path());
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        TARGET_VAR,
        "RELEASE_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = run(&mut cmd);
    let stderr = tools::text(&out.stderr);
    assert!(out.status.success(), "release.sh failed: {stderr}");
    let seen = |var: &str| {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(var)?.strip_prefix('='))
            .map(|v| v.replace('\x1f', "|").trim().to_string())
    };
    [
        seen("CARGO_ENCODED_RUSTFLAGS"),
        seen("RUSTFLAGS"),
        seen(TARGET_VAR),
    ]
}

#[test]
fn release_sh_adds_its_flags_to_the_variable_cargo_reads() {
    let profile = ("RELEASE_RUSTFLAGS", "-Cprofile-use=/p -Cx=1");
    let static_and_profile = "-Ctarget-feature=+crt-static -Cprofile-use=/p -Cx=1";
    // Nothing set: the target's variable, which leaves build scripts and proc-macros alone.
    assert_eq!(
        flags_cargo_saw(&[profile]),
        [None, None, Some(static_and_profile.to_string())]
    );
    assert_eq!(
        flags_cargo_saw(&[]),
        [None, None, Some("-Ctarget-feature=+crt-static".to_string())]
    );
    // A RUSTFLAGS of the caller's wins over the target's variable: ours join it.
    assert_eq!(
        flags_cargo_saw(&[profile, ("RUSTFLAGS", "-Cmine")]),
        [None, Some(format!("-Cmine {static_and_profile}")), None]
    );
    // CARGO_ENCODED_RUSTFLAGS wins over both: ours join it, one flag per separator.
    assert_eq!(
        flags_cargo_saw(&[
            profile,
            ("CARGO_ENCODED_RUSTFLAGS", "-Cmine"),
            ("RUSTFLAGS", "-Cno")
        ]),
        [
            Some("-Cmine|-Ctarget-feature=+crt-static|-Cprofile-use=/p|-Cx=1".to_string()),
            Some("-Cno".to_string()),
            None
        ]
    );
}
