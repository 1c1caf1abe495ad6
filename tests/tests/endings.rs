//! Short C names and the ways a traced command ends (issue 16, items 4 and 7), with the
//! `endings` fixture: `f` maps 1 MiB and `d` 2 MiB, then the program exits, segfaults or
//! aborts as asked.

use std::{path::Path, time::Duration};

use integration_tests::{MIB, Memtrace, Report, RunOutput, build_c_fixture, require_root};

/// `memtrace run --json JSON -- endings MODE`.
fn run_endings(bin: &Path, mode: &str, json: &Path) -> RunOutput {
    Memtrace::run(
        [
            "run".as_ref(),
            "--duration".as_ref(),
            "30s".as_ref(),
            "--json".as_ref(),
            json.as_os_str(),
            "--".as_ref(),
            bin.as_os_str(),
            mode.as_ref(),
        ],
        Duration::from_mins(1),
    )
}

/// A C function named `f` is `f`, not the C++ type `float` (nor `d` `double`).
#[test]
fn short_c_names_are_not_demangled() {
    if !require_root("short_c_names_are_not_demangled") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("endings", dir.path());
    let json = dir.path().join("report.json");
    let out = run_endings(&bin, "exit:0", &json);
    assert!(out.status.success(), "memtrace run exited with {}\n{}", out.status, out.combined());
    let report = Report::read(&json);
    let summary = report.summary();
    for (name, bytes) in [("f", MIB), ("d", 2 * MIB)] {
        let mapped: Vec<_> = report
            .leaks_with_frame(|fr| fr.function() == name)
            .into_iter()
            .filter(|l| l.sources().contains(&"mmap"))
            .collect();
        assert!(mapped.iter().any(|l| l.bytes() == bytes), "{name} maps {bytes} bytes\n{summary}");
    }
    let types = report.leaks_with_frame(|fr| fr.function() == "float" || fr.function() == "double");
    assert!(types.is_empty(), "C names demangled as C++ types\n{summary}");
    assert!(!out.stdout.contains("float") && !out.stdout.contains("double"), "{}", out.stdout);
}
