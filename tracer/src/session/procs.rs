//! The traced processes: the targets and, with `--children`, every process they fork.
//!
//! Each process has its own live-memory model and a symbol *space*: the program image its
//! addresses belong to. A forked child shares its parent's space (its address space is a
//! copy) until it execs; an exec starts a new space and an empty model (the old image's
//! memory is gone, not leaked). A process is known by its pid and its start time, so that
//! a reused pid is another process; one that exits keeps what it held and its symbols.

use std::collections::HashMap;

use log::debug;

use crate::{
    model::{LiveModel, MemOp, ProcIndex, StackAgg, StackId, Totals},
    procfs,
    report::{Frame, Process},
    symbolize::{ProcessSymbols, Regs},
};

/// One program image's symbols; `None` when the process was gone before they were read
/// (its stacks keep their addresses).
struct Space {
    symbols: Option<ProcessSymbols>,
}

/// One traced process.
struct Proc {
    pid: u32,
    /// Its pid in its own pid namespace, when it differs (a container's process).
    ns_pid: Option<u32>,
    /// `CLOCK_MONOTONIC` ns: the fork for a child, from `/proc/PID/stat` for a target.
    start_ns: u64,
    /// `starttime` of `/proc/PID/stat` (clock ticks since boot), once read: a pid whose
    /// start time differs is another process.
    start_ticks: Option<u64>,
    parent_pid: Option<u32>,
    comm: String,
    cmdline: String,
    exited_ns: Option<u64>,
    oom_killed: bool,
    execs: u32,
    model: LiveModel,
    space: u32,
    /// When its state was read from `/proc`: an exec before then is already reflected.
    read_ns: u64,
    /// `memtrace run`: traced from before the exec of the command; what the waiting
    /// shell's image did is not the command's, and the model starts at that exec.
    awaiting_exec: bool,
}

/// Every traced process, in the order they appeared ([`ProcIndex`] is the position).
pub(super) struct Processes {
    procs: Vec<Proc>,
    /// The current process of each pid.
    by_pid: HashMap<u32, usize>,
    spaces: Vec<Space>,
    /// Opens the symbols of processes that appear while tracing, off the event loop.
    opener: super::opener::Opener,
}

/// `CLOCK_MONOTONIC` ns of a process's start, from `/proc/PID/stat` (clock ticks since
/// boot, which counts suspended time: the difference of the two clocks now is taken off).
fn start_ns_of(ticks: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    let mut boot = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut boot) };
    let boot_ns = boot.tv_sec as u64 * 1_000_000_000 + boot.tv_nsec as u64;
    let suspended = boot_ns.saturating_sub(super::monotonic_ns());
    (ticks * 1_000_000_000 / hz).saturating_sub(suspended)
}

fn stat_number(pid: u32, field: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    procfs::stat_field(&stat, field)?.parse().ok()
}

/// The pid of `pid` in its innermost pid namespace, when it differs from `pid`.
fn ns_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    procfs::maps::parse_status(&status).ns_pid.filter(|&ns| ns != pid)
}

/// Every process descending from `pid` now, each with its parent, parents first (from the
/// `children` lists of its threads).
pub(super) fn descendants(pid: u32) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else { continue };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if child != pid && !out.iter().any(|&(c, _)| c == child) {
                    out.push((child, parent));
                    queue.push(child);
                }
            }
        }
    }
    out
}

/// `starttime` (field 22).
fn start_ticks(pid: u32) -> Option<u64> {
    stat_number(pid, 22)
}

/// `start_brk` (field 47): where the image's program break started, so that a model made
/// after an exec counts the break's growth since then.
fn start_brk(pid: u32) -> Option<u64> {
    stat_number(pid, 47).filter(|&b| b != 0)
}

impl Processes {
    pub(super) fn new() -> Self {
        Self {
            procs: Vec::new(),
            by_pid: HashMap::new(),
            spaces: Vec::new(),
            opener: super::opener::Opener::default(),
        }
    }

    fn new_space(&mut self, symbols: Option<ProcessSymbols>) -> u32 {
        self.spaces.push(Space { symbols });
        (self.spaces.len() - 1) as u32
    }

