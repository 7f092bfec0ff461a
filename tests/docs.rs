//! The manual's SQL runs: every ```sql block of docs/*.md and README.md is executed with psql
//! against a fresh database (one per page, blocks in page order), and where a
//! plain ``` block follows it directly, psql's output must be exactly that
//! block (trailing spaces aside). A block whose fence says `sql no-run` is
//! shown only (it needs a server setup a test database does not have).
#![cfg(not(feature = "pg_test"))]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

struct Block {
    line: usize,
    sql: String,
    run: bool,
    expected: Option<String>,
}

/// The SQL blocks of a markdown page, each with the output block after it.
fn blocks(markdown: &str) -> Vec<Block> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut out: Vec<Block> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if let Some(info) = fence.strip_prefix("```") {
            let info = info.trim();
            let start = i;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                body.push(lines[i]);
                i += 1;
            }
            let text = body.join("\n");
            if info == "sql" || info.starts_with("sql ") {
                out.push(Block {
                    line: start + 1,
                    sql: text,
                    run: !info.split_whitespace().any(|w| w == "no-run"),
                    expected: None,
                });
            } else if info.is_empty() {
                // Output of the SQL block right before it (blank lines between).
                let follows = out.last_mut().filter(|b| {
                    b.expected.is_none()
                        && lines[b.line..start]
                            .iter()
                            .rev()
                            .skip_while(|l| l.trim().is_empty())
                            .next()
                            .is_some_and(|l| l.trim_start().starts_with("```"))
                });
                if let Some(b) = follows {
                    b.expected = Some(text);
                }
            }
        }
        i += 1;
    }
    out
}

fn normalized(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let mut end = lines.len();
    while end > 0 && lines[end - 1].is_empty() {
        end -= 1;
    }
    let mut start = 0;
    while start < end && lines[start].is_empty() {
        start += 1;
    }
    lines[start..end].join("\n")
}

fn psql(db: &TestDb, sql: &str) -> (bool, String, String) {
    let mut child = Command::new(format!("{}/psql", pg_bin()))
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-P",
            "pager=off",
            "-d",
            &db.dsn(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The roles a page's blocks create (`CREATE ROLE name ...`).
fn created_roles(blocks: &[Block]) -> Vec<String> {
    blocks
        .iter()
        .flat_map(|b| b.sql.split("CREATE ROLE ").skip(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|name| name.trim_end_matches(';').to_string())
        .collect()
}

/// Drops `roles` (roles are cluster-wide; a page's database is not).
fn drop_roles(admin: &mut postgres::Client, roles: &[String]) {
    for role in roles {
        assert!(
            role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "a plain role name: {role}"
        );
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .unwrap();
    }
}

#[test]
fn the_sql_of_the_manual_runs_and_shows_what_it_prints() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    assert!(pages.len() >= 9, "docs/ has its pages: {pages:?}");
    pages.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"));
    let mut failures = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let name = page
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .replace('-', "_")
            .to_lowercase();
        let markdown = std::fs::read_to_string(page).unwrap();
        let db = TestDb::new(&format!("doc_{name}"));
        let page_blocks: Vec<Block> = blocks(&markdown).into_iter().filter(|b| b.run).collect();
        // Roles are global: the ones a page creates are dropped before and after it.
        let roles = created_roles(&page_blocks);
        let mut admin = admin_client(&db.port);
        drop_roles(&mut admin, &roles);
        // A page that starts with CREATE EXTENSION (README's quick start) gets
        // a database without it.
        if page_blocks
            .first()
            .is_some_and(|b| b.sql.contains("CREATE EXTENSION usage_agg"))
        {
            db.connect()
                .batch_execute("DROP EXTENSION usage_agg CASCADE")
                .unwrap();
        }
        for block in page_blocks {
            let at = format!("{}:{}", page.display(), block.line);
            let (ok, stdout, stderr) = psql(&db, &block.sql);
            if !ok {
                failures.push(format!("{at}: failed\n{stderr}"));
                continue;
            }
            if let Some(expected) = &block.expected {
                if normalized(&stdout) != normalized(expected) {
                    failures.push(format!(
                        "{at}: printed\n{}\nbut the page shows\n{}",
                        normalized(&stdout),
                        normalized(expected)
                    ));
                }
            }
            checked += 1;
        }
        admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", db.name))
            .unwrap();
        drop_roles(&mut admin, &roles);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(checked > 5, "ran {checked} blocks");
}

#[test]
fn blocks_and_their_output_are_found() {
    let page = "text\n```sql\nSELECT 1;\n```\n\n```\n x\n```\n```sql no-run\nCREATE EXTENSION pg_cron;\n```\n```json\n{}\n```\n";
    let found = blocks(page);
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].sql, "SELECT 1;");
    assert_eq!(found[0].expected.as_deref(), Some(" x"));
    assert!(found[0].run);
    assert!(!found[1].run);
    assert_eq!(found[1].expected, None);
}
