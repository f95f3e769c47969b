//! Everything the release binary compiles in is inside what the Dockerfile's build stage copies
//! (issue 23: `include_str!("../../Docs/…")` broke the image for weeks and no test noticed, because
//! no container engine runs here). Without building anything, this reads the crate as rustc does:
//!
//! - the module tree from `src/main.rs` and `src/lib.rs`, following `mod x;` to its file and
//!   skipping every item whose `#[cfg]` is false when `test` is off (what a release build
//!   compiles); any other `cfg` counts as compiled, so the check errs towards failing;
//! - every `include_str!` / `include_bytes!` / `include!` in it, also inside other macros;
//! - a `build.rs`, if there is one: the script itself and every file it names with
//!   `cargo:rerun-if-changed=` (a build script must declare what it reads for cargo anyway);
//!
//! and the Dockerfile as Docker reads it: the stage that runs the last `cargo build`, its
//! `COPY`s (without `--from`) before that `RUN`, its `WORKDIR`, and `.dockerignore`. A file is
//! covered when a `COPY` puts it at the same path under the crate root that rustc resolved.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::{self, Visit};

const INCLUDE_MACROS: [&str; 3] = ["include_str", "include_bytes", "include"];

/// One file the build reads: `file` (relative to the crate root), read because of `by`.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Embed {
    by: String,
    file: String,
}

/// `file` of `root` as a clean relative path (`a/b/../c` → `a/c`); an error when it leaves `root`.
fn relative(root: &Path, file: &Path) -> Result<String, String> {
    let rel = file
        .strip_prefix(root)
        .map_err(|_| format!("{} is not under {}", file.display(), root.display()))?;
    let mut parts: Vec<&str> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().ok_or("a path that is not UTF-8")?),
            Component::ParentDir => {
                parts
                    .pop()
                    .ok_or_else(|| format!("{} points outside the crate", rel.display()))?;
            }
            Component::CurDir => {}
            _ => return Err(format!("unexpected path {}", rel.display())),
        }
    }
    Ok(parts.join("/"))
}

/// Whether `#[cfg(…)]` holds in a release build: `test` is false, `not`/`all`/`any` as rustc
/// reads them, anything else (features, target_os, …) true.
fn cfg_holds(meta: &syn::Meta) -> bool {
    match meta {
        syn::Meta::Path(p) => !p.is_ident("test"),
        syn::Meta::NameValue(_) => true,
        syn::Meta::List(list) => {
            let args: Vec<syn::Meta> = list
                .parse_args_with(
                    syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
                )
                .map(|p| p.into_iter().collect())
                .unwrap_or_default();
            if list.path.is_ident("not") {
                !args.first().is_some_and(cfg_holds)
            } else if list.path.is_ident("all") {
                args.iter().all(cfg_holds)
            } else if list.path.is_ident("any") {
                args.iter().any(cfg_holds)
            } else {
                true
            }
        }
    }
}

fn compiled(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg"))
        .all(|a| a.parse_args::<syn::Meta>().map_or(true, |m| cfg_holds(&m)))
}

/// Walks one source file: collects includes, and the files of `mod x;` declarations to walk next.
struct FileVisitor<'a> {
    root: &'a Path,
    /// The file being read (includes resolve against its folder).
    file: PathBuf,
    /// Where `mod x;` looks for `x.rs` / `x/mod.rs` (changes inside inline `mod x { … }`).
    mod_dirs: Vec<PathBuf>,
    embeds: Vec<Embed>,
    modules: Vec<(PathBuf, PathBuf)>,
    errors: Vec<String>,
}

