//! The reference pages checked against the code, so that what they say stays true:
//! - the flag tables of docs/run.md (`run`), docs/kubernetes.md (`init`, `install`) and
//!   docs/mtls.md (`identity ca`, `identity issue`) list exactly the flags the binary parses, in
//!   `--help`'s order, with clap's environment variables and defaults;
//! - every flag of `inject`, `uninject` and `webhook` is named in docs/inject.md;
//! - every relative link in README.md and docs/*.md reaches a file, and the heading it names;
//! - README.md links each page of docs/ exactly once.
//!
//! `UPDATE_GOLDENS=1 cargo test --test in_process docs::` rewrites the flag, env and default columns of those
//! tables from clap, as the golden tests rewrite theirs: meanings are kept, a new flag gets its
//! `--help` line as its meaning, a flag that is gone loses its row. Review the diff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use amazing_proxy::config::RunArgs;
use amazing_proxy::identity::issue::IdentityCommand;
use amazing_proxy::inject::{InjectArgs, UninjectArgs};
use amazing_proxy::install::InstallArgs;
use amazing_proxy::netfilter::InitArgs;
use amazing_proxy::webhook::WebhookArgs;
use clap::{Arg, Args, Command, Subcommand};

use crate::support::golden::updating;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A subcommand's arguments as the binary parses them (main.rs flattens these same structs).
fn command<A: Args>(name: &'static str) -> Command {
    let mut cmd = A::augment_args(Command::new(name));
    cmd.build();
    cmd
}

fn identity_command(name: &str) -> Command {
    let mut cmd = IdentityCommand::augment_subcommands(Command::new("identity"));
    cmd.build();
    cmd.find_subcommand(name)
        .cloned()
        .unwrap_or_else(|| panic!("`identity {name}` is no longer a subcommand"))
}

/// The flags a user can give: those with a long name, not hidden, not clap's own.
fn flags(cmd: &Command) -> Vec<&Arg> {
    cmd.get_arguments()
        .filter(|a| a.get_long().is_some() && !a.is_hide_set())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect()
}

fn long(arg: &Arg) -> &str {
    arg.get_long().unwrap_or_default()
}

// What each column says of a flag, written as the tables write it.

fn flag_cell(arg: &Arg) -> String {
    match arg.get_short() {
        Some(short) => format!("`-{short}`, `--{}`", long(arg)),
        None => format!("`--{}`", long(arg)),
    }
}

fn env_cell(arg: &Arg) -> String {
    arg.get_env()
        .map_or_else(|| "-".to_owned(), |v| format!("`{}`", v.to_string_lossy()))
}

/// `off` for a switch, `required`, `none` when clap has no default (an empty list included),
/// else clap's default in backticks.
fn default_cell(arg: &Arg) -> String {
    if !arg.get_action().takes_values() {
        return "off".to_owned();
    }
    if arg.is_required_set() {
        return "required".to_owned();
    }
    let values: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() {
        "none".to_owned()
    } else {
        format!("`{}`", values.join(","))
    }
}

/// The first line of `--help`, for the meaning of a flag the table does not have yet.
fn help_line(arg: &Arg) -> String {
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    help.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Clone, Copy, PartialEq)]
enum Column {
    Flag,
    Env,
    Default,
    Other,
}

/// A markdown table: its header's roles, its rows' cells, and where its rows are in the file.
struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
    /// Line indices: the first row, and one past the last.
    lines: (usize, usize),
}

/// A table row's cells, split on `|` (a `\|` inside a cell is not a separator, as in GitHub's
/// tables), trimmed.
fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let inner = line.strip_prefix('|').unwrap_or(line);
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut out = vec![String::new()];
    let mut escaped = false;
    for c in inner.chars() {
        match c {
            '|' if !escaped => out.push(String::new()),
            _ => {
                if let Some(cell) = out.last_mut() {
                    cell.push(c);
                }
            }
        }
        escaped = c == '\\';
    }
    out.into_iter().map(|c| c.trim().to_owned()).collect()
}

/// The first table under `heading` (a whole line), before the next heading.
fn find_table(text: &str, heading: &str) -> Result<Table, String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == heading)
        .ok_or_else(|| format!("no heading `{heading}`"))?;
    let mut i = start + 1;
    while i < lines.len() && !lines[i].starts_with('|') {
        if lines[i].starts_with('#') {
            return Err(format!("no table under `{heading}`"));
        }
        i += 1;
    }
    if i + 1 >= lines.len() {
        return Err(format!("no table under `{heading}`"));
    }
    let columns = cells(lines[i])
        .iter()
        .map(|h| match h.to_ascii_lowercase().as_str() {
            "flag" => Column::Flag,
            "env" => Column::Env,
            "default" => Column::Default,
            _ => Column::Other,
        })
        .collect::<Vec<_>>();
    if !columns.contains(&Column::Flag) {
        return Err(format!("the table under `{heading}` has no `flag` column"));
    }
    let first = i + 2;
    let end = (first..lines.len())
        .find(|&j| !lines[j].starts_with('|'))
        .unwrap_or(lines.len());
    let rows = lines[first..end].iter().map(|l| cells(l)).collect();
    Ok(Table {
        columns,
        rows,
        lines: (first, end),
    })
}