    fn push(&mut self, proc: Proc) -> ProcIndex {
        if let Some(&old) = self.by_pid.get(&proc.pid) {
            // The pid was reused: the process that had it is gone.
            let end = proc.start_ns;
            self.procs[old].exited_ns.get_or_insert(end);
        }
        self.by_pid.insert(proc.pid, self.procs.len());
        self.procs.push(proc);
        ProcIndex((self.procs.len() - 1) as u32)
    }

    /// A process traced as it is now: its memory map, program break and symbols are read
    /// from `/proc`. With `symbols`, the caller has opened them already.
    pub(super) fn add_running(
        &mut self,
        pid: u32,
        symbols: Option<ProcessSymbols>,
        parent_pid: Option<u32>,
    ) -> ProcIndex {
        let symbols = symbols
            .or_else(|| ProcessSymbols::new(pid).map_err(|e| debug!("symbols of process {pid}: {e}")).ok());
        self.add_proc(pid, symbols, parent_pid)
    }

    /// A process found while tracing (it joined a traced cgroup), traced as it is now; its
    /// symbols are opened off the event loop and its events held until then.
    pub(super) fn add_joined(&mut self, pid: u32) -> ProcIndex {
        let i = self.add_proc(pid, None, None);
        let space = self.procs[i.0 as usize].space;
        self.opener.request(pid, space);
        i
    }

    fn add_proc(&mut self, pid: u32, symbols: Option<ProcessSymbols>, parent_pid: Option<u32>) -> ProcIndex {
        let now = super::monotonic_ns();
        let space = self.new_space(symbols);
        let mut model = LiveModel::new();
        if let Some(brk) = procfs::program_break(pid) {
            model.set_initial_brk(brk);
        }
        let ticks = start_ticks(pid);
        self.push(Proc {
            pid,
            ns_pid: ns_pid(pid),
            start_ns: ticks.map_or(now, start_ns_of),
            start_ticks: ticks,
            parent_pid,
            comm: procfs::comm(pid),
            cmdline: procfs::cmdline(pid),
            exited_ns: None,
            oom_killed: false,
            execs: 0,
            model,
            space,
            read_ns: now,
            awaiting_exec: false,
        })
    }

    /// `memtrace run`: `pid` is the shell that execs the command. Its memory events until
    /// that exec belong to the shell's image and are dropped; the model starts at the
    /// exec, from the new image's `start_brk`. (Read from `/proc` after the exec, the
    /// break would already include the command's first growth, and the shell's events,
    /// which come before the exec's in the ring buffer, would land in the command's
    /// model: a brk from the shell's heap to the command's read as hundreds of GiB.)
    pub(super) fn await_exec(&mut self, pid: u32) {
        if let Some(&i) = self.by_pid.get(&pid) {
            self.procs[i].awaiting_exec = true;
        }
    }

    /// The process a kernel event of `tgid` belongs to. A process the kernel traces that
    /// was never announced (its fork event was lost) is read from `/proc` now.
    pub(super) fn index_of(&mut self, tgid: u32) -> ProcIndex {
        if let Some(&i) = self.by_pid.get(&tgid) {
            return ProcIndex(i as u32);
        }
        // Last events of a process already seen to end (its exit event comes later).
        let ticks = start_ticks(tgid);
        if let Some(i) = self.procs.iter().rposition(|p| p.pid == tgid)
            && (ticks.is_none() || ticks == self.procs[i].start_ticks)
        {
            return ProcIndex(i as u32);
        }
        debug!("process {tgid} traced without a fork event; reading it from /proc");
        self.add_running(tgid, None, None)
    }

