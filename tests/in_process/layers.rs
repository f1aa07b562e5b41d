//! The crate's layers, read from `src/**/*.rs` as text: no module cycles, and each module uses
//! only its own layer and the layers [`LAYERS`] puts below it. The table is the README's
//! (Architecture), lowest first.
//!
//! What counts as "module A uses module B":
//! - A module is a file: `src/proxy/tcp.rs` is `proxy::tcp`, `src/proxy/mod.rs` is `proxy`,
//!   `src/lib.rs` is `crate`, and the binary's `src/main.rs` is `main`. An inline `mod x { .. }`
//!   belongs to its file.
//! - A path written in A's code that names B or an item of B: in a `use` tree (`use crate::..`,
//!   `use super::..`, `use self::..`, `use child::..`; the binary's `use amazing_proxy::..`), or
//!   in code or an attribute, a path starting with `crate::`, `super::`, `self::`, a name a `use`
//!   brought into scope (`use super::hbone;` then `hbone::inbound::serve_connection`) or a child
//!   module's name (`upstream::connect` in `proxy`). The module named is the longest prefix of the
//!   path that is a module: `crate::proxy::tcp::Route` is `proxy::tcp`.
//! - Declaring a child (`mod child;`) is not a use; naming the child's items is, and so is a
//!   child's naming its parent's (`super::SpiffeId`): a parent and its child are two modules like
//!   any others, so a parent that re-exports its child while the child uses the parent is a cycle.
//! - A re-export counts where it is named: `crate::config::PortList` uses `config`, not `vocab`
//!   where `PortList` is defined.
//! - Left out: comments (doc links included), string literals, visibility paths (`pub(in ..)`),
//!   and `#[cfg(test)]` items: a unit test may build its fixture from any layer, and is not part
//!   of what the binary links. `src` defines no macros, so no path hides in one.
//!
//! Each module belongs to the entry of [`LAYERS`] that names it or its nearest ancestor; a module
//! no entry covers fails. A new module under `proxy` that is not listed falls to `proxy`'s layer,
//! the wiring, so that whatever below uses it fails: the prompt to give it its place here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which layers a layer may use, besides its own.
enum Uses {
    /// Every layer listed before it.
    Below,
    /// Only these (by name).
    Only(&'static [&'static str]),
}

struct Layer {
    name: &'static str,
    modules: &'static [&'static str],
    uses: Uses,
}

