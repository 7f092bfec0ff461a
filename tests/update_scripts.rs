//! Update scripts nobody copies by hand.
//!
//! From 0.4.0 on, `sql/usage_agg--A--B.sql` is generated from a template,
//! `sql/updates/A--B.sql`, and the install script of B (what `cargo pgrx
//! install` wrote, so every function exists in exactly one source file). A
//! template is SQL plus directive lines:
//! - `-- @create NAME`: the install script's CREATE statement of NAME (a
//!   function, procedure, aggregate, view or type), with its COMMENTs;
//! - `-- @replace NAME`: the same as CREATE OR REPLACE;
//! - `-- @include PATH`: a file of the repository, verbatim (a new `sql/` file).
//!
//! This test regenerates every script and fails when the checked-in one
//! differs; `USAGE_AGG_WRITE_UPDATE_SCRIPTS=1` writes them instead. Released
//! scripts are frozen: they must be byte for byte what their release shipped.

#![cfg(not(feature = "pg_test"))]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The install script of this build, as `cargo pgrx install` wrote it.
fn install_script() -> String {
    let pg_config = format!("{}/pg_config", common::pg_bin());
    let out = Command::new(&pg_config)
        .arg("--sharedir")
        .output()
        .unwrap_or_else(|e| panic!("{pg_config}: {e}"));
    let sharedir = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let path = format!(
        "{sharedir}/extension/usage_agg--{}.sql",
        env!("CARGO_PKG_VERSION")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{path}: {e} (install the extension first: scripts/test.sh does)")
    })
}

/// Splits SQL into statements at top-level semicolons (outside quotes,
/// dollar quotes, comments and `BEGIN ATOMIC ... END` bodies, whose own
/// statements end in semicolons; a CASE inside such a body has its own END).
/// Each statement keeps its text, without the semicolon.
fn statements(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    // Open BEGIN ATOMIC and CASE blocks of the statement (0: outside a body).
    let mut atomic_depth = 0usize;
    let mut previous_word = String::new();
    let is_word_byte = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        if b[i].is_ascii_alphabetic() && (i == 0 || !is_word_byte(b[i - 1])) {
            let mut j = i;
            while j < b.len() && is_word_byte(b[j]) {
                j += 1;
            }
            let word = sql[i..j].to_ascii_uppercase();
            match word.as_str() {
                "ATOMIC" if previous_word == "BEGIN" => atomic_depth += 1,
                "CASE" if atomic_depth > 0 => atomic_depth += 1,
                "END" if atomic_depth > 0 => atomic_depth -= 1,
                _ => {}
            }
            previous_word = word;
            i = j;
            continue;
        }
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
                continue;
            }
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'$' => {
                // $tag$ ... $tag$ (a tag is letters, digits, underscores).
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                if j < b.len() && b[j] == b'$' && !(j > i + 1 && b[i + 1].is_ascii_digit()) {
                    let tag = &sql[i..=j];
                    match sql[j + 1..].find(tag) {
                        Some(end) => i = j + 1 + end + tag.len() - 1,
                        None => i = b.len(),
                    }
                }
            }
            b';' if atomic_depth == 0 => {
                out.push(sql[start..i].to_string());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if !sql[start..].trim().is_empty() {
        out.push(sql[start..].to_string());
    }
    out
}

/// A statement without its leading blank and comment lines.
fn body(statement: &str) -> String {
    let mut lines: Vec<&str> = statement.lines().collect();
    while let Some(first) = lines.first() {
        let t = first.trim();
        if t.is_empty() || t.starts_with("--") || (t.starts_with("/*") && t.ends_with("*/")) {
            lines.remove(0);
        } else {
            break;
        }
    }
    lines.join("\n")
}

