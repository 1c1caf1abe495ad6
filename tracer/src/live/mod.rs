//! `memtrace top PID` / `attach --live`: a full-screen view of the trace, redrawn every
//! second from a [`Report`] snapshot.
//!
//! [`model`] holds what is shown and what the person chose, [`widgets`] draws it, and
//! [`terminal`] owns the screen. The session builds the report; this module only renders
//! it, so any report (a test's, a recording's) can be shown.

pub mod model;
mod terminal;
pub mod widgets;

#[cfg(test)]
mod tests;

use crossterm::event::Event;

pub use self::model::{Action, App};
use self::terminal::{Keys, Screen};
use crate::report::Report;

/// Captured stderr lines kept to print after the view closes.
const REPLAY_LINES: usize = 10_000;

/// The live view on the terminal. Dropping it restores the terminal.
pub struct LiveView {
    app: App,
    keys: Keys,
    screen: Screen,
    /// Everything stderr received meanwhile, printed again when the view closes.
    replay: Vec<String>,
}

impl LiveView {
    /// Takes over the terminal, or says why it cannot (no terminal on stdin or stderr)
    /// and returns `None`: the caller falls back to the status line.
    pub fn start() -> std::io::Result<Option<Self>> {
        if let Some(why) = terminal::no_terminal_reason() {
            eprintln!("memtrace: no live view ({why}); printing the status line instead");
            return Ok(None);
        }
        let screen = Screen::enter()?;
        let keys = Keys::spawn()?;
        Ok(Some(Self { app: App::new(), keys, screen, replay: Vec::new() }))
    }

    /// The next key or resize; pending forever once the reader has stopped.
    pub async fn next_event(&mut self) -> Event {
        match self.keys.events.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }

    pub fn handle(&mut self, event: &Event) -> Action {
        match event {
            Event::Key(key) => self.app.on_key(*key),
            _ => Action::Continue,
        }
    }

    #[must_use]
    pub fn paused(&self) -> bool {
        self.app.paused()
    }

    /// Shows `report` (unless paused) and the lines given to stderr since the last call.
    pub fn update(&mut self, report: Report) {
        self.app.update(report);
    }

    pub fn set_notes(&mut self, notes: Vec<String>) {
        self.app.set_notes(notes);
    }

    pub fn draw(&mut self) -> std::io::Result<()> {
        for line in self.screen.captured() {
            if self.replay.len() < REPLAY_LINES {
                self.replay.push(line.clone());
            }
            self.app.add_message(line);
        }
        let app = &self.app;
        self.screen.terminal().draw(|frame| widgets::draw(frame, app))?;
        Ok(())
    }

    /// Closes the view: the terminal is restored and what stderr received meanwhile is
    /// printed there (as on any other way out: this is the drop).
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for LiveView {
    fn drop(&mut self) {
        let rest = self.screen.restore();
        for line in self.replay.drain(..).chain(rest) {
            eprintln!("{line}");
        }
    }
}
