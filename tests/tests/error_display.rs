//! The rule "an error's `Display` does not repeat its source", over every `.rs` file of the
//! workspace: a `thiserror` variant (or struct) whose field is its source (`#[source]`,
//! `#[from]`, or named `source`) must not also print that field in its `#[error("...")]`
//! message. `anyhow`'s `{:#}` (the CLI) and `uffd_core::error::chain` (logs, errors turned
//! into text) print the source once already; printing it in the message too shows users the
//! same sentence twice. `#[error(transparent)]` is fine: it forwards both.
//!
//! The sources are parsed with `syn`, so comments, strings and nesting cannot fool the
//! check. What it cannot judge it leaves alone: a source passed to a function
//! (`explain(.0)`), a message that is not a string literal, a hand-written `Display`.

use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;
use syn::{Attribute, Fields, ItemEnum, ItemStruct, LitStr};

/// Where the rule is broken in `src`: (line, what), in source order.
fn violations(src: &str) -> syn::Result<Vec<(usize, String)>> {
    let file = syn::parse_file(src)?;
    let mut v = Finder::default();
    v.visit_file(&file);
    v.found.sort();
    Ok(v.found)
}

#[derive(Default)]
struct Finder {
    found: Vec<(usize, String)>,
}

impl<'ast> Visit<'ast> for Finder {
    fn visit_item_enum(&mut self, e: &'ast ItemEnum) {
        if derives_error(&e.attrs) {
            let fallback = error_attr(&e.attrs);
            for var in &e.variants {
                if let Some(attr) = error_attr(&var.attrs).or(fallback) {
                    let name = format!("{}::{}", e.ident, var.ident);
                    self.check(attr, &var.fields, &name);
                }
            }
        }
        syn::visit::visit_item_enum(self, e);
    }

    fn visit_item_struct(&mut self, s: &'ast ItemStruct) {
        if derives_error(&s.attrs) {
            if let Some(attr) = error_attr(&s.attrs) {
                self.check(attr, &s.fields, &s.ident.to_string());
            }
        }
        syn::visit::visit_item_struct(self, s);
    }
}

impl Finder {
    fn check(&mut self, attr: &Attribute, fields: &Fields, name: &str) {
        let Ok(list) = attr.meta.require_list() else {
            return;
        };
        let args = split_args(list.tokens.clone());
        let Some(first) = args.first() else { return };
        // `transparent`, or anything that is not a format string: nothing to judge.
        let Ok(message) = syn::parse2::<LitStr>(first.iter().cloned().collect()) else {
            return;
        };
        let sources = source_members(fields);
        if sources.is_empty() {
            return;
        }
        let mut named_args = Vec::new();
        let mut printed = Vec::new();
        for arg in &args[1..] {
            // `name = expr` or a positional `expr`; only a bare `.field` is judged.
            let expr = match arg.as_slice() {
                [TokenTree::Ident(n), TokenTree::Punct(p), rest @ ..] if p.as_char() == '=' => {
                    named_args.push(n.to_string());
                    rest
                }
                all => all,
            };
            if let [TokenTree::Punct(dot), member] = expr {
                if dot.as_char() == '.' {
                    printed.push(member.to_string());
                }
            }
        }
        let unnamed = matches!(fields, Fields::Unnamed(_));
        for p in placeholders(&message.value()) {
            let is_field = if p.bytes().all(|b| b.is_ascii_digit()) {
                unnamed
            } else {
                !named_args.contains(&p)
            };
            if is_field && !p.is_empty() {
                printed.push(p);
            }
        }
        for member in printed {
            if sources.contains(&member) {
                let line = attr.pound_token.span.start().line;
                self.found.push((
                    line,
                    format!("{name} prints its source `{member}`: {:?}", message.value()),
                ));
            }
        }
    }
}

fn derives_error(attrs: &[Attribute]) -> bool {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("derive"))
        .any(|a| {
            a.parse_args_with(
                syn::punctuated::Punctuated::<syn::Path, syn::Token![,]>::parse_terminated,
            )
            .is_ok_and(|paths| {
                paths
                    .iter()
                    .any(|p| p.segments.last().is_some_and(|s| s.ident == "Error"))
            })
        })
}