impl FileVisitor<'_> {
    fn include(&mut self, literal: Result<syn::LitStr, syn::Error>, name: &str) {
        let by = relative(self.root, &self.file).unwrap_or_default();
        let lit = match literal {
            Ok(lit) => lit,
            Err(_) => {
                self.errors.push(format!(
                    "{by}: {name}! without a string literal cannot be checked; use a literal path"
                ));
                return;
            }
        };
        let target = self.file.parent().unwrap().join(lit.value());
        match relative(self.root, &target) {
            Ok(file) => self.embeds.push(Embed { by, file }),
            Err(e) => self.errors.push(format!("{by}: {name}!: {e}")),
        }
    }

    /// Include macros anywhere in a token stream (inside `concat!`, `vec!`, `json!`, …).
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, token) in tokens.iter().enumerate() {
            match token {
                TokenTree::Ident(ident) if INCLUDE_MACROS.iter().any(|m| ident == m) => {
                    let bang = matches!(tokens.get(i + 1), Some(TokenTree::Punct(p)) if p.as_char() == '!');
                    if let (true, Some(TokenTree::Group(group))) = (bang, tokens.get(i + 2)) {
                        let name = ident.to_string();
                        self.include(syn::parse2(group.stream()), &name);
                    }
                }
                TokenTree::Group(group) => self.scan_tokens(group.stream()),
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for FileVisitor<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::ExternCrate(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::ForeignMod(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Macro(i) => &i.attrs,
            syn::Item::Mod(i) => &i.attrs,
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::TraitAlias(i) => &i.attrs,
            syn::Item::Type(i) => &i.attrs,
            syn::Item::Union(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            _ => &[],
        };
        if compiled(attrs) {
            visit::visit_item(self, item);
        }
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let name = m.ident.to_string();
        let dir = self.mod_dirs.last().unwrap().clone();
        if m.attrs.iter().any(|a| a.path().is_ident("path")) {
            let by = relative(self.root, &self.file).unwrap_or_default();
            self.errors.push(format!(
                "{by}: #[path] on mod {name} is not followed by this check; teach it, or drop #[path]"
            ));
            return;
        }
        match &m.content {
            Some(_) => {
                self.mod_dirs.push(dir.join(&name));
                visit::visit_item_mod(self, m);
                self.mod_dirs.pop();
            }
            None => {
                let flat = dir.join(format!("{name}.rs"));
                let nested = dir.join(&name).join("mod.rs");
                let file = if flat.exists() { flat } else { nested };
                self.modules.push((file, dir.join(&name)));
            }
        }
    }

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        let attrs: &[syn::Attribute] = match item {
            syn::ImplItem::Const(i) => &i.attrs,
            syn::ImplItem::Fn(i) => &i.attrs,
            syn::ImplItem::Type(i) => &i.attrs,
            syn::ImplItem::Macro(i) => &i.attrs,
            _ => &[],
        };
        if compiled(attrs) {
            visit::visit_impl_item(self, item);
        }
    }

    fn visit_trait_item(&mut self, item: &'ast syn::TraitItem) {
        let attrs: &[syn::Attribute] = match item {
            syn::TraitItem::Const(i) => &i.attrs,
            syn::TraitItem::Fn(i) => &i.attrs,
            syn::TraitItem::Type(i) => &i.attrs,
            syn::TraitItem::Macro(i) => &i.attrs,
            _ => &[],
        };
        if compiled(attrs) {
            visit::visit_trait_item(self, item);
        }
    }

    fn visit_local(&mut self, local: &'ast syn::Local) {
        if compiled(&local.attrs) {
            visit::visit_local(self, local);
        }
    }

    fn visit_arm(&mut self, arm: &'ast syn::Arm) {
        if compiled(&arm.attrs) {
            visit::visit_arm(self, arm);
        }
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        let last = mac.path.segments.last().map(|s| s.ident.to_string());
        match last.as_deref() {
            Some(name) if INCLUDE_MACROS.contains(&name) => {
                self.include(mac.parse_body(), name);
            }
            _ => self.scan_tokens(mac.tokens.clone()),
        }
    }
}

/// Every file the release build reads, from the module tree and `build.rs`.
fn embedded_files(root: &Path) -> Result<Vec<Embed>, Vec<String>> {
    let src = root.join("src");
    let mut queue: Vec<(PathBuf, PathBuf)> = ["main.rs", "lib.rs"]
        .iter()
        .map(|f| (src.join(f), src.clone()))
        .filter(|(f, _)| f.exists())
        .collect();
    let mut embeds = BTreeSet::new();
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    let build_rs = root.join("build.rs");
    if build_rs.exists() {
        let text = fs::read_to_string(&build_rs).unwrap();
        for (i, _) in text.match_indices("rerun-if-changed=") {
            let rest = &text[i + "rerun-if-changed=".len()..];
            let path: String = rest.chars().take_while(|c| *c != '"').collect();
            if let Ok(file) = relative(root, &root.join(path)) {
                embeds.insert(Embed {
                    by: "build.rs".into(),
                    file,
                });
            }
        }
        embeds.insert(Embed {
            by: "Cargo".into(),
            file: "build.rs".into(),
        });
        queue.push((build_rs, root.to_path_buf()));
    }
    while let Some((file, mod_dir)) = queue.pop() {
        if !seen.insert(file.clone()) {
            continue;
        }
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("cannot read {}: {e}", file.display()));
                continue;
            }
        };
        let parsed = match syn::parse_file(&text) {
            Ok(p) => p,
            Err(e) => {
                errors.push(format!("cannot parse {}: {e}", file.display()));
                continue;
            }
        };
        let mut v = FileVisitor {
            root,
            file: file.clone(),
            mod_dirs: vec![mod_dir],
            embeds: Vec::new(),
            modules: Vec::new(),
            errors: Vec::new(),
        };
        v.visit_file(&parsed);
        embeds.extend(v.embeds);
        errors.extend(v.errors);
        queue.extend(v.modules);
    }
    if errors.is_empty() {
        Ok(embeds.into_iter().collect())
    } else {
        Err(errors)
    }
}

