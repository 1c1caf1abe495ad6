//! The live view's state: the latest report, what the person chose (sort, selection,
//! expanded stacks, pause, help), and the memory history the sparkline draws.
//!
//! Everything here is plain data driven by [`App::update`] (a report each second) and
//! [`App::on_key`]; the widgets only read it, so tests script both.

use std::collections::{HashSet, VecDeque};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::{
    analysis::{CulpritRules, culprit_index, limit::seconds_at_rate},
    report::{Frame, Leak, LimitState, Report, Source, Verdict},
};

/// Seconds of memory history kept for the sparkline (wider than any terminal).
const HISTORY: usize = 600;
/// Lines of captured stderr kept for the messages pane.
const MESSAGES: usize = 50;

/// How the suspects are ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// The report's own order: most suspect (growth that is kept) first.
    #[default]
    Suspicion,
    /// Most bytes held first.
    Held,
    /// Fastest growth first.
    Growth,
}

impl SortKey {
    #[must_use]
    pub fn next(self) -> Self {
        match self {
            Self::Suspicion => Self::Held,
            Self::Held => Self::Growth,
            Self::Growth => Self::Suspicion,
        }
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Suspicion => "suspicion",
            Self::Held => "held bytes",
            Self::Growth => "growth",
        }
    }
}

/// What the caller does after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Redraw and go on.
    Continue,
    /// End the trace as Ctrl-C does: every output asked for is written.
    Quit,
}

/// One suspect as the view shows it.
#[derive(Clone, Debug)]
pub struct Suspect<'a> {
    /// Stable across refreshes, to keep the selection and the expanded stacks.
    pub key: String,
    pub leak: &'a Leak,
    /// Index in `leak.frames` of the frame a person looks at first.
    pub culprit: Option<usize>,
    /// When this suspect alone, at its rate, uses up the cgroup's headroom.
    pub limit_in_s: Option<f64>,
}

impl Suspect<'_> {
    /// The culprit frame's label, or what stands in for it.
    #[must_use]
    pub fn culprit_label(&self) -> String {
        if self.leak.culprit != Frame::default() {
            return self.leak.culprit.label();
        }
        self.culprit
            .and_then(|i| self.leak.frames.get(i))
            .map_or_else(|| "[no stack captured]".to_string(), Frame::label)
    }
}

#[derive(Debug, Default)]
pub struct App {
    report: Report,
    /// One sample per update: the target's RSS and its cgroup's usage.
    rss: VecDeque<u64>,
    usage: VecDeque<u64>,
    sort: SortKey,
    paused: bool,
    help: bool,
    selected: Option<String>,
    expanded: HashSet<String>,
    messages: VecDeque<String>,
    /// Lines other parts of the trace add below the memory summary (e.g. pushes).
    notes: Vec<String>,
}

impl App {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the latest report, unless paused.
    pub fn update(&mut self, report: Report) {
        if self.paused {
            return;
        }
        if let Some(point) = report.timeline.last() {
            push_bounded(&mut self.rss, point.rss_bytes, HISTORY);
            push_bounded(&mut self.usage, point.memcg_usage_bytes, HISTORY);
        }
        self.report = report;
    }

    pub fn set_notes(&mut self, notes: Vec<String>) {
        self.notes = notes;
    }

    pub fn add_message(&mut self, line: String) {
        push_bounded(&mut self.messages, line, MESSAGES);
    }

    #[must_use]
    pub fn report(&self) -> &Report {
        &self.report
    }

    #[must_use]
    pub fn rss_history(&self) -> &VecDeque<u64> {
        &self.rss
    }

    #[must_use]
    pub fn usage_history(&self) -> &VecDeque<u64> {
        &self.usage
    }

    #[must_use]
    pub fn sort(&self) -> SortKey {
        self.sort
    }

    #[must_use]
    pub fn paused(&self) -> bool {
        self.paused
    }

    #[must_use]
    pub fn help(&self) -> bool {
        self.help
    }

    #[must_use]
    pub fn messages(&self) -> &VecDeque<String> {
        &self.messages
    }