/// The layers, lowest first.
const LAYERS: &[Layer] = &[
    // The words every job shares; each depends on nothing else in the crate.
    Layer {
        name: "shared vocabulary",
        modules: &["error", "vocab", "sync", "text_response"],
        uses: Uses::Below,
    },
    // SPIFFE IDs, the material that proves ours, trust bundles, HBONE's TLS configurations, the
    // identities expected of peers; the development CA (`amazing-proxy identity`).
    Layer {
        name: "identity",
        modules: &["identity"],
        uses: Uses::Below,
    },
    // Who may reach which inbound port (--policy).
    Layer {
        name: "policy",
        modules: &["policy"],
        uses: Uses::Below,
    },
    // Which route a request takes, and what applies to it (--routes): plain values and a lookup,
    // below everything that applies them.
    Layer {
        name: "routes",
        modules: &["routes"],
        uses: Uses::Only(&["shared vocabulary"]),
    },
    // The data plane's configuration as plain values: what `run`'s flags become, what `Shared`
    // is built from.
    Layer {
        name: "settings",
        modules: &["settings"],
        uses: Uses::Below,
    },
    // Metrics and the access log.
    Layer {
        name: "telemetry",
        modules: &["telemetry"],
        uses: Uses::Below,
    },
    // Pure decisions and parsers: the record of an exchange, the phases, paths, detection, the
    // HTTP/1.1 parsers, the bytes a stream gives back.
    Layer {
        name: "exchange, phases",
        modules: &[
            "proxy::exchange",
            "proxy::phases",
            "proxy::path",
            "proxy::detect",
            "proxy::rewind",
            "proxy::http1::framing",
            "proxy::http1::chunked",
        ],
        uses: Uses::Below,
    },
    // What connections share: limits and shedding, upstream connections and their pools (the
    // app's, and HBONE's), the drain, the hyper path's bodies, the routes' rate and concurrency
    // limits and the retry budget.
    Layer {
        name: "limits, upstreams, drain",
        modules: &[
            "proxy::limits",
            "proxy::upstream",
            "proxy::drain",
            "proxy::body",
            "proxy::traffic",
        ],
        uses: Uses::Below,
    },
    // `Shared`: the data plane's state, handed to every adapter; the driver, which decides every
    // exchange on it for every adapter.
    Layer {
        name: "state and the driver",
        modules: &["proxy::shared", "proxy::driver", "proxy::routing"],
        uses: Uses::Below,
    },
    // The protocol adapters: read and write bytes.
    Layer {
        name: "protocol adapters",
        modules: &[
            "proxy::http1",
            "proxy::hyper_path",
            "proxy::tcp",
            "proxy::hbone",
        ],
        uses: Uses::Below,
    },
    // Accept, original destination, detection, dispatch to an adapter.
    Layer {
        name: "listeners",
        modules: &["proxy::listener"],
        uses: Uses::Below,
    },
    // The other jobs, beside the data plane: they share only the vocabulary and identity.
    Layer {
        name: "beside the data plane",
        modules: &["netfilter", "inject", "webhook", "install"],
        uses: Uses::Only(&["shared vocabulary", "identity"]),
    },
    // The wiring: `Shared`'s constructor (`proxy`), `run`'s flags, `run`, the admin server,
    // the views of it (`view`: `tap`, `top`), the crate root and the binary.
    Layer {
        name: "wiring",
        modules: &["proxy", "config", "run", "admin", "view", "crate", "main"],
        uses: Uses::Below,
    },
];

