//! The flamegraph opens in a real browser: `memtrace report` renders a recording into
//! an SVG, headless Chromium loads it, and the SVG's script runs without errors: it
//! finishes `init()` and its search highlights the leaking function. A copy whose
//! script throws must be caught the same way, so the check cannot pass by going blind.
//!
//! Needs the `memtrace` binary and Chromium, not root.

use std::{fs, path::Path, time::Duration};

use integration_tests::{BrowserPage, Memtrace, load_in_chromium, require_chromium};
use memtrace::report::{Frame, FrameKind, Leak, REPORT_VERSION, Report, Target, Totals};

const BROWSER_TIMEOUT: Duration = Duration::from_mins(2);

fn frame(function: &str, module: &str, file: &str, line: u32, kind: FrameKind) -> Frame {
    Frame { function: function.into(), module: module.into(), file: file.into(), line, kind }
}

/// A Node service leaking from a JS function, plus a native stack.
fn report() -> Report {
    let js = vec![
        frame("rememberOrder", "", "/srv/app.js", 9, FrameKind::Js),
        frame("handleRequest", "", "/srv/app.js", 22, FrameKind::Js),
        frame("uv_run", "/usr/bin/node", "", 0, FrameKind::Native),
        frame("main", "/usr/bin/node", "", 0, FrameKind::Native),
    ];
    let native = vec![
        frame("malloc", "/lib/x86_64-linux-gnu/libc.so.6", "", 0, FrameKind::Native),
        frame("v8::internal::Heap::AllocateRaw", "/usr/bin/node", "/src/heap.cc", 120, FrameKind::Native),
        frame("main", "/usr/bin/node", "", 0, FrameKind::Native),
    ];
    let leak = |bytes: u64, frames: Vec<Frame>| Leak {
        bytes,
        count: bytes / 4096,
        oldest_age_s: 20.0,
        growth_bytes_per_s: bytes as f64 / 20.0,
        score: bytes as f64 / 1_048_576.0,
        sources: vec![memtrace::report::Source::Mmap],
        frames,
        ..Leak::default()
    };
    Report {
        version: REPORT_VERSION,
        target: Target {
            pid: 4242,
            comm: "node".into(),
            cmdline: "node /srv/app.js".into(),
            ..Target::default()
        },
        duration_s: 30.0,
        tracked: vec!["mmap".into(), "brk".into()],
        totals: Totals { outstanding_bytes: 13 << 20, allocated_bytes: 40 << 20, ..Totals::default() },
        leaks: vec![leak(12 << 20, js), leak(1 << 20, native)],
        ..Report::default()
    }
}

fn describe(page: &BrowserPage) -> String {
    format!(
        "script errors: {:#?}\n--- DOM ({} bytes) ---\n{}\n--- browser log ---\n{}",
        page.script_errors,
        page.dom.len(),
        page.dom.chars().take(4000).collect::<String>(),
        page.log
    )
}

fn render_flamegraph(dir: &Path) -> std::path::PathBuf {
    let recording = dir.join("run.mtr");
    memtrace::record::write_report(&recording, &report())
        .unwrap_or_else(|e| panic!("write {}: {e}", recording.display()));
    let svg = dir.join("leaks.svg");
    let out = Memtrace::run(
        ["report".as_ref(), recording.as_os_str(), "--flamegraph".as_ref(), svg.as_os_str()],
        Duration::from_mins(1),
    );
    assert!(out.status.success(), "memtrace report --flamegraph failed\n{}", out.combined());
    svg
}

#[test]
fn flamegraph_draws_in_chromium_without_script_errors() {
    let Some(chromium) = require_chromium("flamegraph_draws_in_chromium_without_script_errors") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("make a temp dir: {e}"));
    let svg = render_flamegraph(dir.path());

    // `?s=` makes the flamegraph's own init() search on load, the last thing it does;
    // the search writes "Matched: N%" into the page and highlights the frames. (The
    // script's source is part of the DOM too, hence the `>` before "Matched".)
    let page = load_in_chromium(&chromium, &svg, "?s=rememberOrder", dir.path(), BROWSER_TIMEOUT);
    assert!(page.script_errors.is_empty(), "the flamegraph's script failed\n{}", describe(&page));
    assert!(page.dom.contains("<svg"), "Chromium did not load the SVG\n{}", describe(&page));
    assert!(
        page.dom.contains("rememberOrder app.js:9"),
        "the leaking JS function is not in the drawn flamegraph\n{}",
        describe(&page)
    );
    assert!(
        page.dom.contains(">Matched: ") && page.dom.contains("fg:orig_fill=\""),
        "the script did not run to the end (no search highlight after load)\n{}",
        describe(&page)
    );
    // 12 of the 13 MiB are under the JS leak.
    assert!(page.dom.contains(">Matched: 92.3%<"), "unexpected share matched\n{}", describe(&page));

    // The same page with a script that throws must be reported as broken.
    let broken = dir.path().join("broken.svg");
    let text = fs::read_to_string(&svg).unwrap_or_else(|e| panic!("read {}: {e}", svg.display()));
    assert!(text.contains("function init(evt) {"), "inferno's init() is not in the SVG");
    let text = text.replacen("function init(evt) {", "function init(evt) { memtraceProbeMissing();", 1);
    fs::write(&broken, text).unwrap_or_else(|e| panic!("write {}: {e}", broken.display()));
    let page = load_in_chromium(&chromium, &broken, "?s=rememberOrder", dir.path(), BROWSER_TIMEOUT);
    assert!(
        page.script_errors.iter().any(|e| e.contains("memtraceProbeMissing")),
        "a throwing script went unnoticed: the browser check is blind\n{}",
        describe(&page)
    );
    assert!(!page.dom.contains(">Matched: "), "the broken script still searched\n{}", describe(&page));
}
