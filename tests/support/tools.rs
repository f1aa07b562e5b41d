//! External programs and the text they (and the proxy) write: is a program installed, the test
//! venv's programs, rule listings made comparable, and access-log records.

use std::path::{Path, PathBuf};

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether `program` is on PATH (or, given as a path, exists).
pub fn have(program: &str) -> bool {
    which(program).is_some()
}

/// Where `program` is on PATH (or itself, given as a path that exists).
pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The test venv scripts/deps.sh makes (gunicorn, httpbin): `$AMAZING_PROXY_TEST_VENV`, else
/// `target/venv`; `Err` says what is missing and how to get it.
pub fn venv() -> Result<PathBuf, String> {
    let candidates = [
        std::env::var_os("AMAZING_PROXY_TEST_VENV").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|v| v.join("bin/gunicorn").is_file())
        .ok_or_else(|| {
            "gunicorn+httpbin not found in $AMAZING_PROXY_TEST_VENV or target/venv: run \
             scripts/test.sh, which installs them"
                .into()
        })
}

/// Rules without comments, chain counters or rule counters, to compare states.
pub fn normalise(listing: &str) -> String {
    listing
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| {
            let l = match (l.starts_with(':'), l.rfind(" [")) {
                (true, Some(i)) => format!("{} [0:0]", &l[..i]),
                _ => l.to_string(),
            };
            format!("{}\n", strip_nft_counters(&l))
        })
        .collect()
}

/// `nft list ruleset` without base chains that hold no rule and accept everything, without tables
/// left empty by that, and without blank lines.
///
/// iptables-nft creates a built-in chain (PREROUTING, OUTPUT) in nf_tables the first time a rule
/// goes into it, and deleting the rule leaves the chain: to iptables the built-in chains always
/// exist (`iptables-save` shows the same before and after), and an empty accepting chain changes
/// no packet's fate. So after `init --clean` such chains are all that can differ, and only for the
/// iptables-nft backend; they are not ours to delete (nothing tells who created them).
pub fn without_inert_chains(listing: &str) -> String {
    let mut out = String::new();
    let mut table: Option<(String, Vec<String>)> = None;
    let mut chain: Option<Vec<String>> = None;
    for line in listing.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(c) = chain.as_mut() {
            if line == "\t}" {
                let inert = c.len() == 2 && c[1].contains("policy accept;");
                if let (false, Some((_, body))) = (inert, table.as_mut()) {
                    body.append(c);
                    body.push(line.to_string());
                }
                chain = None;
            } else {
                c.push(line.to_string());
            }
        } else if line.starts_with("\tchain ") {
            chain = Some(vec![line.to_string()]);
        } else if line.starts_with("table ") {
            table = Some((line.to_string(), Vec::new()));
        } else if line == "}" {
            if let Some((head, body)) = table.take().filter(|(_, b)| !b.is_empty()) {
                out.push_str(&format!("{head}\n{}\n}}\n", body.join("\n")));
            }
        } else if let Some((_, body)) = table.as_mut() {
            body.push(line.to_string());
        } else {
            out.push_str(&format!("{line}\n"));
        }
    }
    out
}

/// `counter packets 3 bytes 180` becomes `counter`.
fn strip_nft_counters(line: &str) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        out.push(words[i]);
        if words[i] == "counter" && words.get(i + 1) == Some(&"packets") && words.len() > i + 4 {
            i += 5;
        } else {
            i += 1;
        }
    }
    out.join(" ")
}

/// The seed access log's records (blocks separated by a blank line), each as its lines.
pub fn seed_records(log: &str) -> Vec<Vec<String>> {
    log.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| block.lines().map(str::to_owned).collect())
        .collect()
}

/// The JSON access log's records (a line that is not JSON fails the test).
pub fn json_records(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record ({e}): {l}")))
        .collect()
}

/// Why a test cannot run without `programs`: `Some(reason)` naming the missing ones.
pub fn missing(programs: &[&str]) -> Option<String> {
    let absent: Vec<&str> = programs.iter().copied().filter(|p| !have(p)).collect();
    (!absent.is_empty())
        .then(|| format!("needs {} (scripts/deps.sh installs it)", absent.join(", ")))
}
