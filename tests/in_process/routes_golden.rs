//! The routes file's errors (`--routes`, src/routes/): every file under tests/fixtures/routes/ has
//! one mistake, is refused, and its one-line message (the file, the field's path, what is wrong and
//! what to write) is pinned by tests/golden/routes/<file>.err.txt.
//!
//! `UPDATE_GOLDENS=1 cargo test --test in_process routes_golden` rewrites the goldens.

use std::collections::BTreeSet;
use std::path::Path;

use amazing_proxy::routes::Routes;

use crate::support::golden;

const FIXTURES: &str = "tests/fixtures/routes";
const GOLDENS: &str = "tests/golden/routes";

/// The names of the files in `dir` ending with `suffix`, without it, sorted.
fn stems(dir: &str, suffix: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter_map(|name| name.strip_suffix(suffix).map(str::to_owned))
        .collect()
}

#[test]
fn each_bad_file_is_refused_naming_the_file_and_field() {
    let fixtures = stems(FIXTURES, ".yaml");
    assert!(fixtures.len() >= 15, "only {} fixtures", fixtures.len());
    for stem in &fixtures {
        let path = format!("{FIXTURES}/{stem}.yaml");
        let err = Routes::load(Path::new(&path)).expect_err(&path).to_string();
        assert!(err.starts_with(&format!("{path}: ")), "{err}");
        assert!(!err.contains('\n'), "not one line: {err}");
        golden::check(GOLDENS, &format!("{stem}.err.txt"), &format!("{err}\n"));
    }
    if !golden::updating() {
        assert_eq!(
            stems(GOLDENS, ".err.txt"),
            fixtures,
            "a golden without its fixture, or the other way round"
        );
    }
}