    /// `child` was forked by `parent` at `ts_ns` and is traced from its first instruction:
    /// it starts with its parent's image and program break and holds nothing yet (what it
    /// inherited is its parent's memory, reported there).
    pub(super) fn on_fork(&mut self, child: u32, parent: u32, comm: String, ts_ns: u64) -> ProcIndex {
        if let Some(&known) = self.by_pid.get(&child)
            && self.procs[known].start_ticks.is_some()
            && self.procs[known].start_ticks == start_ticks(child)
        {
            // Found running at the start (a descendant of a target) before its fork's
            // event was read: the same process.
            return ProcIndex(known as u32);
        }
        let parent_i = self.index_of(parent).0 as usize;
        let (space, brk, cmdline) = {
            let p = &self.procs[parent_i];
            (p.space, p.model.brk(), p.cmdline.clone())
        };
        let mut model = LiveModel::new();
        if let Some(brk) = brk {
            model.set_initial_brk(brk);
        }
        self.push(Proc {
            pid: child,
            ns_pid: ns_pid(child),
            start_ns: ts_ns,
            start_ticks: start_ticks(child),
            parent_pid: Some(parent),
            comm,
            cmdline,
            exited_ns: None,
            oom_killed: false,
            execs: 0,
            model,
            space,
            read_ns: ts_ns,
            awaiting_exec: false,
        })
    }

    /// `pid` exec'd at `ts_ns`: the old image's memory is gone (not leaked) and its
    /// addresses now mean other code, so the model restarts and the symbols are read anew.
    pub(super) fn on_exec(&mut self, pid: u32, comm: String, ts_ns: u64) {
        let i = self.index_of(pid).0 as usize;
        if self.procs[i].awaiting_exec {
            // Symbols read before this exec are the shell's: replaced in place, since the
            // allocator view's stacks belong to the target's first space. Nothing of the
            // shell's image was modeled.
            if self.procs[i].read_ns <= ts_ns {
                let symbols =
                    ProcessSymbols::new(pid).map_err(|e| debug!("symbols of process {pid}: {e}")).ok();
                if let Some(space) = self.spaces.get_mut(self.procs[i].space as usize) {
                    space.symbols = symbols;
                }
            }
            let p = &mut self.procs[i];
            p.awaiting_exec = false;
            p.model = LiveModel::new();
            if let Some(brk) = start_brk(pid) {
                p.model.set_initial_brk(brk);
            }
            return;
        }
        if self.procs[i].read_ns > ts_ns {
            // Read from /proc after this exec: already the new image.
            return;
        }
        let space = self.new_space(None);
        self.opener.request(pid, space);
        let p = &mut self.procs[i];
        p.space = space;
        p.model = LiveModel::new();
        if let Some(brk) = start_brk(pid) {
            p.model.set_initial_brk(brk);
        }
        p.comm = comm;
        let cmdline = procfs::cmdline(pid);
        if !cmdline.is_empty() {
            p.cmdline = cmdline;
        }
        p.execs += 1;
        p.read_ns = super::monotonic_ns();
        if p.start_ticks.is_none() {
            p.start_ticks = start_ticks(pid);
        }
    }

    /// `pid` ended at `ts_ns`: it keeps what it held then, and its symbols.
    pub(super) fn on_exit(&mut self, pid: u32, ts_ns: u64) {
        if let Some(i) = self.by_pid.remove(&pid) {
            self.procs[i].exited_ns.get_or_insert(ts_ns);
        }
    }

    /// Marks processes whose exit was not announced (a lost event) as ended, by their
    /// `/proc` entry being gone or belonging to another process now.
    pub(super) fn reap(&mut self) {
        let now = super::monotonic_ns();
        let gone: Vec<u32> = self
            .by_pid
            .iter()
            .filter(|&(&pid, &i)| {
                let ticks = start_ticks(pid);
                ticks.is_none() || self.procs[i].start_ticks.is_some_and(|t| Some(t) != ticks)
            })
            .map(|(&pid, _)| pid)
            .collect();
        for pid in gone {
            self.on_exit(pid, now);
        }
    }

    pub(super) fn mark_oom_killed(&mut self, pid: u32) -> bool {
        match self.by_pid.get(&pid) {
            Some(&i) => {
                self.procs[i].oom_killed = true;
                true
            }
            None => false,
        }
    }

    /// Keeps a copy of a kernel record whose process's symbols are being opened (it is
    /// replayed by [`Self::ready_events`]); OOM records are never held.
    pub(super) fn hold(&mut self, record: &[u8]) -> bool {
        let (Some(kind), Some(tgid)) = (record.get(0..4), record.get(4..8)) else { return false };
        let kind = u32::from_ne_bytes([kind[0], kind[1], kind[2], kind[3]]);
        let tgid = u32::from_ne_bytes([tgid[0], tgid[1], tgid[2], tgid[3]]);
        kind != tracer_common::kind::OOM_MARK_VICTIM && self.opener.hold(tgid, record)
    }