/// The `--name` a flag cell names.
fn documented_long(cell: &str) -> Option<&str> {
    let at = cell.find("`--")? + 3;
    let rest = &cell[at..];
    rest.find('`').map(|end| &rest[..end])
}

/// The table as clap says it should be: each flag in clap's order, with the row the table has
/// for it (its other cells kept) or a new one.
fn regenerate(table: &Table, args: &[&Arg]) -> Result<Vec<Vec<String>>, String> {
    let has_env = table.columns.contains(&Column::Env);
    let flag = table.columns.iter().position(|c| *c == Column::Flag);
    let last_other = table.columns.iter().rposition(|c| *c == Column::Other);
    args.iter()
        .map(|arg| {
            if !has_env && let Some(env) = arg.get_env() {
                return Err(format!(
                    "--{} reads {} but the table has no `env` column",
                    long(arg),
                    env.to_string_lossy()
                ));
            }
            let existing = table.rows.iter().find(|row| {
                flag.and_then(|i| row.get(i))
                    .and_then(|cell| documented_long(cell))
                    == Some(long(arg))
            });
            Ok(table
                .columns
                .iter()
                .enumerate()
                .map(|(i, column)| match column {
                    Column::Flag => flag_cell(arg),
                    Column::Env => env_cell(arg),
                    Column::Default => default_cell(arg),
                    Column::Other => match existing.and_then(|row| row.get(i)) {
                        Some(cell) => cell.clone(),
                        None if Some(i) == last_other => help_line(arg),
                        None => String::new(),
                    },
                })
                .collect())
        })
        .collect()
}

/// What differs between the table and clap, one line each.
fn differences(table: &Table, expected: &[Vec<String>]) -> Vec<String> {
    let flag = table
        .columns
        .iter()
        .position(|c| *c == Column::Flag)
        .unwrap_or(0);
    let name = |row: &Vec<String>| {
        row.get(flag)
            .and_then(|c| documented_long(c))
            .map(str::to_owned)
    };
    let documented: Vec<Option<String>> = table.rows.iter().map(name).collect();
    let defined: Vec<Option<String>> = expected.iter().map(name).collect();
    let mut out = Vec::new();
    for (row, doc) in table.rows.iter().zip(&documented) {
        match doc {
            None => out.push(format!("a row names no `--flag`: {row:?}")),
            Some(doc) if !defined.contains(&Some(doc.clone())) => {
                out.push(format!(
                    "--{doc} is documented but the command has no such flag"
                ));
            }
            Some(_) => {}
        }
    }
    for (row, def) in expected.iter().zip(&defined) {
        let Some(def) = def else { continue };
        match table
            .rows
            .iter()
            .zip(&documented)
            .find(|(_, d)| d.as_deref() == Some(def.as_str()))
        {
            None => out.push(format!("--{def} is missing from the table")),
            Some((actual, _)) if actual != row => out.push(format!(
                "--{def}: the table says {actual:?}, the code {row:?}"
            )),
            Some(_) => {}
        }
    }
    if out.is_empty() && documented != defined {
        out.push(format!(
            "the rows are not in `--help`'s order: {:?}",
            defined.iter().flatten().collect::<Vec<_>>()
        ));
    }
    out
}

/// Checks the table under `heading` in `file` against `cmd`'s flags, or rewrites it under
/// `UPDATE_GOLDENS=1`. Returns what differs, each line naming the table.
fn check_table(file: &str, heading: &str, cmd: &Command) -> Vec<String> {
    let path = root().join(file);
    let text = read(&path);
    let table = match find_table(&text, heading) {
        Ok(table) => table,
        Err(e) => return vec![format!("{file}: {e}")],
    };
    let expected = match regenerate(&table, &flags(cmd)) {
        Ok(rows) => rows,
        Err(e) => return vec![format!("{file}, `{heading}`: {e}")],
    };
    let differences = differences(&table, &expected);
    if differences.is_empty() {
        return differences;
    }
    if updating() {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let rows = expected
            .iter()
            .map(|row| format!("| {} |", row.join(" | ")));
        lines.splice(table.lines.0..table.lines.1, rows);
        std::fs::write(&path, lines.join("\n") + "\n")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        return Vec::new();
    }
    differences
        .into_iter()
        .map(|d| format!("{file}, `{heading}`: {d}"))
        .collect()
}

