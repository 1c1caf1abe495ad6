//! The live view drawn on ratatui's `TestBackend` from a scripted report.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::{Terminal, backend::TestBackend};

use super::{Action, App, widgets};
use crate::{
    analysis::limit::{WINDOW_S, time_to_limit},
    report::{
        Evidence, Frame, FrameKind, Leak, MemoryBreakdown, MemoryParts, OomKill, Report, SegmentGrowth,
        SegmentKind, SegmentVerdict, Source, Target, TimelinePoint, Verdict,
    },
};

const MIB: u64 = 1 << 20;

fn frame(function: &str, file: &str, line: u32, module: &str, kind: FrameKind) -> Frame {
    Frame { function: function.into(), module: module.into(), file: file.into(), line, kind }
}

/// A Node service whose cgroup (512 MiB) fills at 1 MiB/s: `rememberOrder` leaks, a
/// cache holds more but stopped growing, native code churns.
fn scripted() -> Report {
    let timeline: Vec<TimelinePoint> = (0..=60u32)
        .map(|t| TimelinePoint {
            t_s: f64::from(t),
            rss_bytes: (240 + u64::from(t)) * MIB,
            rss_anon_bytes: (220 + u64::from(t)) * MIB,
            rss_file_bytes: 20 * MIB,
            outstanding_bytes: (100 + u64::from(t)) * MIB,
            memcg_usage_bytes: (250 + u64::from(t)) * MIB,
            memcg_limit_bytes: 512 * MIB,
            ..TimelinePoint::default()
        })
        .collect();
    let (leaks, others, (segments, memory)) = (flagged(), others(), segments_and_memory());
    Report {
        version: crate::report::REPORT_VERSION,
        target: Target {
            pid: 4242,
            comm: "node".into(),
            cmdline: "node /srv/app.js".into(),
            ..Target::default()
        },
        duration_s: 60.0,
        tracked: vec!["mmap".into(), "brk".into(), "oom".into()],
        leaks,
        other_suspects: others,
        segments,
        memory: Some(memory),
        time_to_limit: Some(time_to_limit(&timeline, WINDOW_S)),
        timeline,
        lost_events: 3,
        ..Report::default()
    }
}

/// `rememberOrder` keeps 1 MiB/s, seen mapped and touched.
fn flagged() -> Vec<Leak> {
    let remember = frame("rememberOrder", "/srv/app.js", 9, "", FrameKind::Js);
    vec![Leak {
        bytes: 48 * MIB,
        count: 48,
        growth_bytes_per_s: MIB as f64,
        score: 50.0,
        sources: vec![Source::Mmap, Source::Faults],
        frames: vec![
            frame("mmap64", "", 0, "/lib/x86_64-linux-gnu/libc.so.6", FrameKind::Native),
            frame("node::ArrayBufferAllocator::Allocate", "", 0, "/usr/bin/node", FrameKind::Native),
            remember.clone(),
            frame("handleRequest", "/srv/app.js", 22, "", FrameKind::Js),
            frame("uv_run", "", 0, "/usr/bin/node", FrameKind::Native),
        ],
        verdict: Verdict::Leak,
        reason: "grew 60.0 MiB/min in 10 of 10 intervals".into(),
        culprit: remember,
        view: Some(Source::Mmap),
        evidence: vec![
            Evidence {
                source: Some(Source::Mmap),
                bytes: 48 * MIB,
                count: 48,
                growth_bytes_per_s: MIB as f64,
                verdict: Verdict::Leak,
            },
            Evidence {
                source: Some(Source::Faults),
                bytes: 40 * MIB,
                count: 640,
                growth_bytes_per_s: MIB as f64,
                verdict: Verdict::Unattributed,
            },
        ],
        ..Leak::default()
    }]
}

/// A cache that stopped growing, and malloc churn in native code.
fn others() -> Vec<Leak> {
    let cache = frame("fillCache", "/srv/cache.js", 3, "", FrameKind::Js);
    let parse = frame("parse_request", "server.c", 40, "/srv/server", FrameKind::Native);
    vec![
        Leak {
            bytes: 64 * MIB,
            count: 1,
            score: 1.0,
            sources: vec![Source::Mmap],
            frames: vec![cache.clone()],
            verdict: Verdict::WarmUp,
            culprit: cache,
            view: Some(Source::Mmap),
            ..Leak::default()
        },
        Leak {
            bytes: 2 * MIB,
            count: 9,
            growth_bytes_per_s: 2.0 * MIB as f64,
            score: 0.5,
            sources: vec![Source::Malloc],
            frames: vec![
                frame("malloc", "", 0, "/lib/x86_64-linux-gnu/libc.so.6", FrameKind::Native),
                parse.clone(),
            ],
            verdict: Verdict::Churn,
            culprit: parse.clone(),
            view: Some(Source::Malloc),
            ..Leak::default()
        },
    ]
}

