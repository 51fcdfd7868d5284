//! `cargo xtask layers`: the engine's import rules, checked from its source — the workflow
//! runtime's modules import only downwards in their layer order, and no two files of the
//! engine import each other, directly or around a cycle (decision 0007).
//!
//! Imports are read from the source text: every `crate::…`, `super::…` and `self::…` path,
//! in `use` declarations (braces expanded) and in expressions, resolved to the file of the
//! deepest module it names. A name a `lib.rs` or `mod.rs` re-exports (`pub use`) is followed
//! to where it is defined, so importing through a re-export counts as importing the defining
//! file, and the re-export itself is no edge.
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The workflow runtime's layers, lowest first: a file's layer is the first whose prefix its
/// module path (below `workflow`) starts with.
const LAYERS: &[(&str, u8)] = &[
    ("state", 1),
    ("outcome", 1),
    ("wire", 1),
    ("db", 2),
    ("batch", 3),
    ("ctx", 4),
    ("definition", 5),
    ("registry", 5),
    ("runtime", 6),
    ("exec", 7),
    ("entry", 8),
];

/// The engine crate's source folder, from the workspace root.
const ENGINE_SRC: &str = "workflows/engine/src";

pub fn run(root: &Path) -> Result<()> {
    let problems = check(&root.join(ENGINE_SRC))?;
    if problems.is_empty() {
        println!("layers: the engine's imports follow the layer order, with no cycles");
        return Ok(());
    }
    for p in &problems {
        eprintln!("  {p}");
    }
    bail!("{} import rule(s) broken in {ENGINE_SRC}", problems.len())
}

/// Every broken rule under `src`, as a sentence naming the files.
fn check(src: &Path) -> Result<Vec<String>> {
    let crate_ = Crate::read(src)?;
    let edges = crate_.edges();
    let mut problems = Vec::new();
    for (from, targets) in &edges {
        let Some(own) = layer(from) else { continue };
        for to in targets {
            if let Some(theirs) = layer(to)
                && theirs > own
            {
                problems.push(format!(
                    "{} (layer {own}) imports {} (layer {theirs}): layers import only downwards",
                    crate_.name(from),
                    crate_.name(to)
                ));
            }
        }
    }
    for cycle in cycles(&edges) {
        let names: Vec<String> = cycle.iter().map(|m| crate_.name(m)).collect();
        problems.push(format!("import cycle between {}", names.join(", ")));
    }
    Ok(problems)
}

/// A module path: `[]` is the crate root, `["workflow", "db"]` is `workflow/db/mod.rs`.
type Module = Vec<String>;

/// The layer of a module inside `workflow` (`None` outside it, and for `workflow` itself).
fn layer(module: &Module) -> Option<u8> {
    match module.as_slice() {
        [top, first, ..] if top == "workflow" => LAYERS
            .iter()
            .find(|(name, _)| name == first)
            .map(|(_, l)| *l),
        _ => None,
    }
}

/// The crate's files, by module.
struct Crate {
    files: BTreeMap<Module, File>,
}

struct File {
    path: PathBuf,
    /// Whether the module has children (`lib.rs`, `mod.rs`): its `super` is its parent's.
    is_dir: bool,
    /// Source without comments.
    code: String,
}

impl Crate {
    fn read(src: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir:?}"))? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                    continue;
                }
                let rel = path.strip_prefix(src)?;
                let mut module: Module = rel
                    .with_extension("")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                let is_dir = matches!(module.last().map(String::as_str), Some("mod" | "lib"));
                if is_dir {
                    module.pop();
                }
                let text = std::fs::read_to_string(&path)?;
                files.insert(
                    module,
                    File {
                        path: rel.to_path_buf(),
                        is_dir,
                        code: strip_comments(&text),
                    },
                );
            }
        }
        Ok(Self { files })
    }

    fn name(&self, module: &Module) -> String {
        self.files
            .get(module)
            .map_or_else(|| module.join("::"), |f| f.path.display().to_string())
    }

    /// Each file's imports, resolved to the files they name.
    fn edges(&self) -> BTreeMap<Module, BTreeSet<Module>> {
        let mut edges = BTreeMap::new();
        for (module, file) in &self.files {
            let mut targets = BTreeSet::new();
            for (path, reexport) in paths(&file.code) {
                if reexport && file.is_dir {
                    continue;
                }
                if let Some(target) = self.resolve(module, file.is_dir, &path, 0)
                    && &target != module
                {
                    targets.insert(target);
                }
            }
            edges.insert(module.clone(), targets);
        }
        edges
    }

    /// The file `path` (as written in `module`) names, following re-exports.
    fn resolve(&self, module: &Module, is_dir: bool, path: &[String], depth: u8) -> Option<Module> {
        let (first, rest) = path.split_first()?;
        let mut at: Module = match first.as_str() {
            "crate" => Vec::new(),
            "self" if is_dir => module.clone(),
            "self" => module.clone(),
            "super" => {
                let mut m = module.clone();
                if !is_dir {
                    m.pop();
                }
                m.pop();
                m
            }
            _ => return None,
        };
        let mut rest = rest;
        // Further `super`s climb on.
        while let Some((seg, tail)) = rest.split_first() {
            if seg != "super" {
                break;
            }
            at.pop();
            rest = tail;
        }
        for (i, seg) in rest.iter().enumerate() {
            let mut next = at.clone();
            next.push(seg.clone());
            if self.files.contains_key(&next) {
                at = next;
                continue;
            }
            // An item of `at`: follow it if `at` re-exports it.
            if depth < 8
                && let Some(file) = self.files.get(&at)
                && file.is_dir
                && let Some(source) = reexport(&file.code, seg)
            {
                let mut followed = source;
                followed.extend(rest[i + 1..].iter().cloned());
                return self.resolve(&at, true, &followed, depth + 1);
            }
            break;
        }
        self.files.contains_key(&at).then_some(at)
    }
}