fn assert_none(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "the docs and the code disagree:\n{}\nfix the docs (or the code); if the code is right, \
         `UPDATE_GOLDENS=1 cargo test --test in_process docs::` rewrites the flag, env and default columns",
        problems.join("\n")
    );
}

#[test]
fn docs_run_md_lists_every_run_flag_with_its_variable_and_default() {
    assert_none(&check_table(
        "docs/run.md",
        "## Flags",
        &command::<RunArgs>("run"),
    ));
}

#[test]
fn docs_kubernetes_md_lists_every_init_and_install_flag() {
    let mut problems = check_table(
        "docs/kubernetes.md",
        "## `amazing-proxy init`",
        &command::<InitArgs>("init"),
    );
    problems.extend(check_table(
        "docs/kubernetes.md",
        "## `amazing-proxy install` and a cluster",
        &command::<InstallArgs>("install"),
    ));
    assert_none(&problems);
}

#[test]
fn docs_mtls_md_lists_every_identity_flag() {
    let mut problems = check_table("docs/mtls.md", "### `identity ca`", &identity_command("ca"));
    problems.extend(check_table(
        "docs/mtls.md",
        "### `identity issue`",
        &identity_command("issue"),
    ));
    assert_none(&problems);
}

/// Whether `text` names `--flag` (not merely a longer flag that starts the same).
fn names_flag(text: &str, flag: &str) -> bool {
    let needle = format!("--{flag}");
    text.match_indices(&needle).any(|(at, _)| {
        !text[at + needle.len()..]
            .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn docs_inject_md_names_every_inject_uninject_and_webhook_flag() {
    let text = read(&root().join("docs/inject.md"));
    let mut missing = Vec::new();
    for cmd in [
        command::<InjectArgs>("inject"),
        command::<UninjectArgs>("uninject"),
        command::<WebhookArgs>("webhook"),
    ] {
        for arg in flags(&cmd) {
            if !names_flag(&text, long(arg)) {
                missing.push(format!("{} --{}", cmd.get_name(), long(arg)));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/inject.md does not name: {missing:?}"
    );
}

/// README.md and every page of docs/.
fn pages() -> Vec<PathBuf> {
    let docs = root().join("docs");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&docs)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", docs.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages.insert(0, root().join("README.md"));
    pages
}

/// The lines of `text` outside fenced code blocks, with their numbers (1-based).
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// A line without its inline code spans.
fn without_code(line: &str) -> String {
    line.split('`').step_by(2).collect()
}

/// The targets of the `[text](target)` links of `text`, with their line numbers.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (number, line) in prose(text) {
        let line = without_code(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                out.push((number, rest[..end].to_owned()));
                rest = &rest[end..];
            }
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation other than `-` and `_`
/// dropped.
fn slug(title: &str) -> String {
    title
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's headings; a repeated one gets `-1`, `-2`, ... as on GitHub.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    prose(text)
        .into_iter()
        .filter_map(|(_, line)| {
            let title = line.trim_start_matches('#');
            (line.starts_with('#') && title.starts_with(' ')).then(|| slug(title))
        })
        .map(|anchor| {
            let n = seen.entry(anchor.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                anchor
            } else {
                format!("{anchor}-{}", *n - 1)
            }
        })
        .collect()
}

#[test]
fn relative_links_reach_their_files_and_headings() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = read(&page);
        let name = page
            .strip_prefix(root())
            .unwrap_or(&page)
            .display()
            .to_string();
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap_or(&page).join(file)
            };
            if !path.exists() {
                broken.push(format!("{name}:{line}: {target}: no such file"));
                continue;
            }
            if !anchor.is_empty() && !anchors(&read(&path)).iter().any(|a| a == anchor) {
                broken.push(format!("{name}:{line}: {target}: no such heading"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_links_each_page_of_docs_once() {
    let readme = read(&root().join("README.md"));
    let mut counts: BTreeMap<String, usize> = pages()
        .iter()
        .skip(1)
        .filter_map(|p| {
            p.file_name()
                .map(|n| format!("docs/{}", n.to_string_lossy()))
        })
        .map(|p| (p, 0))
        .collect();
    for (_, target) in links(&readme) {
        let file = target.split('#').next().unwrap_or_default();
        if let Some(n) = counts.get_mut(file) {
            *n += 1;
        }
    }
    let wrong: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(page, n)| format!("{page}: linked {n} times"))
        .collect();
    assert!(
        wrong.is_empty(),
        "README.md should link each page of docs/ once (its Reference list):\n{}",
        wrong.join("\n")
    );
}
