//! Draws the live view from [`App`]: a title line, the memory (the parts of RSS, the
//! cgroup and its limit, a sparkline), the suspects table with expandable stacks,
//! messages, and the keys.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize as _},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Wrap},
};

use super::model::{App, Suspect};
use crate::{
    export::{
        human::{duration, rate},
        text::time_to_limit,
    },
    report::{FrameKind, Report, SegmentVerdict, Source, TimelinePoint, Verdict},
    units::human_bytes as bytes,
};

/// Frames shown under an expanded suspect.
const MAX_FRAMES: usize = 32;
/// The sparkline: its title and two rows of bars.
const SPARK_ROWS: u16 = 3;

pub fn draw(frame: &mut Frame<'_>, app: &App) {
    let memory = memory_lines(app);
    let messages = app.messages().len().min(3);
    let memory_rows = memory.len() as u16 + SPARK_ROWS + 2;
    let [title, memory_area, suspects_area, messages_area, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(memory_rows),
        Constraint::Min(4),
        Constraint::Length(if messages == 0 { 0 } else { messages as u16 + 2 }),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(title_line(app)), title);
    draw_memory(frame, app, memory, memory_area);
    draw_suspects(frame, app, suspects_area);
    if messages > 0 {
        let lines: Vec<Line<'_>> = app
            .messages()
            .iter()
            .skip(app.messages().len() - messages)
            .map(|m| Line::raw(m.as_str()))
            .collect();
        frame.render_widget(
            Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Messages ")),
            messages_area,
        );
    }
    frame.render_widget(Paragraph::new(keys_line()), keys);
    if app.help() {
        draw_help(frame, frame.area());
    }
}

fn title_line(app: &App) -> Line<'static> {
    let report = app.report();
    let target = &report.target;
    let status = match (target.exited, target.oom_killed) {
        (_, true) => "OOM-killed",
        (true, false) => "exited",
        (false, false) => "running",
    };
    let name = if target.comm.is_empty() { String::new() } else { format!(" ({})", target.comm) };
    let mut spans = vec![
        Span::styled(" memtrace top ", Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED)),
        Span::raw(format!(
            " pid {}{name} · {status} · traced {} · tracking {}",
            target.pid,
            duration(report.duration_s),
            report.tracked.join(",")
        )),
    ];
    if app.paused() {
        spans.push(Span::styled(
            "  PAUSED (p resumes)",
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ));
    }
    Line::from(spans)
}

fn keys_line() -> Line<'static> {
    let key = |k: &'static str| Span::styled(k, Style::new().add_modifier(Modifier::BOLD));
    Line::from(vec![
        Span::raw(" "),
        key("s"),
        Span::raw(" sort  "),
        key("p"),
        Span::raw(" pause  "),
        key("↑↓"),
        Span::raw(" select  "),
        key("Enter"),
        Span::raw(" stack  "),
        key("?"),
        Span::raw(" help  "),
        key("q"),
        Span::raw(" quit and write the outputs"),
    ])
}