/// A `COPY` of the build stage: context sources to an image destination.
struct Copy {
    sources: Vec<String>,
    dest: String,
}

/// The build stage's copies before its last `cargo build`, and the folder that build runs in.
fn build_stage(dockerfile: &str) -> Result<(Vec<Copy>, String), String> {
    // Docker's line continuations, then one instruction per line, comments dropped.
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if current.is_empty() && (t.starts_with('#') || t.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(t);
            lines.push(std::mem::take(&mut current));
        }
    }
    let last_build = lines
        .iter()
        .rposition(|l| l.starts_with("RUN") && l.contains("cargo build"))
        .ok_or("the Dockerfile has no RUN … cargo build")?;
    let stage_start = lines[..last_build]
        .iter()
        .rposition(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .ok_or("the cargo build is in no stage")?;
    let mut workdir = String::from("/");
    let mut copies = Vec::new();
    for line in &lines[stage_start..last_build] {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instruction.to_ascii_uppercase().as_str() {
            "WORKDIR" => workdir = image_path(&workdir, rest.trim()),
            "COPY" | "ADD" => {
                let args: Vec<String> = if rest.trim_start().starts_with('[') {
                    serde_json::from_str(rest.trim()).map_err(|e| format!("{line}: {e}"))?
                } else {
                    rest.split_whitespace().map(String::from).collect()
                };
                if args.iter().any(|a| a.starts_with("--from")) {
                    continue;
                }
                let mut paths: Vec<String> =
                    args.into_iter().filter(|a| !a.starts_with("--")).collect();
                let dest = paths
                    .pop()
                    .ok_or_else(|| format!("{line}: no destination"))?;
                copies.push(Copy {
                    sources: paths,
                    dest: {
                        let mut d = image_path(&workdir, &dest);
                        if dest.ends_with('/') && !d.ends_with('/') {
                            d.push('/');
                        }
                        d
                    },
                });
            }
            _ => {}
        }
    }
    Ok((copies, workdir))
}