fn error_attr(attrs: &[Attribute]) -> Option<&Attribute> {
    attrs.iter().find(|a| a.path().is_ident("error"))
}

/// The members that are the error's source, as a format string names them: `0`, `source`.
fn source_members(fields: &Fields) -> Vec<String> {
    fields
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            f.attrs
                .iter()
                .any(|a| a.path().is_ident("source") || a.path().is_ident("from"))
                || f.ident.as_ref().is_some_and(|i| i == "source")
        })
        .map(|(i, f)| f.ident.as_ref().map_or(i.to_string(), |id| id.to_string()))
        .collect()
}

/// The attribute's arguments, split at top-level commas.
fn split_args(tokens: TokenStream) -> Vec<Vec<TokenTree>> {
    let mut args = vec![Vec::new()];
    for t in tokens {
        match &t {
            TokenTree::Punct(p) if p.as_char() == ',' => args.push(Vec::new()),
            _ => args.last_mut().expect("never empty").push(t),
        }
    }
    args.retain(|a| !a.is_empty());
    args
}

/// What each `{...}` of a format string names (the part before `:`), `{{` skipped; an
/// implicit positional `{}` is an empty name.
fn placeholders(fmt: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '{' {
            if chars.peek() == Some(&'{') {
                chars.next();
                continue;
            }
            let inner: String = chars.by_ref().take_while(|&c| c != '}').collect();
            let name = inner.split(':').next().unwrap_or("").trim();
            out.push(name.to_string());
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_error_display_in_the_workspace_repeats_its_source() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().expect("workspace root");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 50, "only {} .rs files found", files.len());
    let mut found = Vec::new();
    let mut errors = 0;
    for path in &files {
        let rel = path.strip_prefix(&root).unwrap_or(path).display();
        let src = std::fs::read_to_string(path).expect("read a source file");
        match violations(&src) {
            Ok(v) => {
                errors += src.matches("#[error(").count();
                found.extend(
                    v.into_iter()
                        .map(|(line, what)| format!("{rel}:{line}: {what}")),
                );
            }
            Err(e) => found.push(format!("{rel}: does not parse, so cannot be checked: {e}")),
        }
    }
    assert!(errors > 100, "only {errors} #[error] messages seen");
    assert!(
        found.is_empty(),
        "an error's Display repeats its source, which the error chain prints after it; \
         drop it from the message:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn the_guard_flags_exactly_the_messages_that_print_a_source() {
    let src = r#"
        #[derive(Debug, thiserror::Error)]
        pub enum E {
            #[error("tuple source: {0}")]
            A(#[from] std::io::Error),
            #[error("named source: {source:?}")]
            B { path: String, source: std::io::Error },
            #[error("marked source: {inner}")]
            C { #[source] inner: std::io::Error },
            #[error("argument: {}", .0)]
            D(#[source] std::io::Error),
            #[error(transparent)]
            Fine1(Box<dyn std::error::Error + Send + Sync>),
            #[error("cannot open {path}")]
            Fine2 { path: String, source: std::io::Error },
            #[error("not a source: {0}")]
            Fine3(std::io::Error),
            #[error("interpreted: {}", explain(.0))]
            Fine4(#[from] std::fmt::Error),
            #[error("escaped {{0}} and a named argument {source}", source = 5)]
            Fine5(#[source] std::io::Error),
        }

        mod inner {
            #[derive(Debug, Error)]
            #[error("struct: {source}")]
            pub struct S { source: std::io::Error }

            // Not an error type: its attributes are someone else's.
            #[derive(Debug)]
            pub enum NotAnError {
                #[error("{0}")]
                X(#[from] u8),
            }
        }
    "#;
    let found = violations(src).unwrap();
    let lines: Vec<usize> = found.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, vec![4, 6, 8, 10, 26], "{found:#?}");
    assert!(
        found[0].1.starts_with("E::A prints its source `0`"),
        "{found:?}"
    );
    assert!(
        found[4].1.starts_with("S prints its source `source`"),
        "{found:?}"
    );
}