fn label(name: &'static str) -> Span<'static> {
    Span::styled(format!("{name:<9}"), Style::new().add_modifier(Modifier::BOLD))
}

/// The memory summary, one line each: RSS and its parts, the cgroup, the time to the
/// limit, what the views attribute, lost events and OOM kills, then the notes.
fn memory_lines(app: &App) -> Vec<Line<'static>> {
    let report = app.report();
    let now = report.timeline.last().copied().unwrap_or_default();
    let mut lines = vec![
        Line::from(vec![
            label("RSS"),
            Span::styled(bytes(now.rss_bytes), Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!(
                "  anon {} · file {} · shmem {}",
                bytes(now.rss_anon_bytes),
                bytes(now.rss_file_bytes),
                bytes(now.rss_shmem_bytes)
            )),
        ]),
        Line::from(vec![label("cgroup"), Span::raw(cgroup_text(&now))]),
    ];
    if let Some(ttl) = &report.time_to_limit {
        lines.push(Line::from(vec![label("limit"), Span::raw(time_to_limit(ttl))]));
    }
    if let Some(memory) = &report.memory {
        lines.push(Line::from(vec![label("where"), Span::raw(where_text(memory))]));
    }
    lines.push(Line::from(vec![label("traced"), Span::raw(traced_text(report, &now))]));
    for segment in report.segments.iter().filter(|s| s.verdict != SegmentVerdict::Flat) {
        let by = segment
            .extended_by
            .first()
            .map_or_else(String::new, |l| format!(", extended by {}", l.culprit.label()));
        lines.push(Line::from(vec![
            label("segment"),
            Span::styled(
                format!(
                    "{} {} {} ({}){by}",
                    segment.kind.label(),
                    bytes(segment.bytes),
                    rate(segment.growth_bytes_per_s),
                    match segment.verdict {
                        SegmentVerdict::Growing => "growing",
                        SegmentVerdict::Fragmentation => "fragmentation",
                        SegmentVerdict::Flat => "flat",
                    }
                ),
                Style::new().fg(Color::Yellow),
            ),
        ]));
    }
    let lost = Span::styled(
        format!("lost {}", report.lost_events),
        if report.lost_events > 0 {
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::new()
        },
    );
    let mut events =
        vec![label("events"), lost, Span::raw(format!(" · OOM kills {}", report.oom_kills.len()))];
    if let Some(kill) = report.oom_kills.last() {
        events.push(Span::styled(
            format!(
                "  last: pid {} ({}) at {}, anon-rss {}",
                kill.pid,
                kill.comm,
                duration(kill.t_s),
                bytes(kill.anon_rss_bytes)
            ),
            Style::new().fg(Color::Red),
        ));
    }
    lines.push(Line::from(events));
    lines.extend(app.notes().iter().map(|n| Line::raw(n.clone())));
    lines
}

/// The parts of RSS now, with how much each grew since the first snapshot.
fn where_text(memory: &crate::report::MemoryBreakdown) -> String {
    let parts: Vec<String> = memory
        .last
        .parts()
        .iter()
        .zip(memory.first.parts())
        .filter(|((_, now), _)| *now > 0)
        .map(|((name, now), (_, then))| {
            let grew = now.cast_signed().saturating_sub(then.cast_signed());
            if grew.unsigned_abs() >= 1 << 20 {
                let sign = if grew > 0 { '+' } else { '-' };
                format!("{name} {} ({sign}{})", bytes(*now), bytes(grew.unsigned_abs()))
            } else {
                format!("{name} {}", bytes(*now))
            }
        })
        .collect();
    if parts.is_empty() { "unknown".to_string() } else { parts.join(" · ") }
}

fn cgroup_text(now: &TimelinePoint) -> String {
    match (now.memcg_usage_bytes, now.memcg_limit_bytes) {
        (0, 0) => "not readable".to_string(),
        (usage, 0) => format!("{} charged, no limit", bytes(usage)),
        (usage, limit) => format!(
            "{} charged of its {} limit ({:.0}%)",
            bytes(usage),
            bytes(limit),
            usage as f64 * 100.0 / limit as f64
        ),
    }
}

/// What the traced views hold (never added together: they see the same memory).
fn traced_text(report: &Report, now: &TimelinePoint) -> String {
    let mut parts = Vec::new();
    if report.tracked.iter().any(|t| t == "mmap" || t == "brk") {
        parts.push(format!("mapped {}", bytes(now.outstanding_bytes)));
    }
    if report.tracked.iter().any(|t| t == "faults") {
        parts.push(format!("touched {}", bytes(now.resident_bytes)));
    }
    if report.tracked.iter().any(|t| t == "malloc") {
        parts.push(format!("heap {}", bytes(now.heap_bytes)));
    }
    if parts.is_empty() { "nothing attributed".to_string() } else { parts.join(" · ") }
}