/// A growing malloc arena extended by the native code, and where RSS is.
fn segments_and_memory() -> (Vec<SegmentGrowth>, MemoryBreakdown) {
    let parse = frame("parse_request", "server.c", 40, "/srv/server", FrameKind::Native);
    let segments = vec![SegmentGrowth {
        kind: SegmentKind::MallocArena,
        bytes: 24 * MIB,
        growth_bytes_per_s: 100_000.0,
        verdict: SegmentVerdict::Growing,
        extended_by: vec![Leak { culprit: parse, ..Leak::default() }],
        ..SegmentGrowth::default()
    }];
    let memory = MemoryBreakdown {
        first: MemoryParts {
            v8_heap_bytes: 40 * MIB,
            malloc_arena_bytes: 20 * MIB,
            ..MemoryParts::default()
        },
        last: MemoryParts {
            v8_heap_bytes: 40 * MIB,
            malloc_arena_bytes: 24 * MIB,
            anon_mapping_bytes: 200 * MIB,
            file_bytes: 20 * MIB,
            ..MemoryParts::default()
        },
        span_s: 60,
    };
    (segments, memory)
}

fn render(app: &App) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(160, 40)).expect("test terminal");
    terminal.draw(|f| widgets::draw(f, app)).expect("draw");
    let buffer = terminal.backend().buffer();
    let width = usize::from(buffer.area.width);
    buffer.content.chunks(width).map(|row| row.iter().map(ratatui::buffer::Cell::symbol).collect()).collect()
}

fn line_with<'a>(screen: &'a [String], needle: &str) -> Option<(usize, &'a String)> {
    screen.iter().enumerate().find(|(_, l)| l.contains(needle))
}