    /// Installs the symbols opened since the last call (waiting up to `wait` for one) and
    /// returns the records held for their processes, to be handled again in order.
    pub(super) fn ready_events(&mut self, wait: Option<std::time::Duration>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for (space, symbols, events) in self.opener.ready(wait) {
            if let Some(s) = self.spaces.get_mut(space as usize) {
                s.symbols = symbols;
            }
            out.extend(events);
        }
        out
    }

    /// Whether symbols are still being opened.
    pub(super) fn opening(&self) -> bool {
        self.opener.busy()
    }

    /// Stops waiting for symbols: the records held, to be handled without them.
    pub(super) fn abandon_opening(&mut self) -> Vec<Vec<u8>> {
        self.opener.abandon()
    }

    /// Whether `pid` is a traced process that still runs.
    pub(super) fn is_running(&self, pid: u32) -> bool {
        self.by_pid.contains_key(&pid)
    }

    /// Processes still running.
    pub(super) fn live(&self) -> usize {
        self.by_pid.len()
    }

    /// How many processes were traced.
    pub(super) fn len(&self) -> usize {
        self.procs.len()
    }

    /// Unwinds a stack captured in process `proc`; returns the space its addresses belong
    /// to and the addresses, leaf first.
    pub(super) fn unwind(
        &mut self,
        proc: ProcIndex,
        regs: Regs,
        stack: &[u8],
        fp: &[u64],
    ) -> (u32, Vec<u64>) {
        let space = self.procs.get(proc.0 as usize).map_or(0, |p| p.space);
        let addrs = match self.spaces.get_mut(space as usize).and_then(|s| s.symbols.as_mut()) {
            Some(symbols) => symbols.unwind(regs, stack, fp),
            None => fp.to_vec(),
        };
        (space, addrs)
    }

    /// Frames of a stack of `space`, leaf first.
    pub(super) fn symbolize(&mut self, space: u32, addrs: &[u64]) -> Vec<Frame> {
        match self.spaces.get_mut(space as usize).and_then(|s| s.symbols.as_mut()) {
            Some(symbols) => symbols.symbolize(addrs).into_iter().flatten().collect(),
            None => addrs.iter().map(|a| Frame { function: format!("{a:#x}"), ..Frame::default() }).collect(),
        }
    }

    /// Re-reads the memory map of `pid` now, whatever the rate limit (it is about to end).
    pub(super) fn refresh_symbols(&mut self, pid: u32) {
        let Some(&i) = self.by_pid.get(&pid) else { return };
        let space = self.procs[i].space;
        if let Some(symbols) = self.spaces.get_mut(space as usize).and_then(|s| s.symbols.as_mut())
            && let Err(e) = symbols.refresh_maps()
        {
            debug!("re-read the memory map of process {pid}: {e}");
        }
    }

    /// Reads what the processes' perf maps gained (JIT code).
    pub(super) fn refresh_perf_maps(&mut self) {
        let live: Vec<u32> = self.by_pid.values().map(|&i| self.procs[i].space).collect();
        for space in live {
            if let Some(symbols) = self.spaces.get_mut(space as usize).and_then(|s| s.symbols.as_mut()) {
                symbols.refresh_perf_map();
            }
        }
    }

    pub(super) fn apply(&mut self, proc: ProcIndex, op: MemOp, stack: StackId, ts_ns: u64) {
        if let Some(p) = self.procs.get_mut(proc.0 as usize).filter(|p| !p.awaiting_exec) {
            p.model.apply(op, stack, ts_ns);
        }
    }

    /// Estimated heap bytes the processes' symbols keep per address seen.
    pub(super) fn symbol_cache_bytes(&self) -> usize {
        self.spaces.iter().filter_map(|s| s.symbols.as_ref()).map(ProcessSymbols::cache_bytes).sum()
    }

    /// Adds to `held` every stack a process's model attributes memory to (ended processes
    /// keep theirs).
    pub(super) fn held_stacks(&self, held: &mut std::collections::HashSet<StackId>) {
        for p in &self.procs {
            p.model.held_stacks(held);
        }
    }

