//! Golden files: the expected output of a test, kept in the tree and compared whole.
//! `UPDATE_GOLDENS=1 cargo test` rewrites them from the current output instead; review the diff.

use std::path::Path;

/// Whether the goldens are being rewritten (`UPDATE_GOLDENS=1`).
pub fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDENS").is_some_and(|v| v == "1")
}

/// Compares `actual` with the golden file `dir/name`, or writes it there under `UPDATE_GOLDENS=1`.
pub fn check(dir: &str, name: &str, actual: &str) {
    let path = Path::new(dir).join(name);
    if updating() {
        std::fs::create_dir_all(dir).expect("create golden dir");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read golden {}: {e}; run `UPDATE_GOLDENS=1 cargo test` to create it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the output; if the change is intended, run `UPDATE_GOLDENS=1 cargo test`\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}
