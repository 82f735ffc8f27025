//! Holds `docs/behaviour-coverage.md` true: every line of the behaviour
//! reference has a row there, and every test a row names exists.
//!
//! The reference lives outside the repository, at
//! `../shared/reference/x86-interrupt-behaviour.md` from the repository root.
//! Without it the row check is skipped loudly, or fails when
//! `VIRQ_REQUIRE_KVM=1` (as CI sets) says the full environment is expected.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Sections of the reference that must be covered, by the start of their heading.
const SECTIONS: [&str; 8] = [
    "8254 PIT",
    "8259A PIC",
    "IOAPIC",
    "Local APIC",
    "MSI",
    "GSI routing",
    "Injecting into a vCPU",
    "Regression tests from real bugs",
];

/// A row's first cell must quote at least this many words of its line.
const MIN_WORDS: usize = 3;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn reference_path() -> PathBuf {
    repo().join("../shared/reference/x86-interrupt-behaviour.md")
}

fn coverage_path() -> PathBuf {
    repo().join("docs/behaviour-coverage.md")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `- ` bullet lines of each covered section, keyed by the full heading.
fn reference_lines(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            let heading = heading.trim();
            current = SECTIONS
                .iter()
                .any(|s| heading.starts_with(s))
                .then(|| heading.to_string());
            if let Some(h) = &current {
                sections.entry(h.clone()).or_default();
            }
        } else if let (Some(h), Some(bullet)) = (&current, line.strip_prefix("- ")) {
            sections
                .entry(h.clone())
                .or_default()
                .push(bullet.trim_end().to_string());
        }
    }
    sections
}

/// Split a markdown table row into cells; `\|` is a literal bar.
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                out.last_mut().expect("non-empty").push('|');
            }
            '|' => out.push(String::new()),
            _ => out.last_mut().expect("non-empty").push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_string()).collect()
}

/// One table row of the coverage document.
struct Row {
    section: String,
    quote: String,
    tests: String,
    line_no: usize,
}

/// Every table row under a `## ` heading, skipping header and separator rows.
fn coverage_rows(text: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading.trim().to_string();
            continue;
        }
        if !line.starts_with('|') || section.is_empty() {
            continue;
        }
        let c = cells(line);
        assert_eq!(c.len(), 2, "line {}: a row has two cells: {line}", i + 1);
        let is_header = c[0] == "reference line" && c[1] == "tests";
        let is_separator = c.iter().all(|cell| cell.chars().all(|ch| ch == '-'));
        if is_header || is_separator {
            continue;
        }
        rows.push(Row {
            section: section.clone(),
            quote: c[0].clone(),
            tests: c[1].clone(),
            line_no: i + 1,
        });
    }
    rows
}

/// The backticked names in a tests cell.
fn named_tests(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `source` defines `fn name(` as a test: a `#[test]` among the
/// attributes and comments directly above it.
fn defines_test(source: &str, name: &str) -> bool {
    let lines: Vec<&str> = source.lines().collect();
    let signature = format!("fn {name}(");
    lines.iter().enumerate().any(|(i, line)| {
        let line = line.trim_start();
        let line = line.strip_prefix("pub ").unwrap_or(line);
        if !line.starts_with(&signature) {
            return false;
        }
        lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim())
            .take_while(|l| l.starts_with("#[") || l.starts_with("//"))
            .any(|l| l == "#[test]")
    })
}

#[test]
fn coverage_table_has_one_row_for_every_reference_line() {
    let path = reference_path();
    if !path.exists() {
        if std::env::var("VIRQ_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!(
                "behaviour reference {} missing but VIRQ_REQUIRE_KVM=1",
                path.display()
            );
        }
        eprintln!(
            "SKIPPED: behaviour reference {} not found; docs/behaviour-coverage.md rows not checked",
            path.display()
        );
        return;
    }
    let reference = reference_lines(&read(&path));
    assert_eq!(
        reference.len(),
        SECTIONS.len(),
        "covered sections found in the reference: {:?}",
        reference.keys().collect::<Vec<_>>()
    );
    let rows = coverage_rows(&read(&coverage_path()));
    let mut problems = Vec::new();

    for row in &rows {
        let Some(lines) = reference.get(&row.section) else {
            problems.push(format!(
                "line {}: section \"{}\" is not a covered section of the reference",
                row.line_no, row.section
            ));
            continue;
        };
        if row.quote.split_whitespace().count() < MIN_WORDS {
            problems.push(format!(
                "line {}: \"{}\" quotes fewer than {MIN_WORDS} words",
                row.line_no, row.quote
            ));
        }
        if !lines.iter().any(|l| l.starts_with(&row.quote)) {
            problems.push(format!(
                "line {}: \"{}\" starts no line of \"{}\" (stale or misquoted row)",
                row.line_no, row.quote, row.section
            ));
        }
    }
    let mut count = 0;
    for (section, lines) in &reference {
        for line in lines {
            count += 1;
            let matching: Vec<usize> = rows
                .iter()
                .filter(|r| &r.section == section && line.starts_with(&r.quote))
                .map(|r| r.line_no)
                .collect();
            match matching.len() {
                0 => problems.push(format!("no row for \"{section}\" line: {line}")),
                1 => {}
                _ => problems.push(format!(
                    "rows at lines {matching:?} all match \"{section}\" line: {line}"
                )),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/behaviour-coverage.md is out of step with {}:\n{}",
        path.display(),
        problems.join("\n")
    );
    assert!(count > 0, "no reference lines found");
}

#[test]
fn coverage_table_names_only_tests_that_exist() {
    let rows = coverage_rows(&read(&coverage_path()));
    assert!(!rows.is_empty(), "no rows in docs/behaviour-coverage.md");
    let mut files = Vec::new();
    rust_files(&repo().join("crates/irqchip/src"), &mut files);
    let sources: Vec<String> = files.iter().map(|f| read(f)).collect();
    let mut problems = Vec::new();
    for row in &rows {
        let names = named_tests(&row.tests);
        let mut in_crate = 0;
        for name in &names {
            let found = match name.rsplit_once("::") {
                Some((file, test)) => {
                    let path = repo().join(file);
                    path.is_file() && defines_test(&read(&path), test)
                }
                None => {
                    let found = sources.iter().any(|s| defines_test(s, name));
                    in_crate += usize::from(found);
                    found
                }
            };
            if !found {
                problems.push(format!(
                    "line {}: no #[test] fn {name} (rows name tests under crates/irqchip/src, or path::name)",
                    row.line_no
                ));
            }
        }
        if in_crate == 0 {
            problems.push(format!(
                "line {}: \"{}\" names no unit test under crates/irqchip/src",
                row.line_no, row.quote
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn test_detection_needs_the_test_attribute() {
    let source = "#[test]\n/// doc\nfn real() {}\n\nfn helper() {}\n#[test]\n\nfn gap() {}\n";
    assert!(defines_test(source, "real"));
    assert!(!defines_test(source, "helper"));
    assert!(
        !defines_test(source, "gap"),
        "a blank line ends the attributes"
    );
    assert!(!defines_test(source, "rea"));
    assert_eq!(named_tests("`a`, `b`; note `c`"), ["a", "b", "c"]);
    assert_eq!(cells("| x \\| y | `t` |"), ["x | y", "`t`"]);
}