/// `path` in the image, resolved against `workdir` and cleaned.
fn image_path(workdir: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{workdir}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where a `COPY` puts context file `file`, if it copies it at all.
fn copied_to(copy: &Copy, file: &str, root: &Path) -> Option<String> {
    let many = copy.sources.len() > 1;
    copy.sources.iter().find_map(|source| {
        let source = source.trim_start_matches("./").trim_end_matches('/');
        let into_dir = many || copy.dest.ends_with('/');
        if source == "." {
            Some(image_path(&copy.dest, file))
        } else if root.join(source).is_dir() {
            let under = file.strip_prefix(source)?.strip_prefix('/')?;
            Some(image_path(&copy.dest, under))
        } else if file == source {
            let base = file.rsplit('/').next().unwrap();
            Some(if into_dir {
                image_path(&copy.dest, base)
            } else {
                image_path("/", &copy.dest)
            })
        } else {
            None
        }
    })
}

/// Docker's `.dockerignore` match: `*` and `?` within a segment, `**` across segments; a pattern
/// that matches a folder excludes what is under it.
fn ignored_by(patterns: &str, file: &str) -> Option<String> {
    fn segment(p: &str, s: &str) -> bool {
        let (p, s): (Vec<char>, Vec<char>) = (p.chars().collect(), s.chars().collect());
        fn go(p: &[char], s: &[char]) -> bool {
            match (p.first(), s.first()) {
                (None, None) => true,
                (Some('*'), _) => go(&p[1..], s) || (!s.is_empty() && go(p, &s[1..])),
                (Some('?'), Some(_)) => go(&p[1..], &s[1..]),
                (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
                _ => false,
            }
        }
        go(&p, &s)
    }
    fn prefix(p: &[&str], s: &[&str]) -> bool {
        match (p.first(), s.first()) {
            (None, _) => true,
            (Some(&"**"), _) => (0..=s.len()).any(|k| prefix(&p[1..], &s[k..])),
            (Some(a), Some(b)) => segment(a, b) && prefix(&p[1..], &s[1..]),
            (Some(_), None) => false,
        }
    }
    let parts: Vec<&str> = file.split('/').collect();
    let mut excluded = None;
    for line in patterns.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negated, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pattern: Vec<&str> = pattern
            .trim_matches('/')
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        if prefix(&pattern, &parts) {
            excluded = (!negated).then(|| line.to_string());
        }
    }
    excluded
}

/// What the image build would miss, one sentence a file; empty when it builds.
fn uncopied(root: &Path) -> Vec<String> {
    let embeds = match embedded_files(root) {
        Ok(e) => e,
        Err(errors) => return errors,
    };
    let dockerfile = fs::read_to_string(root.join("Dockerfile")).unwrap_or_default();
    let (copies, workdir) = match build_stage(&dockerfile) {
        Ok(stage) => stage,
        Err(e) => return vec![format!("Dockerfile: {e}")],
    };
    let ignore = fs::read_to_string(root.join(".dockerignore")).unwrap_or_default();
    let mut problems = Vec::new();
    for Embed { by, file } in embeds {
        let wanted = image_path(&workdir, &file);
        if !copies
            .iter()
            .any(|c| copied_to(c, &file, root).as_deref() == Some(wanted.as_str()))
        {
            problems.push(format!(
                "{by} reads {file}, which the Dockerfile's build stage does not copy: add \
                 `COPY {file} ./{file}` before its last `cargo build`, or move the file under a \
                 folder it copies (src/)"
            ));
        } else if let Some(pattern) = ignored_by(&ignore, &file) {
            problems.push(format!(
                "{by} reads {file}, which .dockerignore leaves out of the build context \
                 (pattern `{pattern}`)"
            ));
        }
    }
    problems
}

#[test]
fn everything_the_release_binary_embeds_is_copied_by_the_docker_build_stage() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let problems = uncopied(root);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The check saw the real includes, and left out the ones only tests compile.
    let files: Vec<String> = embedded_files(root)
        .unwrap()
        .into_iter()
        .map(|e| e.file)
        .collect();
    for expected in [
        "src/domain/pricing.json",
        "src/http/pages/dashboard.html",
        "src/http/pages/stream-chat.mjs",
    ] {
        assert!(files.iter().any(|f| f == expected), "{expected}: {files:?}");
    }
    for test_only in ["Docs/API.md", "env_template.txt", "Docs/CONFIGURATION.md"] {
        assert!(
            !files.iter().any(|f| f == test_only),
            "{test_only}: {files:?}"
        );
    }
}

