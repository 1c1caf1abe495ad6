//! Symbols of processes that appear while tracing (an exec, a process joining a cgroup),
//! opened off the event loop.
//!
//! Opening a program's modules and parsing their unwind tables takes a Node image hundreds
//! of milliseconds; done in the event loop, every exec in a traced tree stalled the reading
//! of the ring buffer for that long. A thread of its own opens them instead. Until they are
//! ready, that process's events are held (copied, in order) and replayed afterwards, since
//! its stacks can only be unwound with its modules' tables; other processes' events go on.

use std::{
    collections::HashMap,
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender},
    time::{Duration, Instant},
};

use log::debug;

use crate::symbolize::ProcessSymbols;

/// Bytes of events held for one process at most; past it, its events are handled at once
/// (their stacks then keep frame-pointer frames only).
const HELD_BYTES_MAX: usize = 64 << 20;

/// A request: the space the symbols are for, and the process to read them from.
type Request = (u32, u32);
/// An answer: the space, the process, and its symbols if it could be read.
type Answer = (u32, u32, Option<ProcessSymbols>);

/// Events held for a process whose symbols are being opened.
struct Held {
    space: u32,
    events: Vec<Vec<u8>>,
    bytes: usize,
}

/// The opening thread, started on the first request, and what waits for it.
#[derive(Default)]
pub(super) struct Opener {
    worker: Option<(Sender<Request>, Receiver<Answer>)>,
    held: HashMap<u32, Held>,
}

impl Opener {
    /// Opens the symbols of `pid` for `space` on the thread; `pid`'s events are held until
    /// they are ready.
    pub(super) fn request(&mut self, pid: u32, space: u32) {
        let (tx, _) = self.worker.get_or_insert_with(spawn);
        if tx.send((space, pid)).is_err() {
            debug!("the symbol opener is gone; process {pid} keeps addresses");
            return;
        }
        self.held.insert(pid, Held { space, events: Vec::new(), bytes: 0 });
    }

    /// Keeps a copy of `event` if its process's symbols are being opened.
    pub(super) fn hold(&mut self, tgid: u32, event: &[u8]) -> bool {
        match self.held.get_mut(&tgid) {
            Some(held) if held.bytes + event.len() <= HELD_BYTES_MAX => {
                held.bytes += event.len();
                held.events.push(event.to_vec());
                true
            }
            _ => false,
        }
    }

    /// Whether symbols are still being opened.
    pub(super) fn busy(&self) -> bool {
        !self.held.is_empty()
    }

    /// Symbols opened since the last call, each with its space and the events held for its
    /// process (to be replayed in order). With `wait`, waits up to that long for the first.
    pub(super) fn ready(
        &mut self,
        wait: Option<Duration>,
    ) -> Vec<(u32, Option<ProcessSymbols>, Vec<Vec<u8>>)> {
        let Some((_, rx)) = &self.worker else { return Vec::new() };
        let mut out = Vec::new();
        let first = match wait {
            Some(wait) => rx.recv_timeout(wait).map_err(|e| e == RecvTimeoutError::Disconnected),
            None => rx.try_recv().map_err(|e| e == mpsc::TryRecvError::Disconnected),
        };
        let mut next = first.ok();
        while let Some((space, pid, symbols)) = next {
            // A request superseded by a later exec has no held events of its own.
            let events = match self.held.get(&pid) {
                Some(held) if held.space == space => {
                    self.held.remove(&pid).map(|h| h.events).unwrap_or_default()
                }
                _ => Vec::new(),
            };
            out.push((space, symbols, events));
            next = rx.try_recv().ok();
        }
        out
    }

    /// Gives up on everything still being opened: the held events, to be replayed without
    /// symbols.
    pub(super) fn abandon(&mut self) -> Vec<Vec<u8>> {
        let mut held: Vec<Held> = self.held.drain().map(|(_, h)| h).collect();
        held.sort_by_key(|h| h.space);
        held.into_iter().flat_map(|h| h.events).collect()
    }
}

fn spawn() -> (Sender<Request>, Receiver<Answer>) {
    let (request_tx, request_rx) = mpsc::channel::<Request>();
    let (answer_tx, answer_rx) = mpsc::channel::<Answer>();
    let spawned = std::thread::Builder::new().name("memtrace-symbols".into()).spawn(move || {
        for (space, pid) in request_rx {
            let started = Instant::now();
            let symbols = ProcessSymbols::new(pid).map_err(|e| debug!("symbols of process {pid}: {e}")).ok();
            debug!("symbols of process {pid} opened in {:.1?}, off the event loop", started.elapsed());
            if answer_tx.send((space, pid, symbols)).is_err() {
                return;
            }
        }
    });
    if let Err(e) = spawned {
        // Requests then fail to send and the processes keep their addresses.
        log::warn!("cannot start the symbol opener thread: {e}");
    }
    (request_tx, answer_rx)
}