fn press(app: &mut App, code: KeyCode) -> Action {
    app.on_key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn app() -> App {
    let mut app = App::new();
    app.update(scripted());
    app
}

#[test]
fn shows_the_leaking_culprit_with_its_bytes_growth_and_time_to_the_limit() {
    let screen = render(&app());
    let text = screen.join("\n");
    let (_, row) =
        line_with(&screen, "rememberOrder app.js:9").unwrap_or_else(|| panic!("culprit shown\n{text}"));
    // 202 MiB left at 1 MiB/s: 3m 22s, for the cgroup and for this suspect alone.
    for cell in ["48.0 MiB", "+1.0 MiB/s", "leak", "3m 22s", "[js]"] {
        assert!(row.contains(cell), "{cell:?} in the culprit's row: {row}");
    }
    assert!(text.contains("pid 4242 (node)"), "{text}");
    assert!(text.contains("RSS      300.0 MiB  anon 280.0 MiB · file 20.0 MiB"), "{text}");
    assert!(text.contains("310.0 MiB charged of its 512.0 MiB limit (61%)"), "{text}");
    assert!(text.contains("at this rate the cgroup limit (512.0 MiB) is reached in 3m 22s"), "{text}");
    assert!(text.contains("events   lost 3 · OOM kills 0"), "{text}");
    assert!(
        text.contains("where    V8 heap 40.0 MiB · malloc arenas 24.0 MiB (+4.0 MiB) · anonymous mappings 200.0 MiB (+200.0 MiB) · file-backed 20.0 MiB (+20.0 MiB)"),
        "{text}"
    );
    assert!(
        text.contains(
            "segment  malloc arena 24.0 MiB +97.7 KiB/s (growing), extended by parse_request server.c:40"
        ),
        "{text}"
    );
    assert!(row.contains(" mapped "), "the view the bytes are in: {row}");
    // The culprit is the JS frame, not the allocator frames below it.
    assert!(!row.contains("mmap64") && !row.contains("ArrayBufferAllocator"), "{row}");
    let (_, native) = line_with(&screen, "▸ parse_request server.c:40").unwrap_or_else(|| panic!("{text}"));
    assert!(
        native.contains("churn") && native.contains(" malloc ") && !native.contains("malloc [libc"),
        "{native}"
    );
    assert!(row.contains("← handleRequest app.js:22"), "the culprit's caller: {row}");
    assert!(!text.contains("handleRequest app.js:22 [js]"), "stacks start collapsed\n{text}");
}

#[test]
fn s_cycles_the_sort_order() {
    let mut app = app();
    let order = |screen: &[String]| {
        let at = |name: &str| line_with(screen, name).map(|(i, _)| i).expect("row shown");
        let mut rows =
            [("leak", at("▸ rememberOrder")), ("cache", at("▸ fillCache")), ("churn", at("▸ parse_request"))];
        rows.sort_by_key(|(_, i)| *i);
        rows.map(|(name, _)| name)
    };
    let screen = render(&app);
    assert!(screen.join("\n").contains("sorted by suspicion"));
    assert_eq!(order(&screen), ["leak", "cache", "churn"]);
    assert_eq!(press(&mut app, KeyCode::Char('s')), Action::Continue);
    let screen = render(&app);
    assert!(screen.join("\n").contains("sorted by held bytes"));
    assert_eq!(order(&screen), ["cache", "leak", "churn"]);
    press(&mut app, KeyCode::Char('s'));
    let screen = render(&app);
    assert!(screen.join("\n").contains("sorted by growth"));
    assert_eq!(order(&screen), ["churn", "leak", "cache"]);
    press(&mut app, KeyCode::Char('s'));
    assert_eq!(order(&render(&app)), ["leak", "cache", "churn"]);
}

#[test]
fn enter_expands_the_selected_stack_and_the_selection_follows_the_suspect() {
    let mut app = app();
    press(&mut app, KeyCode::Enter);
    let screen = render(&app);
    let text = screen.join("\n");
    let (culprit_row, _) =
        line_with(&screen, "→ rememberOrder app.js:9 [js]").unwrap_or_else(|| panic!("{text}"));
    let (caller_row, _) =
        line_with(&screen, "handleRequest app.js:22 [js]").unwrap_or_else(|| panic!("{text}"));
    let (leaf_row, _) = line_with(&screen, "mmap64 [libc.so.6]").unwrap_or_else(|| panic!("{text}"));
    assert!(text.contains("views: mapped 48.0 MiB leak · touched 40.0 MiB unattributed"), "{text}");
    assert!(text.contains("grew 60.0 MiB/min in 10 of 10 intervals"), "{text}");
    assert!(leaf_row < culprit_row && culprit_row < caller_row, "leaf first\n{text}");

    // Re-sorted by bytes the leak moves down, and stays selected and expanded.
    press(&mut app, KeyCode::Char('s'));
    press(&mut app, KeyCode::Enter);
    let text = render(&app).join("\n");
    assert!(!text.contains("handleRequest app.js:22 [js]"), "Enter again collapses it\n{text}");
    press(&mut app, KeyCode::Up);
    press(&mut app, KeyCode::Enter);
    let text = render(&app).join("\n");
    assert!(text.contains("→ fillCache cache.js:3 [js]"), "{text}");
    assert!(!text.contains("handleRequest app.js:22 [js]"), "{text}");
}

#[test]
fn pause_freezes_the_view_and_help_shows_the_keys() {
    let mut app = app();
    press(&mut app, KeyCode::Char('p'));
    let mut later = scripted();
    later.leaks[0].bytes = 99 * MIB;
    app.update(later.clone());
    let text = render(&app).join("\n");
    assert!(text.contains("PAUSED"), "{text}");
    assert!(text.contains("48.0 MiB") && !text.contains("99.0 MiB"), "{text}");
    press(&mut app, KeyCode::Char('p'));
    app.update(later);
    assert!(render(&app).join("\n").contains("99.0 MiB"));

    press(&mut app, KeyCode::Char('?'));
    let text = render(&app).join("\n");
    assert!(text.contains("q        quit: stop tracing and write every output asked for"), "{text}");
    assert_eq!(press(&mut app, KeyCode::Esc), Action::Continue);
    assert!(!render(&app).join("\n").contains("Any key closes this help"));
}

#[test]
fn q_and_ctrl_c_quit() {
    let mut app = app();
    assert_eq!(press(&mut app, KeyCode::Char('q')), Action::Quit);
    assert_eq!(app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::Quit);
    assert_eq!(press(&mut app, KeyCode::Char('c')), Action::Continue);
}

#[test]
fn an_oom_kill_and_an_empty_trace_are_said() {
    let mut report = scripted();
    report.oom_kills.push(OomKill {
        pid: 4242,
        comm: "node".into(),
        anon_rss_bytes: 500 * MIB,
        t_s: 61.0,
        ..OomKill::default()
    });
    report.target.oom_killed = true;
    let mut app = App::new();
    app.update(report);
    let text = render(&app).join("\n");
    assert!(text.contains("OOM kills 1  last: pid 4242 (node) at 1m 1s, anon-rss 500.0 MiB"), "{text}");
    assert!(text.contains("OOM-killed"), "{text}");

    let mut app = App::new();
    app.update(Report { tracked: vec!["mmap".into()], ..Report::default() });
    let text = render(&app).join("\n");
    assert!(text.contains("No suspects yet"), "{text}");
    assert!(!text.contains("limit    "), "no time to the limit without a timeline\n{text}");
}