    #[must_use]
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    #[must_use]
    pub fn is_expanded(&self, key: &str) -> bool {
        self.expanded.contains(key)
    }

    /// The selected suspect's key: the chosen one while it is listed, else the first.
    #[must_use]
    pub fn selected_key(&self, suspects: &[Suspect<'_>]) -> Option<String> {
        let chosen = self.selected.as_ref().filter(|key| suspects.iter().any(|s| &s.key == *key));
        chosen.cloned().or_else(|| suspects.first().map(|s| s.key.clone()))
    }

    /// Every suspect (flagged ones first, then the others) in the chosen order.
    #[must_use]
    pub fn suspects(&self) -> Vec<Suspect<'_>> {
        let headroom = self.report.time_to_limit.as_ref().and_then(|t| {
            (t.limit_bytes > 0 && t.state != LimitState::NoLimit)
                .then(|| t.limit_bytes.saturating_sub(t.usage_bytes))
        });
        let mut out: Vec<Suspect<'_>> = self
            .report
            .leaks
            .iter()
            .chain(&self.report.other_suspects)
            .map(|leak| Suspect {
                key: suspect_key(leak),
                leak,
                culprit: culprit(leak),
                limit_in_s: headroom
                    .filter(|_| leak.verdict == Verdict::Leak)
                    .and_then(|h| seconds_at_rate(h, leak.growth_bytes_per_s)),
            })
            .collect();
        // Stable: ties keep the report's order.
        match self.sort {
            SortKey::Suspicion => {}
            SortKey::Held => out.sort_by_key(|s| std::cmp::Reverse(s.leak.bytes)),
            SortKey::Growth => {
                out.sort_by(|a, b| b.leak.growth_bytes_per_s.total_cmp(&a.leak.growth_bytes_per_s));
            }
        }
        out
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::Continue;
        }
        // Raw mode turns Ctrl-C into a key: it quits as the signal would.
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        // The row shown selected stays selected when the order changes.
        self.selected = self.selected_key(&self.suspects());
        if self.help {
            // Any key closes the help; q still quits.
            self.help = false;
            return if key.code == KeyCode::Char('q') { Action::Quit } else { Action::Continue };
        }
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('?' | 'h') => self.help = true,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('p' | ' ') => self.paused = !self.paused,
            KeyCode::Enter => self.toggle_expanded(),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Home => self.move_selection(isize::MIN),
            KeyCode::End => self.move_selection(isize::MAX),
            _ => {}
        }
        Action::Continue
    }

    fn toggle_expanded(&mut self) {
        let suspects = self.suspects();
        let Some(key) = self.selected_key(&suspects) else { return };
        if !self.expanded.remove(&key) {
            self.expanded.insert(key);
        }
    }

    fn move_selection(&mut self, by: isize) {
        let suspects = self.suspects();
        let Some(current) = self.selected_key(&suspects) else { return };
        let at = suspects.iter().position(|s| s.key == current).unwrap_or(0);
        let to = at.saturating_add_signed(by).min(suspects.len() - 1);
        self.selected = Some(suspects[to].key.clone());
    }
}

fn push_bounded<T>(queue: &mut VecDeque<T>, value: T, cap: usize) {
    if queue.len() == cap {
        queue.pop_front();
    }
    queue.push_back(value);
}

/// A suspect is its view and its stack.
fn suspect_key(leak: &Leak) -> String {
    let frames: Vec<String> = leak.frames.iter().map(Frame::label).collect();
    let sources: Vec<&str> = leak.sources.iter().map(|s| s.name()).collect();
    format!("{}|{}|{}", leak.view.map_or("", Source::name), sources.join(","), frames.join(";"))
}

/// Where in the stack the culprit is: the report's culprit frame, or (a version-1
/// report) the one the analysis would pick.
fn culprit(leak: &Leak) -> Option<usize> {
    if leak.culprit != Frame::default()
        && let Some(i) = leak.frames.iter().position(|f| *f == leak.culprit)
    {
        return Some(i);
    }
    culprit_index(&leak.frames, &CulpritRules::default())
}
