//! One pusher per destination (`--pyroscope`, `--otlp-profiles`): every interval, the
//! current profile goes out on the tokio runtime beside the trace; a push still in flight
//! when the next is due makes that one skipped. Failures are counted and said, never fatal.

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::debug;

use super::{otlp, pyroscope};
use crate::report::Report;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("build the HTTP client for {0}: {1}")]
    Client(&'static str, #[source] reqwest::Error),
}

/// Where profiles go, and in which protocol.
#[derive(Clone, Debug)]
pub enum Destination {
    Pyroscope(pyroscope::Target),
    Otlp(otlp::Target),
}

impl Destination {
    /// `pyroscope` or `otlp`: the status line's and the metrics' name for it.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pyroscope(_) => "pyroscope",
            Self::Otlp(_) => "otlp",
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Pyroscope(t) => format!("{} as {}", t.ingest, t.app_name()),
            Self::Otlp(t) => format!("{} as {}", t.endpoint, t.resource.service),
        }
    }

    fn request(
        &self,
        client: &reqwest::Client,
        report: &Report,
        from: u64,
        until: u64,
    ) -> Result<reqwest::RequestBuilder, String> {
        match self {
            Self::Pyroscope(t) => t.request(client, report, from, until),
            Self::Otlp(t) => Ok(t.request(client, report, from, until)),
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    pushed: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Sends profiles to one destination.
pub struct Pusher {
    client: reqwest::Client,
    target: Destination,
    stats: Arc<Stats>,
    in_flight: Arc<AtomicBool>,
    /// Unix seconds the next push's profile starts at.
    from: u64,
    /// Pushes closer than this to the last are not made (a late event loop catches up on
    /// snapshots, one right after the other).
    min_gap: Duration,
    last: Option<std::time::Instant>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Pusher {
    /// A pusher for pushes every `interval`.
    pub fn new(target: Destination, interval: Duration) -> Result<Self, PushError> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("memtrace/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PushError::Client(target.name(), e))?;
        eprintln!("memtrace: pushing profiles to {}", target.describe());
        Ok(Self {
            client,
            target,
            stats: Arc::default(),
            in_flight: Arc::default(),
            from: unix_now(),
            min_gap: interval / 2,
            last: None,
        })
    }

    /// Starts pushing `report` (the profile since the last push) unless a push is still
    /// in flight; returns at once.
    pub fn push(&mut self, report: &Report) {
        if self.last.is_some_and(|last| last.elapsed() < self.min_gap) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        if self.in_flight.swap(true, Ordering::SeqCst) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let until = unix_now().max(self.from + 1);
        let request = self.target.request(&self.client, report, self.from, until);
        self.from = until;
        let (stats, in_flight, name) =
            (Arc::clone(&self.stats), Arc::clone(&self.in_flight), self.target.name());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = match request {
                Ok(request) => send(request).await,
                Err(e) => Err(e),
            };
            debug!("{name} push: {:?} in {:.1?}", result, started.elapsed());
            record(&stats, result);
            in_flight.store(false, Ordering::SeqCst);
        });
    }

    /// Pushes the final report and waits for it (and for a push in flight) to finish.
    pub async fn push_final(&mut self, report: &Report) {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT + CONNECT_TIMEOUT;
        while self.in_flight.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let until = unix_now().max(self.from + 1);
        let result = match self.target.request(&self.client, report, self.from, until) {
            Ok(request) => send(request).await,
            Err(e) => Err(e),
        };
        record(&self.stats, result);
    }

    /// `pyroscope: 12 pushed, 1 failed (last: ...)`.
    #[must_use]
    pub fn status(&self) -> String {
        let s = &self.stats;
        let (pushed, failed, skipped) = (
            s.pushed.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
            s.skipped.load(Ordering::Relaxed),
        );
        let mut out = format!("{}: {pushed} pushed, {failed} failed", self.target.name());
        if skipped > 0 {
            let _ = write!(out, ", {skipped} skipped (previous push still running)");
        }
        if failed > 0
            && let Some(e) = s.last_error.lock().ok().and_then(|e| e.clone())
        {
            let _ = write!(out, " (last: {e})");
        }
        out
    }

    /// The destination's name ([`Destination::name`]).
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.target.name()
    }

    /// Pushes that succeeded so far.
    #[must_use]
    pub fn pushed(&self) -> u64 {
        self.stats.pushed.load(Ordering::Relaxed)
    }

    /// Pushes that failed so far.
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.stats.failed.load(Ordering::Relaxed)
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<(), String> {
    let response = request.send().await.map_err(|e| describe(&e.without_url()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let body: String = body.trim().chars().take(200).collect();
    Err(format!("HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") }))
}

/// The error with its causes (reqwest's own message is only the outermost).
fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}

fn record(stats: &Stats, result: Result<(), String>) {
    match result {
        Ok(()) => {
            stats.pushed.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            debug!("profile push failed: {e}");
            stats.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = stats.last_error.lock() {
                *last = Some(e);
            }
        }
    }
}