fn draw_memory(frame: &mut Frame<'_>, app: &App, lines: Vec<Line<'static>>, area: Rect) {
    let block = Block::default().borders(Borders::ALL).title(" Memory ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [text, spark] =
        Layout::vertical([Constraint::Length(lines.len() as u16), Constraint::Length(SPARK_ROWS)])
            .areas(inner);
    frame.render_widget(Paragraph::new(lines), text);
    // The cgroup's usage is what meets the limit; RSS when it cannot be read.
    let now = app.report().timeline.last().copied().unwrap_or_default();
    let (name, history) = if now.memcg_usage_bytes > 0 {
        ("cgroup usage", app.usage_history())
    } else {
        ("RSS", app.rss_history())
    };
    let width = usize::from(spark.width);
    let data: Vec<u64> = history.iter().skip(history.len().saturating_sub(width)).copied().collect();
    let peak = data.iter().copied().max().unwrap_or(0);
    // Against the limit when there is one, so the gap to it shows.
    let max = if now.memcg_limit_bytes > 0 { now.memcg_limit_bytes.max(peak) } else { peak };
    let title = if now.memcg_limit_bytes > 0 {
        format!("{name}, last {}s, top = limit {}", data.len(), bytes(max))
    } else {
        format!("{name}, last {}s, top = {}", data.len(), bytes(max))
    };
    let [title_area, bars] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(spark);
    frame.render_widget(Paragraph::new(title), title_area);
    // The newest sample at the right edge.
    let pad = bars.width.saturating_sub(data.len() as u16);
    let bars = Rect { x: bars.x + pad, width: bars.width - pad, ..bars };
    frame.render_widget(
        Sparkline::default().data(&data).max(max.max(1)).style(Style::new().fg(Color::Cyan)),
        bars,
    );
}

fn verdict_style(verdict: Verdict) -> Style {
    match verdict {
        Verdict::Leak => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Verdict::WarmUp => Style::new().fg(Color::Yellow),
        Verdict::Churn | Verdict::InFlight => Style::new().fg(Color::Green),
        Verdict::Unknown | Verdict::Unattributed => Style::new(),
    }
}

fn draw_suspects(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let suspects = app.suspects();
    let block = Block::default().borders(Borders::ALL).title(format!(
        " Suspects ({}) · sorted by {} ",
        suspects.len(),
        app.sort().name()
    ));
    if suspects.is_empty() {
        let text = "No suspects yet: no memory held by a traced stack. They appear as the target allocates.";
        frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }).block(block), area);
        return;
    }
    let selected = app.selected_key(&suspects);
    let mut rows = Vec::new();
    let mut selected_row = None;
    for (rank, suspect) in suspects.iter().enumerate() {
        if selected.as_deref() == Some(suspect.key.as_str()) {
            selected_row = Some(rows.len());
        }
        rows.push(suspect_row(rank + 1, suspect, app.is_expanded(&suspect.key)));
        if app.is_expanded(&suspect.key) {
            rows.extend(frame_rows(suspect));
        }
    }
    let header = Row::new(["#", "held", "growth", "verdict", "limit in", "view", "culprit (Enter: stack)"])
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let widths = [
        Constraint::Length(3),
        Constraint::Length(10),
        Constraint::Length(13),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Length(14),
        Constraint::Fill(1),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected(selected_row);
    frame.render_stateful_widget(table, area, &mut state);
}