/// `usage_agg.name` of what a CREATE or COMMENT ON statement is about, and
/// whether it is a COMMENT.
fn subject(body: &str) -> Option<(String, bool)> {
    let words: Vec<&str> = body.split_whitespace().collect();
    let kinds = ["FUNCTION", "PROCEDURE", "AGGREGATE", "VIEW", "TYPE"];
    let (name, comment) = match words.as_slice() {
        ["CREATE", "OR", "REPLACE", kind, name, ..] if kinds.contains(kind) => (*name, false),
        ["CREATE", kind, name, ..] if kinds.contains(kind) => (*name, false),
        ["COMMENT", "ON", kind, name, ..] if kinds.contains(kind) => (*name, true),
        _ => return None,
    };
    let name = name.split('(').next().unwrap_or(name).replace('"', "");
    let name = if name.contains('.') {
        name
    } else {
        format!("usage_agg.{name}")
    };
    Some((name, comment))
}

/// Every CREATE of the install script by name, with its COMMENT statements.
fn index(install: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let mut out: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for statement in statements(install) {
        let text = body(&statement);
        let Some((name, comment)) = subject(&text) else {
            continue;
        };
        let entry = out.entry(name.clone()).or_default();
        if comment {
            entry.1.push(text);
        } else {
            assert!(
                entry.0.is_empty(),
                "{name} is created twice in the install script: name overloads in the template instead"
            );
            entry.0 = text;
        }
    }
    out
}

/// The CREATE statement schema-qualified (pgrx writes `CREATE  FUNCTION
/// "name"`), as CREATE OR REPLACE when `replace`.
fn create_statement(text: &str, name: &str, replace: bool) -> String {
    let short = name.trim_start_matches("usage_agg.");
    let mut text = text
        .replacen(
            &format!("CREATE  FUNCTION \"{short}\""),
            &format!("CREATE FUNCTION usage_agg.\"{short}\""),
            1,
        )
        .replacen("CREATE  FUNCTION", "CREATE FUNCTION", 1);
    if replace {
        for kind in ["FUNCTION", "PROCEDURE", "VIEW"] {
            let from = format!("CREATE {kind}");
            if text.starts_with(&from) {
                text = text.replacen(&from, &format!("CREATE OR REPLACE {kind}"), 1);
                break;
            }
        }
    }
    text
}

fn generate(template: &str, install: &BTreeMap<String, (String, Vec<String>)>) -> String {
    let mut out = String::new();
    for line in template.lines() {
        let directive = line.trim();
        let (verb, arg) = match directive.strip_prefix("-- @") {
            Some(rest) => rest.split_once(' ').unwrap_or((rest, "")),
            None => {
                out.push_str(line);
                out.push('\n');
                continue;
            }
        };
        match verb {
            "include" => {
                let path = repo().join(arg.trim());
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                out.push_str(&format!("-- From {}:\n", arg.trim()));
                out.push_str(&text);
                if !text.ends_with('\n') {
                    out.push('\n');
                }
            }
            "create" | "replace" => {
                let name = arg.trim();
                let (create, comments) = install
                    .get(name)
                    .unwrap_or_else(|| panic!("the install script creates no {name}"));
                assert!(
                    !create.is_empty(),
                    "the install script only comments on {name}"
                );
                out.push_str(&create_statement(create, name, verb == "replace"));
                out.push_str(";\n");
                for c in comments {
                    out.push_str(c);
                    out.push_str(";\n");
                }
            }
            other => panic!("unknown template directive @{other} in {line}"),
        }
    }
    out
}

#[test]
fn update_scripts_are_generated_from_their_templates() {
    let install = index(&install_script());
    let write = std::env::var("USAGE_AGG_WRITE_UPDATE_SCRIPTS").as_deref() == Ok("1");
    let mut checked = 0;
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(repo().join("sql/updates")).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(versions) = name.strip_suffix(".sql") else {
            continue;
        };
        let template = std::fs::read_to_string(&path).unwrap();
        let generated = generate(&template, &install);
        let target = repo().join(format!("sql/usage_agg--{versions}.sql"));
        let current = std::fs::read_to_string(&target).unwrap_or_default();
        if write {
            std::fs::write(&target, &generated).unwrap();
        } else if current != generated {
            stale.push(target.display().to_string());
        }
        checked += 1;
    }
    assert!(
        checked >= 1,
        "sql/updates holds the 0.3.0 -> 0.4.0 template"
    );
    assert!(
        stale.is_empty(),
        "generated update scripts are stale: {stale:?}\n\
         regenerate: USAGE_AGG_WRITE_UPDATE_SCRIPTS=1 cargo test --test update_scripts, then reinstall"
    );
}

