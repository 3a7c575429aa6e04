//! The crate's files import one another without a circle: data flows one way (read → forward
//! → Gram → solve → write), and a `mod.rs` only declares and re-exports what its folder's
//! files define. Read from the sources as text: every `use` tree, every `crate::`, `super::`
//! and `self::` path, and bare paths into a module's own children, resolved to the file that
//! defines the item (through one level of `pub use`). Test modules are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every module file under `src/` (the library; the CLI in `src/cli/` is a crate of its own).
fn modules(src: &Path) -> BTreeMap<Module, String> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<Module, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "cli") {
                    walk(&path, src, out);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut m: Module = rel
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if m.last().is_some_and(|l| l == "mod") {
                m.pop();
            }
            if m == ["lib"] {
                m.clear();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.insert(m, strip(&text));
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The source without comments and without its `#[cfg(test)]` module.
fn strip(text: &str) -> String {
    let code: Vec<&str> = text
        .lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect();
    let code = code.join("\n");
    match code.find("#[cfg(test)]") {
        Some(i) => code[..i].to_string(),
        None => code,
    }
}

/// Byte ranges of inline modules (`mod x { … }`): `super` inside one names the file's module.
fn inline_modules(code: &str) -> Vec<(usize, usize)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("mod ") {
        let at = from + i;
        from = at + 4;
        let rest = &code[at + 4..];
        let name_len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(0);
        let after = rest[name_len..].trim_start();
        let word_start =
            at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if name_len == 0 || !word_start || !after.starts_with('{') {
            continue;
        }
        let open = at + 4 + name_len + (rest[name_len..].len() - after.len());
        let mut depth = 0;
        for (j, &b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        out.push((at, j));
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// A `use` tree (`a::{b, c::{d, e as f}}`) as its paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = Vec::new();
    fn split_top(t: &str) -> Vec<&str> {
        let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
        for (i, c) in t.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&t[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&t[start..]);
        parts.into_iter().filter(|p| !p.is_empty()).collect()
    }
    fn rec(prefix: &[String], t: &str, out: &mut Vec<Vec<String>>) {
        for part in split_top(t) {
            match part.find('{') {
                Some(i) => {
                    let mut p = prefix.to_vec();
                    p.extend(
                        part[..i]
                            .split("::")
                            .filter(|s| !s.is_empty())
                            .map(String::from),
                    );
                    rec(&p, &part[i + 1..part.len() - 1], out);
                }
                None => {
                    let part = part.split("as").next().unwrap_or(part);
                    let mut p = prefix.to_vec();
                    p.extend(part.split("::").filter(|s| !s.is_empty()).map(String::from));
                    out.push(p);
                }
            }
        }
    }
    rec(&[], &tree, &mut out);
    out
}

/// A path written in module `m` (inside `inline` inline modules) as a path from the crate root.
fn absolute(
    mods: &BTreeMap<Module, String>,
    m: &Module,
    segs: &[String],
    inline: usize,
) -> Option<Vec<String>> {
    let mut segs = segs.to_vec();
    for _ in 0..inline {
        if segs.first().is_some_and(|s| s == "super") {
            segs[0] = "self".into();
        }
    }
    match segs.first()?.as_str() {
        "crate" | "regmean_gpu" => Some(segs[1..].to_vec()),
        "self" => Some(m.iter().cloned().chain(segs[1..].iter().cloned()).collect()),
        "super" => {
            let mut base = m.clone();
            let mut i = 0;
            while segs.get(i).is_some_and(|s| s == "super") {
                base.pop();
                i += 1;
            }
            Some(base.into_iter().chain(segs[i..].iter().cloned()).collect())
        }
        first => {
            let mut child = m.clone();
            child.push(first.to_string());
            mods.contains_key(&child)
                .then(|| m.iter().cloned().chain(segs.iter().cloned()).collect())
        }
    }
}

/// The module file that `path` (from the crate root) lies in, and what follows it.
fn resolve<'p>(mods: &BTreeMap<Module, String>, path: &'p [String]) -> (Module, &'p [String]) {
    (0..=path.len())
        .rev()
        .map(|k| (path[..k].to_vec(), &path[k..]))
        .find(|(m, _)| mods.contains_key(m))
        .unwrap_or((Vec::new(), path))
}

/// Every path module `m` writes, from the crate root.
fn paths(mods: &BTreeMap<Module, String>, m: &Module, code: &str) -> Vec<Vec<String>> {
    let inline = inline_modules(code);
    let depth = |at: usize| inline.iter().filter(|(a, b)| *a <= at && at <= *b).count();
    let mut out = Vec::new();
    let mut push = |segs: &[String], at: usize| {
        if let Some(a) = absolute(mods, m, segs, depth(at)) {
            out.push(a);
        }
    };
    let mut from = 0;
    while let Some(i) = code[from..].find("use ") {
        let at = from + i;
        from = at + 4;
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = code[at..].find(';') else {
            break;
        };
        for p in expand(&code[at + 4..at + end]) {
            push(&p, at);
        }
    }
    let children: Vec<String> = mods
        .keys()
        .filter(|k| k.len() == m.len() + 1 && k.starts_with(m))
        .map(|k| k.last().unwrap().clone())
        .collect();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    for (at, _) in code.match_indices("::") {
        let start = code[..at]
            .rfind(|c: char| !is_ident(c))
            .map_or(0, |i| i + 1);
        if code[..start].ends_with("::") {
            continue;
        }
        let word = &code[start..at];
        if !["crate", "super", "self"].contains(&word) && !children.iter().any(|c| c == word) {
            continue;
        }
        let mut segs = vec![word.to_string()];
        let mut rest = &code[at..];
        while let Some(r) = rest.strip_prefix("::") {
            let len = r.find(|c: char| !is_ident(c)).unwrap_or(r.len());
            if len == 0 {
                break;
            }
            segs.push(r[..len].to_string());
            rest = &r[len..];
        }
        if !["crate", "super", "self"].contains(&word) {
            segs.insert(0, "self".into());
        }
        push(&segs, start);
    }
    out
}

/// The import graph between module files.
fn graph(mods: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    // (module, name) → the module that defines what `pub use` re-exports there.
    let mut reexports = BTreeMap::new();
    for (m, code) in mods {
        let mut from = 0;
        while let Some(i) = code[from..].find("use ") {
            let at = from + i;
            from = at + 4;
            let before = code[..at].trim_end();
            if !(before.ends_with("pub") || before.ends_with("pub(crate)")) {
                continue;
            }
            let Some(end) = code[at..].find(';') else {
                break;
            };
            for p in expand(&code[at + 4..at + end]) {
                if let Some(a) = absolute(mods, m, &p, 0) {
                    let (target, rest) = resolve(mods, &a);
                    if &target != m {
                        if let Some(name) = rest.last() {
                            reexports.insert((m.clone(), name.clone()), target);
                        }
                    }
                }
            }
        }
    }
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, code) in mods {
        for path in paths(mods, m, code) {
            let (mut target, rest) = resolve(mods, &path);
            if let Some(first) = rest.first() {
                if let Some(t) = reexports.get(&(target.clone(), first.clone())) {
                    target = t.clone();
                }
            }
            // `use super::*`-style references to an ancestor itself are no import.
            let ancestor = target.len() < m.len() && m.starts_with(&target) && rest.is_empty();
            if &target != m && !ancestor {
                edges.entry(m.clone()).or_default().insert(target);
            }
        }
    }
    edges
}

/// The import circles (strongly connected components of more than one file), Tarjan's way.
fn circles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_file_of_the_library_imports_a_file_that_imports_it_back() {
    let mods = modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let edges = graph(&mods);
    let found: Vec<String> = circles(&edges)
        .iter()
        .map(|c| {
            let members: BTreeSet<&Module> = c.iter().collect();
            c.iter()
                .map(|m| {
                    let inside: Vec<String> = edges[m]
                        .iter()
                        .filter(|t| members.contains(t))
                        .map(name)
                        .collect();
                    format!("{} → {}", name(m), inside.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    assert!(found.is_empty(), "import circles: {}", found.join(" | "));
}

#[test]
fn the_checker_sees_a_circle_through_a_re_export_and_a_child_path() {
    let file = |code: &str| strip(code);
    let mods: BTreeMap<Module, String> = [
        (vec![], file("pub mod a;\npub mod b;\n")),
        (
            vec!["a".to_string()],
            file("mod inner;\npub use inner::Thing;\nfn f() { let _ = inner::helper(); }\n"),
        ),
        (
            vec!["a".into(), "inner".into()],
            file("pub struct Thing;\npub fn helper() {}\n"),
        ),
        (
            vec!["b".to_string()],
            file("use crate::a::Thing;\npub struct Other;\n"),
        ),
    ]
    .into_iter()
    .collect();
    assert!(circles(&graph(&mods)).is_empty());
    let mut with_circle = mods.clone();
    with_circle.insert(
        vec!["a".into(), "inner".into()],
        file("use crate::b::Other;\npub struct Thing;\npub fn helper() {}\n"),
    );
    let found = circles(&graph(&with_circle));
    assert_eq!(found.len(), 1, "{found:?}");
    let members: BTreeSet<String> = found[0].iter().map(name).collect();
    assert_eq!(
        members,
        ["a::inner", "b"].iter().map(|s| s.to_string()).collect()
    );
}