fn suspect_row(rank: usize, suspect: &Suspect<'_>, expanded: bool) -> Row<'static> {
    let leak = suspect.leak;
    let marker = if expanded { "▾ " } else { "▸ " };
    let culprit = suspect.culprit_label();
    let js = suspect.culprit.and_then(|i| leak.frames.get(i)).is_some_and(|f| f.kind == FrameKind::Js);
    // The caller tells apart suspects whose culprit is a shared helper.
    let caller = suspect
        .culprit
        .and_then(|i| leak.frames.get(i + 1))
        .map_or_else(String::new, |f| format!("  ← {}", f.label()));
    Row::new(vec![
        Cell::from(rank.to_string()),
        Cell::from(bytes(leak.bytes)),
        Cell::from(rate(leak.growth_bytes_per_s)),
        Cell::from(Span::styled(leak.verdict.name(), verdict_style(leak.verdict))),
        Cell::from(suspect.limit_in_s.map_or_else(|| "-".to_string(), duration)),
        Cell::from(leak.view.map_or_else(|| sources(leak), |v| v.view().to_string())),
        Cell::from(Line::from(vec![
            Span::raw(marker),
            Span::raw(culprit).bold(),
            Span::raw(if js { " [js]" } else { "" }),
            Span::styled(caller, Style::new().fg(Color::DarkGray)),
        ])),
    ])
}

fn sources(leak: &crate::report::Leak) -> String {
    leak.sources.iter().map(|s| s.name()).collect::<Vec<_>>().join(",")
}

/// A row with text in the culprit column only.
fn text_row(text: String) -> Row<'static> {
    Row::new(vec![Cell::from(""); 6].into_iter().chain([Cell::from(text)]).collect::<Vec<_>>())
}

/// Under an expanded suspect: what each view says, then the stack, leaf first, the
/// culprit marked.
fn frame_rows(suspect: &Suspect<'_>) -> Vec<Row<'static>> {
    let leak = suspect.leak;
    let frames = &leak.frames;
    let evidence: Vec<String> = leak
        .evidence
        .iter()
        .map(|e| format!("{} {} {}", e.source.map_or("?", Source::view), bytes(e.bytes), e.verdict))
        .collect();
    let mut rows = Vec::new();
    if !evidence.is_empty() {
        rows.push(
            text_row(format!("    views: {}", evidence.join(" · "))).style(Style::new().fg(Color::DarkGray)),
        );
    }
    if !leak.reason.is_empty() {
        rows.push(text_row(format!("    {}", leak.reason)).style(Style::new().fg(Color::DarkGray)));
    }
    rows.extend(frames.iter().take(MAX_FRAMES).enumerate().map(|(i, f)| {
        let mark = if Some(i) == suspect.culprit { "  → " } else { "    " };
        let kind = match f.kind {
            FrameKind::Js => " [js]",
            FrameKind::Kernel => " [kernel]",
            FrameKind::Native | FrameKind::Unknown => "",
        };
        let text = format!("{mark}{}{kind}", f.label().replace(['\n', '\r'], " "));
        text_row(text).style(Style::new().fg(Color::DarkGray))
    }));
    if frames.len() > MAX_FRAMES {
        rows.push(text_row(format!(
            "    ... {} more frames (all of them are in --json)",
            frames.len() - MAX_FRAMES
        )));
    }
    rows
}

fn draw_help(frame: &mut Frame<'_>, area: Rect) {
    let text = vec![
        Line::from("s        sort by suspicion, held bytes, growth"),
        Line::from("p/space  pause the view (tracing goes on)"),
        Line::from("↑↓ j k   select a suspect"),
        Line::from("Enter    show or hide its stack (leaf first, → the culprit)"),
        Line::from("?        this help"),
        Line::from("q        quit: stop tracing and write every output asked for"),
        Line::from(""),
        Line::from("held: bytes the stack holds now in its view (mmap, brk, faults, malloc)."),
        Line::from("limit in: when this suspect alone, at its rate, fills the cgroup limit."),
        Line::from("verdict: leak keeps growing; warm-up grew then stopped; churn gives back."),
        Line::from(""),
        Line::from("Any key closes this help."),
    ];
    let width = 78.min(area.width);
    let height = (text.len() as u16 + 2).min(area.height);
    let popup =
        Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(text).block(Block::default().borders(Borders::ALL).title(" Keys ")),
        popup,
    );
}