/// Releases and their commits, from scripts/lib.sh (UA_RELEASE_COMMITS).
fn release_commits() -> Vec<(String, String)> {
    let lib = std::fs::read_to_string(repo().join("scripts/lib.sh")).unwrap();
    let mut out = Vec::new();
    // [v0.2.0]=<40 hex digits>
    for (at, _) in lib.match_indices("[v") {
        let rest = &lib[at + 1..];
        let Some((version, tail)) = rest.split_once("]=") else {
            continue;
        };
        let commit: String = tail.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        if commit.len() == 40 && !version.contains(char::is_whitespace) {
            out.push((version.to_string(), commit));
        }
    }
    out
}

#[test]
fn released_update_scripts_are_frozen() {
    let releases = release_commits();
    assert!(
        releases.len() >= 3,
        "scripts/lib.sh lists the releases: {releases:?}"
    );
    let git_dir = repo().join(".git");
    if !Path::new(&git_dir).exists() {
        println!("skipped: no git history here to compare released update scripts with");
        return;
    }
    let mut compared = 0;
    for (release, commit) in &releases {
        let listed = Command::new("git")
            .current_dir(repo())
            .args(["ls-tree", "--name-only", commit, "sql/"])
            .output()
            .unwrap();
        assert!(listed.status.success(), "git ls-tree {commit} ({release})");
        for file in String::from_utf8(listed.stdout).unwrap().lines() {
            let name = file.trim_start_matches("sql/");
            if !(name.starts_with("usage_agg--") && name.matches("--").count() == 2) {
                continue;
            }
            let shipped = Command::new("git")
                .current_dir(repo())
                .args(["show", &format!("{commit}:{file}")])
                .output()
                .unwrap();
            let now = std::fs::read(repo().join(file))
                .unwrap_or_else(|e| panic!("{file} (shipped in {release}) is gone: {e}"));
            assert!(
                shipped.stdout == now,
                "{file} changed after {release} shipped it: released update scripts are frozen (fix forward in the next script)"
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 2,
        "compared the released update scripts: {compared}"
    );
}

#[test]
fn the_splitter_keeps_quoted_semicolons() {
    let sql = "SELECT ';'; CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql; -- a; comment\n\
               SELECT \"a;b\" /* ; */ FROM t";
    let parts: Vec<String> = statements(sql)
        .iter()
        .map(|s| body(s).trim().to_string())
        .collect();
    assert_eq!(
        parts,
        vec![
            "SELECT ';'".to_string(),
            "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql".to_string(),
            "SELECT \"a;b\" /* ; */ FROM t".to_string(),
        ]
    );
}

#[test]
fn the_splitter_keeps_atomic_bodies_whole() {
    let sql = "CREATE FUNCTION f(x int) RETURNS TABLE (y int) LANGUAGE sql BEGIN ATOMIC\n\
               SELECT CASE WHEN x > 0 THEN x END; SELECT 2;\nEND; SELECT 'end';";
    let parts: Vec<String> = statements(sql)
        .iter()
        .map(|s| body(s).trim().to_string())
        .collect();
    assert_eq!(
        parts,
        vec![
            "CREATE FUNCTION f(x int) RETURNS TABLE (y int) LANGUAGE sql BEGIN ATOMIC\n\
             SELECT CASE WHEN x > 0 THEN x END; SELECT 2;\nEND"
                .to_string(),
            "SELECT 'end'".to_string(),
        ]
    );
}