#[test]
fn no_module_cycles() {
    let graph = Graph::read();
    let cycles: Vec<String> = graph
        .cycles()
        .iter()
        .map(|scc| {
            let mut text = format!("cycle among {}:", scc.join(", "));
            for from in scc {
                for (to, at) in &graph.edges[from] {
                    if scc.contains(to) {
                        text.push_str(&format!("\n    {from} -> {to}: {}", places(at)));
                    }
                }
            }
            text
        })
        .collect();
    assert!(
        cycles.is_empty(),
        "modules that use each other (break each cycle by moving the shared piece down, or by \
         handing the upper piece in as a function):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn each_module_uses_only_its_layer_and_those_below() {
    let graph = Graph::read();
    let mut wrong = Vec::new();
    for module in graph.edges.keys() {
        if layer_of(module).is_none() {
            wrong.push(format!(
                "{module}: in no layer; add it to LAYERS in tests/in_process/layers.rs"
            ));
        }
    }
    for (from, tos) in &graph.edges {
        let Some(low) = layer_of(from) else { continue };
        for (to, at) in tos {
            let Some(high) = layer_of(to) else { continue };
            if !may_use(low, high) {
                wrong.push(format!(
                    "{from} ({}) uses {to} ({}): {}",
                    LAYERS[low].name,
                    LAYERS[high].name,
                    places(at)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "uses against the layers (lowest first: {}):\n{}",
        LAYERS
            .iter()
            .map(|l| l.name)
            .collect::<Vec<_>>()
            .join(" < "),
        wrong.join("\n")
    );
}

/// The reader sees what the compiler sees: known uses are found, so that the two tests above
/// cannot pass on a graph that lost its edges.
#[test]
fn the_reader_finds_known_uses() {
    let graph = Graph::read();
    assert!(
        graph.edges.len() > 40,
        "only {} modules read",
        graph.edges.len()
    );
    for (from, to) in [
        // `use amazing_proxy::{.., run, ..}` then `run::main(..)`.
        ("main", "run"),
        // `use super::detect::{..}` in a brace tree.
        ("proxy::listener", "proxy::detect"),
        // `use super::chunked::is_tchar` from a file in a directory.
        ("proxy::http1::framing", "proxy::http1::chunked"),
        // A child's `use super::..`.
        ("identity::tls", "identity"),
        // `use super::idle::IdleClock` from tcp/splice.rs, a file beside tcp.rs.
        ("proxy::tcp::splice", "proxy::tcp::idle"),
        // A child module named bare in its parent: `upstream::mark_if_permitted` in `proxy`.
        ("proxy", "proxy::upstream"),
        // `use crate::proxy::shared::Shared`, the adapters' state.
        ("proxy::hbone::inbound", "proxy::shared"),
    ] {
        assert!(
            graph
                .edges
                .get(from)
                .is_some_and(|tos| tos.contains_key(to)),
            "{from} -> {to} not found; the reader misses uses"
        );
    }
}

/// Comments, strings, characters and `#[cfg(test)]` items name nothing; code and `use` trees do.
#[test]
fn comments_strings_and_test_items_are_not_uses() {
    let text = r##"
        //! See [`crate::run`] /* and */ crate::admin.
        use super::detect::{self, Detected as Found};
        const S: &str = "crate::config::RunArgs \" crate::admin";
        fn f<'a>(x: &'a str) -> u8 {
            let quote = '"';
            let escaped = '\'';
            let brace = '{';
            detect::classify(b"crate::admin");
            crate::vocab::parse_port(r#"crate::admin"#);
            0
        }
        pub(in crate::run) fn g() {}
        #[cfg(test)]
        mod tests {
            use crate::config::RunArgs;
            fn h() { let _ = '}'; crate::admin::spawn(); }
        }
        fn after() -> Found { crate::telemetry::init() }
    "##;
    let modules: BTreeSet<Vec<String>> = [
        "proxy",
        "proxy::detect",
        "proxy::listener",
        "vocab",
        "config",
        "run",
        "admin",
        "telemetry",
    ]
    .iter()
    .map(|m| m.split("::").map(str::to_owned).collect())
    .collect();
    let module: Vec<String> = vec!["proxy".into(), "listener".into()];
    let found: BTreeSet<String> = paths(&without_test_items(lex(text)), &module, false, &modules)
        .into_iter()
        .filter_map(|(path, _)| longest_module(&path, &modules))
        .map(|m| display(&m))
        .collect();
    let expected: BTreeSet<String> = ["proxy::detect", "vocab", "telemetry"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, expected);
}

/// Where a use is written: the first few places, and how many more.
fn places(at: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = at[..at.len().min(SHOWN)].join(", ");
    if at.len() > SHOWN {
        text.push_str(&format!(" and {} more", at.len() - SHOWN));
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Layers

/// The layer of `module`: the entry naming it or its nearest ancestor.
fn layer_of(module: &str) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (index, layer) in LAYERS.iter().enumerate() {
        for &entry in layer.modules {
            let covers =
                module == entry || (entry != "crate" && module.starts_with(&format!("{entry}::")));
            if covers && best.is_none_or(|(len, _)| entry.len() > len) {
                best = Some((entry.len(), index));
            }
        }
    }
    best.map(|(_, index)| index)
}

fn may_use(from: usize, to: usize) -> bool {
    if from == to {
        return true;
    }
    match LAYERS[from].uses {
        Uses::Below => to < from,
        Uses::Only(names) => names.contains(&LAYERS[to].name),
    }
}

// ---------------------------------------------------------------------------------------------
// The graph

struct Graph {
    /// module -> module it uses -> where (`file:line`).
    edges: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Graph {
    fn read() -> Graph {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let modules: BTreeSet<Vec<String>> = files
            .iter()
            .filter_map(|f| module_of(&src, f))
            .map(|(path, _)| path)
            .collect();
        let mut edges: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        for file in &files {
            let Some((module, binary)) = module_of(&src, file) else {
                continue;
            };
            let name = if binary {
                "main".to_owned()
            } else {
                display(&module)
            };
            let text = std::fs::read_to_string(file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            let shown = file
                .strip_prefix(src.parent().unwrap_or(&src))
                .unwrap_or(file)
                .display()
                .to_string();
            let uses = edges.entry(name.clone()).or_default();
            let tokens = without_test_items(lex(&text));
            for (path, line) in paths(&tokens, &module, binary, &modules) {
                let Some(target) = longest_module(&path, &modules) else {
                    continue;
                };
                // A module's own items are not uses (the binary is another crate).
                if target == module && !binary {
                    continue;
                }
                let at = format!("{shown}:{line}");
                let found = uses.entry(display(&target)).or_default();
                if !found.contains(&at) {
                    found.push(at);
                }
            }
        }
        Graph { edges }
    }

    /// The strongly connected components with more than one module (Tarjan).
    fn cycles(&self) -> Vec<Vec<String>> {
        struct State<'a> {
            graph: &'a Graph,
            index: BTreeMap<&'a str, usize>,
            low: BTreeMap<&'a str, usize>,
            stack: Vec<&'a str>,
            on_stack: BTreeSet<&'a str>,
            found: Vec<Vec<String>>,
        }
        fn visit<'a>(s: &mut State<'a>, v: &'a str) {
            let i = s.index.len();
            s.index.insert(v, i);
            s.low.insert(v, i);
            s.stack.push(v);
            s.on_stack.insert(v);
            let graph = s.graph;
            for w in graph.edges.get(v).into_iter().flat_map(|m| m.keys()) {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low = s.low[v].min(s.low[w]);
                    s.low.insert(v, low);
                } else if s.on_stack.contains(w) {
                    let low = s.low[v].min(s.index[w]);
                    s.low.insert(v, low);
                }
            }
            if s.low[v] == s.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = s.stack.pop() {
                    s.on_stack.remove(w);
                    scc.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    s.found.push(scc);
                }
            }
        }
        let mut state = State {
            graph: self,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            found: Vec::new(),
        };
        for v in self.edges.keys() {
            if !state.index.contains_key(v.as_str()) {
                visit(&mut state, v);
            }
        }
        state.found
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file is (its path from the crate root), and whether it is the binary's root.
fn module_of(src: &Path, file: &Path) -> Option<(Vec<String>, bool)> {
    let relative = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    match (parts.is_empty(), stem) {
        (true, "lib") => return Some((Vec::new(), false)),
        (true, "main") => return Some((Vec::new(), true)),
        (_, "mod") => {}
        _ => parts.push(stem.to_owned()),
    }
    Some((parts, false))
}

fn display(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

/// The longest prefix of `path` that is a module.
fn longest_module(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| modules.contains(prefix))
}

// ---------------------------------------------------------------------------------------------
// Reading Rust: just enough to find paths

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

impl Token {
    fn is(&self, c: char) -> bool {
        self.tok == Tok::Punct(c)
    }
    fn ident(&self) -> Option<&str> {
        match &self.tok {
            Tok::Ident(s) => Some(s),
            _ => None,
        }
    }
}

/// Identifiers, `::` and punctuation, with comments, strings, characters, lifetimes and numbers
/// left out.
fn lex(text: &str) -> Vec<Token> {
    let mut lexer = Lexer {
        chars: text.chars().collect(),
        i: 0,
        line: 1,
        out: Vec::new(),
    };
    while lexer.i < lexer.chars.len() {
        lexer.next();
    }
    lexer.out
}

struct Lexer {
    chars: Vec<char>,
    i: usize,
    line: usize,
    out: Vec<Token>,
}

impl Lexer {
    fn at(&self, i: usize) -> char {
        self.chars.get(i).copied().unwrap_or('\0')
    }

    fn is_word(c: char) -> bool {
        c.is_alphanumeric() || c == '_'
    }

    /// Moves past one character, counting lines.
    fn bump(&mut self) {
        if self.at(self.i) == '\n' {
            self.line += 1;
        }
        self.i += 1;
    }

    fn push(&mut self, tok: Tok) {
        let line = self.line;
        self.out.push(Token { tok, line });
    }

    fn next(&mut self) {
        let (c, next) = (self.at(self.i), self.at(self.i + 1));
        match c {
            _ if c.is_whitespace() => self.bump(),
            '/' if next == '/' => {
                while self.i < self.chars.len() && self.at(self.i) != '\n' {
                    self.bump();
                }
            }
            '/' if next == '*' => self.block_comment(),
            '"' => {
                self.bump();
                self.string(None);
            }
            '\'' => self.character_or_lifetime(),
            _ if c.is_ascii_digit() => {
                while Self::is_word(self.at(self.i)) {
                    self.bump();
                }
            }
            _ if c.is_alphabetic() || c == '_' => self.word(),
            ':' if next == ':' => {
                self.push(Tok::Sep);
                self.i += 2;
            }
            _ => {
                self.push(Tok::Punct(c));
                self.bump();
            }
        }
    }

    /// `/* .. */`, nested.
    fn block_comment(&mut self) {
        let mut depth = 0;
        while self.i < self.chars.len() {
            let (c, next) = (self.at(self.i), self.at(self.i + 1));
            if c == '/' && next == '*' {
                depth += 1;
                self.i += 2;
            } else if c == '*' && next == '/' {
                depth -= 1;
                self.i += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.bump();
            }
        }
    }

    /// A string's body, from just after its opening quote (`Some(hashes)`: a raw string).
    fn string(&mut self, raw: Option<usize>) {
        while self.i < self.chars.len() {
            match (self.at(self.i), raw) {
                ('\\', None) => {
                    self.bump();
                    self.bump();
                }
                ('"', None) => {
                    self.i += 1;
                    return;
                }
                ('"', Some(hashes)) if (1..=hashes).all(|k| self.at(self.i + k) == '#') => {
                    self.i += 1 + hashes;
                    return;
                }
                _ => self.bump(),
            }
        }
    }

    /// A character (`'a'`, `'\n'`, `'\u{7f}'`) or a lifetime (`'a`).
    fn character_or_lifetime(&mut self) {
        if self.at(self.i + 1) == '\\' {
            // The quote, the backslash and the escaped character (`'\''` included).
            self.i += 3;
            while self.i < self.chars.len() && self.at(self.i) != '\'' {
                self.i += 1;
            }
            self.i += 1;
        } else if self.at(self.i + 2) == '\'' {
            self.i += 3;
        } else {
            self.i += 1;
            while Self::is_word(self.at(self.i)) {
                self.i += 1;
            }
        }
    }

    /// An identifier or keyword, or a literal that starts like one (`r"..", b'x', br#".."#`).
    fn word(&mut self) {
        let start = self.i;
        while Self::is_word(self.at(self.i)) {
            self.i += 1;
        }
        let word: String = self.chars[start..self.i].iter().collect();
        let (c, next) = (self.at(self.i), self.at(self.i + 1));
        match (word.as_str(), c) {
            // A raw identifier: `r#type`.
            ("r", '#') if next.is_alphabetic() || next == '_' => {
                self.i += 1;
                let start = self.i;
                while Self::is_word(self.at(self.i)) {
                    self.i += 1;
                }
                let word: String = self.chars[start..self.i].iter().collect();
                self.push(Tok::Ident(word));
            }
            ("r" | "br" | "cr", '"' | '#') => {
                let mut hashes = 0;
                while self.at(self.i) == '#' {
                    hashes += 1;
                    self.i += 1;
                }
                self.i += 1;
                self.string(Some(hashes));
            }
            ("b" | "c", '"') => {
                self.i += 1;
                self.string(None);
            }
            ("b", '\'') => self.character_or_lifetime(),
            _ => self.push(Tok::Ident(word)),
        }
    }
}

/// The index just past the group opened at `i` (`(`, `[` or `{`), nested groups included.
fn past_group(tokens: &[Token], i: usize) -> usize {
    let mut depth = 0usize;
    let mut j = i;
    while j < tokens.len() {
        match tokens[j].tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// The tokens without `#[cfg(test)]` items (the attribute, the item's other attributes, and
/// the item up to its `;` or the end of its body).
fn without_test_items(tokens: Vec<Token>) -> Vec<Token> {
    let is_cfg_test = |i: usize| {
        let want = ["#", "[", "cfg", "(", "test", ")", "]"];
        want.iter().enumerate().all(|(k, w)| {
            tokens.get(i + k).is_some_and(|t| match &t.tok {
                Tok::Ident(s) => s == w,
                Tok::Punct(c) => w.len() == 1 && w.starts_with(*c),
                Tok::Sep => false,
            })
        })
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if !is_cfg_test(i) {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        i += 7;
        // Further attributes of the same item.
        while tokens.get(i).is_some_and(|t| t.is('#')) {
            i = past_group(&tokens, i + 1);
        }
        // `use` after an optional visibility (`pub`, `pub(crate)`).
        let mut k = i;
        if tokens.get(k).and_then(Token::ident) == Some("pub") {
            k += 1;
            if tokens.get(k).is_some_and(|t| t.is('(')) {
                k = past_group(&tokens, k);
            }
        }
        let is_use = tokens.get(k).and_then(Token::ident) == Some("use");
        while i < tokens.len() {
            let t = &tokens[i];
            if t.is(';') {
                i += 1;
                break;
            }
            if t.is('(') || t.is('[') || (t.is('{') && is_use) {
                i = past_group(&tokens, i);
                continue;
            }
            if t.is('{') {
                i = past_group(&tokens, i);
                break;
            }
            i += 1;
        }
    }
    out
}

/// A path from a `use` tree: its segments, and the name it brings into scope (None for a glob
/// or `as _`).
struct Import {
    segments: Vec<String>,
    name: Option<String>,
    line: usize,
}

/// Parses the use tree starting at `i` under `prefix`; returns the index after it.
fn use_tree(tokens: &[Token], mut i: usize, prefix: Vec<String>, out: &mut Vec<Import>) -> usize {
    let mut segments = prefix;
    let line = tokens.get(i).map_or(0, |t| t.line);
    loop {
        let Some(t) = tokens.get(i) else { return i };
        match &t.tok {
            Tok::Sep => i += 1,
            Tok::Ident(s) if s != "as" => {
                segments.push(s.clone());
                i += 1;
                if tokens.get(i).is_some_and(|t| t.tok == Tok::Sep) {
                    i += 1;
                    continue;
                }
                break;
            }
            Tok::Punct('{') => {
                i += 1;
                while tokens.get(i).is_some_and(|t| !t.is('}')) {
                    i = use_tree(tokens, i, segments.clone(), out);
                    if tokens.get(i).is_some_and(|t| t.is(',')) {
                        i += 1;
                    }
                }
                return i + 1;
            }
            Tok::Punct('*') => {
                out.push(Import {
                    segments,
                    name: None,
                    line,
                });
                return i + 1;
            }
            _ => break,
        }
    }
    // `tcp::{self, Route}`: `self` names the module itself.
    if segments.last().is_some_and(|s| s == "self") {
        segments.pop();
    }
    let mut name = segments.last().cloned();
    if tokens.get(i).and_then(Token::ident) == Some("as") {
        name = tokens
            .get(i + 1)
            .and_then(Token::ident)
            .filter(|n| *n != "_")
            .map(str::to_owned);
        i += 2;
    }
    out.push(Import {
        segments,
        name,
        line,
    });
    i
}

/// Every path of a file that may name a module of the crate, made absolute (segments from the
/// crate root), with its line.
fn paths(
    tokens: &[Token],
    file_module: &[String],
    binary: bool,
    modules: &BTreeSet<Vec<String>>,
) -> Vec<(Vec<String>, usize)> {
    let scopes = scopes(tokens, file_module);
    let mut resolver = Resolver {
        binary,
        modules,
        aliases: BTreeMap::new(),
    };
    let mut out = Vec::new();

    // The `use` items first: what they bring into scope resolves the paths in code.
    let mut in_use = vec![false; tokens.len()];
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i].ident() != Some("use") {
            i += 1;
            continue;
        }
        let mut found = Vec::new();
        let end = use_tree(tokens, i + 1, Vec::new(), &mut found).min(tokens.len());
        in_use[i..end].fill(true);
        for import in found {
            let Some(path) = resolver.resolve(&import.segments, &scopes[i]) else {
                continue;
            };
            if let Some(name) = import.name {
                resolver.aliases.insert(name, path.clone());
            }
            out.push((path, import.line));
        }
        i = end;
    }

    // Paths in code.
    let mut i = 0;
    while i < tokens.len() {
        let starts = !in_use[i]
            && tokens[i].ident().is_some()
            && tokens.get(i + 1).is_some_and(|t| t.tok == Tok::Sep)
            && (i == 0 || tokens[i - 1].tok != Tok::Sep);
        // `pub(in crate::proxy)` restricts visibility; it uses nothing.
        let visibility = i >= 1 && tokens[i - 1].ident() == Some("in");
        if !starts || visibility {
            i += 1;
            continue;
        }
        let mut segments = Vec::new();
        let mut j = i;
        while let Some(name) = tokens.get(j).and_then(Token::ident) {
            segments.push(name.to_owned());
            if tokens.get(j + 1).is_some_and(|t| t.tok == Tok::Sep) {
                j += 2;
            } else {
                break;
            }
        }
        if let Some(path) = resolver.resolve(&segments, &scopes[i]) {
            out.push((path, tokens[i].line));
        }
        i = j + 1;
    }
    out
}

/// The module each token is in: the file's, and the inline modules around the token.
fn scopes(tokens: &[Token], file_module: &[String]) -> Vec<Vec<String>> {
    let mut scopes = Vec::with_capacity(tokens.len());
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        if t.is('{') {
            depth += 1;
            if i >= 2
                && tokens[i - 2].ident() == Some("mod")
                && let Some(name) = tokens[i - 1].ident()
            {
                inline.push((name.to_owned(), depth));
            }
        }
        let mut scope = file_module.to_vec();
        scope.extend(inline.iter().map(|(n, _)| n.clone()));
        scopes.push(scope);
        if t.is('}') {
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
        }
    }
    scopes
}

/// Makes a file's paths absolute.
struct Resolver<'a> {
    /// The binary names the library `amazing_proxy`, and has no modules of its own.
    binary: bool,
    modules: &'a BTreeSet<Vec<String>>,
    /// What the file's `use` items brought into scope, by the name they gave it.
    aliases: BTreeMap<String, Vec<String>>,
}

impl Resolver<'_> {
    /// `segments` as a path from the crate root, seen from `scope`; `None` when it starts outside
    /// the crate (std, a dependency, a local name).
    fn resolve(&self, segments: &[String], scope: &[String]) -> Option<Vec<String>> {
        let (first, rest) = segments.split_first()?;
        let mut path = match first.as_str() {
            "crate" if !self.binary => Vec::new(),
            "amazing_proxy" if self.binary => Vec::new(),
            "self" => scope.to_vec(),
            "super" => {
                let ups = segments.iter().take_while(|s| *s == "super").count();
                let mut path = scope.get(..scope.len().checked_sub(ups)?)?.to_vec();
                path.extend(segments[ups..].iter().cloned());
                return Some(path);
            }
            name => match self.aliases.get(name) {
                Some(target) => target.clone(),
                None => {
                    let mut child = scope.to_vec();
                    child.push(name.to_owned());
                    if self.binary || !self.modules.contains(&child) {
                        return None;
                    }
                    child
                }
            },
        };
        path.extend(rest.iter().cloned());
        Some(path)
    }
}