    /// Held memory by stack and view in every process (ended ones keep what they held at
    /// their exit), biggest first.
    pub(super) fn by_stack(&self) -> Vec<StackAgg> {
        self.by_stack_before(u64::MAX)
    }

    /// [`Self::by_stack`] counting only memory allocated at or before `cutoff_ns`.
    pub(super) fn by_stack_before(&self, cutoff_ns: u64) -> Vec<StackAgg> {
        let mut out: Vec<StackAgg> = self
            .procs
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                p.model.by_stack_before(cutoff_ns).into_iter().map(move |mut agg| {
                    agg.proc = ProcIndex(i as u32);
                    agg
                })
            })
            .collect();
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.proc.cmp(&b.proc)).then(a.stack.cmp(&b.stack)));
        out
    }

    fn running(&self) -> impl Iterator<Item = &Proc> {
        self.by_pid.values().map(|&i| &self.procs[i])
    }

    /// The processes still running, the most mapped bytes first, as metrics samples (their
    /// RSS read now), at most `n`.
    pub(super) fn samples(&self, n: usize) -> Vec<super::metrics::ProcessSample> {
        let mut running: Vec<&Proc> = self.running().collect();
        running.sort_by_key(|p| std::cmp::Reverse(p.model.outstanding_bytes()));
        running
            .into_iter()
            .take(n)
            .map(|p| super::metrics::ProcessSample {
                pid: p.pid,
                comm: p.comm.clone(),
                rss_bytes: procfs::status(p.pid).map_or(0, |s| s.mem.rss),
                mapped_bytes: p.model.outstanding_bytes(),
            })
            .collect()
    }

    /// Mapped bytes held now by the processes still running.
    pub(super) fn outstanding_bytes(&self) -> u64 {
        self.running().map(|p| p.model.outstanding_bytes()).sum()
    }

    /// Sampled resident bytes held now by the processes still running.
    pub(super) fn resident_bytes(&self) -> u64 {
        self.running().map(|p| p.model.resident_bytes()).sum()
    }

    /// Running totals over every process.
    pub(super) fn totals(&self) -> Totals {
        self.procs.iter().map(|p| p.model.totals()).fold(Totals::default(), |a, b| Totals {
            allocated_bytes: a.allocated_bytes + b.allocated_bytes,
            freed_bytes: a.freed_bytes + b.freed_bytes,
            released_bytes: a.released_bytes + b.released_bytes,
            faulted_bytes: a.faulted_bytes + b.faulted_bytes,
            ops: a.ops + b.ops,
        })
    }

    /// Memory of the processes still running, summed (`None` when none could be read).
    pub(super) fn mem_status(&self) -> Option<procfs::MemStatus> {
        let mut sum: Option<procfs::MemStatus> = None;
        for p in self.running() {
            if let Ok(s) = procfs::status(p.pid) {
                let t = sum.get_or_insert_with(procfs::MemStatus::default);
                t.rss += s.mem.rss;
                t.rss_anon += s.mem.rss_anon;
                t.rss_file += s.mem.rss_file;
                t.rss_shmem += s.mem.rss_shmem;
            }
        }
        sum
    }

    /// The processes as the report lists them, indexed like [`ProcIndex`]; times are
    /// seconds since `start_ns`.
    pub(super) fn report(&self, start_ns: u64) -> Vec<Process> {
        let secs = |ns: u64| (ns as f64 - start_ns as f64) / 1e9;
        self.procs
            .iter()
            .map(|p| Process {
                pid: p.pid,
                ns_pid: p.ns_pid,
                parent_pid: p.parent_pid,
                comm: p.comm.clone(),
                cmdline: p.cmdline.clone(),
                started_s: secs(p.start_ns),
                exited_s: p.exited_ns.map(secs),
                oom_killed: p.oom_killed,
                execs: p.execs,
            })
            .collect()
    }
}

/// Names the JS frames of the allocator view's stacks, which are the first target's
/// (the allocator probes follow it only).
pub(super) struct FirstTarget<'a>(pub &'a mut Processes);