/// Where a `pub use` of `module_code` takes `item` from (its path, ending in the item).
fn reexport(module_code: &str, item: &str) -> Option<Vec<String>> {
    paths(module_code)
        .into_iter()
        .filter(|(_, reexport)| *reexport)
        .map(|(path, _)| path)
        .find(|path| path.last().is_some_and(|last| last == item))
        .map(|path| {
            // `pub use child::Item` is relative to the module itself.
            match path.first().map(String::as_str) {
                Some("crate" | "super" | "self") => path,
                _ => std::iter::once("self".to_string()).chain(path).collect(),
            }
        })
}

/// Every path in `code`: those of `use` declarations (braces expanded; `true` for a `pub use`)
/// and every `crate::`/`super::`/`self::` path elsewhere.
fn paths(code: &str) -> Vec<(Vec<String>, bool)> {
    let mut out = Vec::new();
    let mut rest = code;
    let mut outside = String::new();
    while let Some(i) = find_use(rest) {
        outside.push_str(&rest[..i]);
        let decl_start = i;
        let end = rest[decl_start..]
            .find(';')
            .map_or(rest.len(), |e| decl_start + e);
        let decl = &rest[decl_start..end];
        let public = decl.trim_start().starts_with("pub");
        let body = decl
            .trim_start()
            .trim_start_matches("pub(crate)")
            .trim_start_matches("pub")
            .trim_start()
            .trim_start_matches("use")
            .trim();
        for path in expand(body) {
            out.push((path, public));
        }
        rest = &rest[end.min(rest.len())..];
    }
    outside.push_str(rest);
    for path in inline_paths(&outside) {
        out.push((path, false));
    }
    out
}

/// The byte offset of the next `use` declaration (at a line start, maybe `pub`/`pub(crate)`).
fn find_use(code: &str) -> Option<usize> {
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with("use ") || t.starts_with("pub use ") || t.starts_with("pub(crate) use ") {
            return Some(offset + (line.len() - t.len()));
        }
        offset += line.len();
    }
    None
}

/// The paths of a use tree (`a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`); `self` in
/// braces names the prefix, `as` renames are dropped.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree);
        let segs: Vec<String> = path
            .split("::")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "*")
            .collect();
        return if segs.is_empty() { vec![] } else { vec![segs] };
    };
    let prefix: Vec<String> = tree[..open]
        .split("::")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut out = Vec::new();
    for part in split_top(inner) {
        if part.trim() == "self" {
            out.push(prefix.clone());
            continue;
        }
        for sub in expand(&part) {
            let mut p = prefix.clone();
            p.extend(sub);
            out.push(p);
        }
    }
    out
}

/// Splits at commas outside braces.
fn split_top(s: &str) -> Vec<String> {
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0i32, String::new());
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// `crate::a::b`-like paths outside `use` declarations.
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = ["crate::", "super::", "self::"]
            .iter()
            .find(|p| code[i..].starts_with(**p));
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let (Some(_), true) = (starts, boundary) else {
            i += 1;
            continue;
        };
        let mut j = i;
        while j < bytes.len()
            && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_' || bytes[j] == b':')
        {
            j += 1;
        }
        let segs: Vec<String> = code[i..j]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        out.push(segs);
        i = j;
    }
    out
}

/// `text` without `//` comments (doc comments too: their links are not imports). String
/// literals are kept; the paths this looks for do not occur in them.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The file-level import cycles (strongly connected components of more than one file).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Tarjan<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: HashMap<&'a Module, usize>,
        low: HashMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a Module) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            let edges = self.edges;
            for w in edges.get(v).into_iter().flatten() {
                if !edges.contains_key(w) {
                    continue;
                }
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low[v];
                    self.low.insert(v, lv.min(lw));
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low[v];
                    self.low.insert(v, lv.min(iw));
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lf-layers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn use_trees_expand() {
        assert_eq!(
            expand("super::db::{StepAt, lock::{Locked, lock_step}, self}"),
            vec![
                vec!["super", "db", "StepAt"],
                vec!["super", "db", "lock", "Locked"],
                vec!["super", "db", "lock", "lock_step"],
                vec!["super", "db"],
            ]
        );
        assert_eq!(expand("crate::Store as S"), vec![vec!["crate", "Store"]]);
    }

    #[test]
    fn an_upward_import_and_a_cycle_are_reported_and_the_engine_passes() {
        let dir = tmp("bad");
        write(
            &dir,
            &[
                (
                    "lib.rs",
                    "pub mod a;\npub mod b;\npub mod workflow;\npub use a::A;\n",
                ),
                ("a.rs", "use crate::b::B;\npub struct A;\n"),
                ("b.rs", "use crate::A;\npub struct B;\n"),
                ("workflow/mod.rs", "pub mod db;\npub mod exec;\n"),
                (
                    "workflow/db/mod.rs",
                    "use super::exec::run;\n// super::exec in a comment\n",
                ),
                ("workflow/exec/mod.rs", "pub fn run() { super::db::x(); }\n"),
            ],
        );
        let problems = check(&dir).expect("checked");
        assert!(
            problems.iter().any(|p| p
                .contains("workflow/db/mod.rs (layer 2) imports workflow/exec/mod.rs (layer 7)")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("cycle") && p.contains("a.rs") && p.contains("b.rs")),
            "{problems:?}"
        );
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        assert_eq!(
            check(&root.join(ENGINE_SRC)).expect("checked"),
            Vec::<String>::new()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