/// A crate laid out as the repository was before issue 23, built by the shipped Dockerfile: the
/// check names the file, who reads it, and the missing `COPY`.
#[test]
fn the_check_names_an_embedded_file_the_build_stage_does_not_copy() {
    let crate_root = tempfile::tempdir().unwrap();
    let root = crate_root.path();
    let write = |path: &str, text: &str| {
        let path = root.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    write(
        "Dockerfile",
        &fs::read_to_string(repo.join("Dockerfile")).unwrap(),
    );
    write(
        ".dockerignore",
        &fs::read_to_string(repo.join(".dockerignore")).unwrap(),
    );
    write("Cargo.toml", "[package]\nname = \"x\"\n");
    write("Cargo.lock", "");
    write("src/main.rs", "fn main() { x::run() }\n");
    write("src/lib.rs", "mod http;\n#[cfg(test)]\nmod only_tests;\n");
    write(
        "src/only_tests.rs",
        "const A: &str = include_str!(\"../README.md\");\n",
    );
    write(
        "src/http/mod.rs",
        "mod pages;\n#[cfg(test)]\nmod tests { const B: &str = include_str!(\"../../Docs/API.md\"); }\n",
    );
    write(
        "src/http/pages.rs",
        "const ASSETS: &[&str] = &[include_str!(\"pages/app.js\"), include_str!(\"../../Docs/examples/stream-chat.mjs\")];\n\
         #[cfg(not(test))]\nconst C: &[u8] = include_bytes!(\"../../src/http/pages/app.js\");\n",
    );
    write("src/http/pages/app.js", "");
    write("Docs/examples/stream-chat.mjs", "");
    write("Docs/API.md", "");
    write("README.md", "");

    let problems = uncopied(root);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let p = &problems[0];
    assert!(
        p.starts_with("src/http/pages.rs reads Docs/examples/stream-chat.mjs"),
        "{p}"
    );
    assert!(
        p.contains("`COPY Docs/examples/stream-chat.mjs ./Docs/examples/stream-chat.mjs`"),
        "{p}"
    );

    // The one added COPY line that the reporter used makes the same crate pass.
    let dockerfile = fs::read_to_string(root.join("Dockerfile")).unwrap();
    let fixed = dockerfile.replace(
        "COPY src ./src\n",
        "COPY src ./src\nCOPY Docs/examples ./Docs/examples\n",
    );
    assert_ne!(
        fixed, dockerfile,
        "the shipped Dockerfile copies src with `COPY src ./src`"
    );
    write("Dockerfile", &fixed);
    assert_eq!(uncopied(root), Vec::<String>::new());

    // …unless .dockerignore leaves the folder out of the build context.
    write(".dockerignore", "target\nDocs/**/*.mjs\n");
    let problems = uncopied(root);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].contains(".dockerignore leaves out"),
        "{}",
        problems[0]
    );

    // A build script and the files it declares are part of the build too.
    write(".dockerignore", "target\n");
    write(
        "build.rs",
        "fn main() { println!(\"cargo:rerun-if-changed=assets/logo.svg\"); }\n",
    );
    write("assets/logo.svg", "");
    let problems = uncopied(root);
    let files: Vec<&str> = problems
        .iter()
        .map(|p| {
            p.split(" reads ")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(files, ["build.rs", "assets/logo.svg"], "{problems:#?}");
}