impl FirstTarget<'_> {
    fn symbols(&mut self) -> Option<(u32, &mut ProcessSymbols)> {
        let space = self.0.procs.first()?.space;
        let symbols = self.0.spaces.get_mut(space as usize)?.symbols.as_mut()?;
        Some((space, symbols))
    }
}

impl crate::heap::JsNamer for FirstTarget<'_> {
    fn v8_code(&mut self) -> Option<crate::symbolize::V8Code> {
        self.symbols()?.1.v8_code()
    }

    fn name(
        &mut self,
        frames: &[crate::symbolize::unwind::UnwoundFrame],
        sp: u64,
        windows: &[(u64, Vec<u8>)],
    ) -> (u32, Vec<u64>) {
        match self.symbols() {
            Some((space, symbols)) => (
                space,
                symbols
                    .name_js_frames_in(frames, crate::symbolize::v8::StackCopy { sp, bytes: &[], windows }),
            ),
            None => (0, frames.iter().map(|f| f.addr).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A process without symbols (tests do not read /proc of real children).
    fn fake(procs: &mut Processes, pid: u32) -> ProcIndex {
        let space = procs.new_space(None);
        procs.push(Proc {
            pid,
            ns_pid: None,
            start_ns: 1,
            start_ticks: None,
            parent_pid: None,
            comm: "parent".into(),
            cmdline: "parent --serve".into(),
            exited_ns: None,
            oom_killed: false,
            execs: 0,
            model: LiveModel::new(),
            space,
            read_ns: 0,
            awaiting_exec: false,
        })
    }

    fn map(procs: &mut Processes, tgid: u32, addr: u64, len: u64, stack: u32, ts: u64) {
        let i = procs.index_of(tgid);
        procs.apply(i, MemOp::Map { addr, len, reserved: false }, StackId(stack), ts);
    }

    #[test]
    fn a_child_holds_its_own_memory_and_keeps_it_after_exit() {
        let mut procs = Processes::new();
        let parent = fake(&mut procs, 5_000_000);
        map(&mut procs, 5_000_000, 0x1000_0000, MIB, 1, 10);
        let child = procs.on_fork(5_000_001, 5_000_000, "worker".into(), 20);
        assert_eq!(procs.procs[child.0 as usize].space, procs.procs[parent.0 as usize].space);
        // The same address in the child is the child's own (copy-on-write) mapping.
        map(&mut procs, 5_000_001, 0x2000_0000, 3 * MIB, 1, 30);
        procs.on_exit(5_000_001, 40);
        assert_eq!(procs.live(), 1);
        assert_eq!(procs.outstanding_bytes(), MIB, "the running processes hold the parent's only");
        let aggs = procs.by_stack();
        let held: Vec<_> = aggs.iter().map(|a| (a.proc, a.bytes)).collect();
        assert_eq!(held, vec![(child, 3 * MIB), (parent, MIB)], "the exited child's memory is kept");
        let listed = procs.report(0);
        assert_eq!(listed[1].parent_pid, Some(5_000_000));
        assert_eq!(listed[1].cmdline, "parent --serve");
        assert!(listed[1].exited_s.is_some() && listed[0].exited_s.is_none());
    }

    #[test]
    fn a_reused_pid_is_another_process() {
        let mut procs = Processes::new();
        fake(&mut procs, 5_000_000);
        let first = procs.on_fork(5_000_001, 5_000_000, "a".into(), 20);
        map(&mut procs, 5_000_001, 0x1000_0000, MIB, 1, 21);
        // Its exit event was lost; the pid comes back in a new fork.
        let second = procs.on_fork(5_000_001, 5_000_000, "b".into(), 50);
        map(&mut procs, 5_000_001, 0x1000_0000, 2 * MIB, 2, 51);
        assert_ne!(first, second);
        let aggs = procs.by_stack();
        assert_eq!(aggs.iter().find(|a| a.proc == first).map(|a| a.bytes), Some(MIB));
        assert_eq!(aggs.iter().find(|a| a.proc == second).map(|a| a.bytes), Some(2 * MIB));
        assert_eq!(procs.report(0)[first.0 as usize].exited_s, Some(50.0 / 1e9));
    }

    #[test]
    fn exec_drops_the_old_image() {
        let mut procs = Processes::new();
        let p = fake(&mut procs, 5_000_000);
        map(&mut procs, 5_000_000, 0x1000_0000, 8 * MIB, 1, 10);
        let old_space = procs.procs[p.0 as usize].space;
        procs.on_exec(5_000_000, "leaker".into(), 20);
        assert!(procs.by_stack().is_empty(), "the old image's mappings are gone, not leaked");
        assert_ne!(procs.procs[p.0 as usize].space, old_space, "new addresses, new symbols");
        let listed = procs.report(0);
        assert_eq!((listed[0].comm.as_str(), listed[0].execs), ("leaker", 1));
        // An exec older than what was read from /proc is already reflected.
        procs.procs[p.0 as usize].read_ns = 100;
        map(&mut procs, 5_000_000, 0x1000_0000, MIB, 1, 110);
        procs.on_exec(5_000_000, "again".into(), 90);
        assert_eq!(procs.outstanding_bytes(), MIB);
    }

    /// `memtrace run`: the waiting shell's events before the exec are not the command's,
    /// and the command's break is counted from its image's start (the bug: "allocated
    /// 205.2 GiB, freed 205.2 GiB" for a 132 KiB heap, or no heap at all).
    #[test]
    fn run_models_the_command_from_its_exec() {
        let mut procs = Processes::new();
        let me = std::process::id();
        let p = procs.add_running(me, None, None);
        procs.await_exec(me);
        // The shell's heap, far above the command's, grows and is mapped into.
        procs.apply(p, MemOp::Brk { new_brk: 0x7000_0000_0000 }, StackId(1), 1);
        map(&mut procs, me, 0x7100_0000_0000, MIB, 1, 2);
        assert_eq!(procs.totals().allocated_bytes, 0, "the shell's image is not traced");
        procs.on_exec(me, "cmd".into(), 3);
        let start = start_brk(me).expect("start_brk of this process");
        procs.apply(p, MemOp::Brk { new_brk: start + 132 * 1024 }, StackId(2), 4);
        let totals = procs.totals();
        assert_eq!(totals.allocated_bytes, 132 * 1024, "{totals:?}");
        assert_eq!(totals.freed_bytes, 0, "{totals:?}");
        let heap: Vec<_> = procs.by_stack().iter().map(|a| (a.stack, a.bytes)).collect();
        assert_eq!(heap, vec![(StackId(2), 132 * 1024)], "the whole heap, from its start");
    }

    /// A kernel record's first bytes: its kind and tgid.
    fn record(kind: u32, tgid: u32, tail: u8) -> Vec<u8> {
        let mut r = kind.to_ne_bytes().to_vec();
        r.extend(tgid.to_ne_bytes());
        r.push(tail);
        r
    }

    #[test]
    fn an_exec_opens_symbols_off_the_loop_and_holds_the_process_events_until_then() {
        let mut procs = Processes::new();
        // This test process stands for the one that exec'd: its symbols can be read.
        let me = std::process::id();
        let p = fake(&mut procs, me);
        let started = std::time::Instant::now();
        procs.on_exec(me, "test".into(), 20);
        assert!(
            started.elapsed() < std::time::Duration::from_millis(50),
            "on_exec returned after {:?}: it opened the symbols itself",
            started.elapsed()
        );
        let space = procs.procs[p.0 as usize].space;
        let (first, second) =
            (record(tracer_common::kind::MMAP, me, 1), record(tracer_common::kind::MUNMAP, me, 2));
        assert!(procs.hold(&first) && procs.hold(&second), "the process's records wait for its symbols");
        assert!(!procs.hold(&record(tracer_common::kind::MMAP, me + 1, 3)), "another process's are handled");
        assert!(!procs.hold(&record(tracer_common::kind::OOM_MARK_VICTIM, me, 4)), "OOM records never wait");
        let mut replayed = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while procs.opening() && std::time::Instant::now() < deadline {
            replayed.extend(procs.ready_events(Some(std::time::Duration::from_millis(100))));
        }
        assert_eq!(replayed, vec![first, second], "held records come back once, in order");
        assert!(procs.spaces[space as usize].symbols.is_some(), "the new image's symbols were installed");
        assert!(!procs.hold(&record(tracer_common::kind::MMAP, me, 5)), "nothing waits any more");
    }
}
