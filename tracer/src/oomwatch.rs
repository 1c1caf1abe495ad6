//! `memtrace oom`: every OOM kill on the machine, as it happens.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use tracer_common::TRACK_OOM;

use crate::{
    bpf::{LoadOptions, Tracer},
    events::{Event, OomFormat, decode},
    procfs,
    report::OomKill,
    units::human_bytes,
};

pub fn watch(duration: Option<Duration>, json: Option<&Path>) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let entries = rt.block_on(watch_async(duration))?;
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&entries).context("encode OOM records")?;
        crate::output::write_bytes(path, (text + "\n").as_bytes())?;
        eprintln!("memtrace: wrote {} OOM record(s) to {}", entries.len(), path.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn watch_async(duration: Option<Duration>) -> anyhow::Result<Vec<OomKill>> {
    let mut signals = crate::session::StopSignals::install()?;
    crate::bpf::require_root()?;
    let format = OomFormat::load().context("read the oom:mark_victim tracepoint format")?;
    let mut tracer = Tracer::load(&LoadOptions {
        targets: Vec::new(),
        follow_children: false,
        cgroup: None,
        track: TRACK_OOM,
        stack_copy_bytes: 512,
        // The mapping events ring stays empty here: OOM records have their own.
        ring_buffer_bytes: 4096,
        fault_sample_period: 1,
        malloc: crate::bpf::uprobe::MallocSettings::default(),
        oom_record_len: format.record_len(),
    })
    .context("attach to oom:mark_victim")?;
    let mut events =
        crate::session::readable_fd(tracer.take_oom_events().context("ring buffer already taken")?)
            .context("poll the ring buffer")?;
    let started = crate::session::monotonic_ns();
    let deadline = duration.and_then(|d| crate::duration::deadline(tokio::time::Instant::now(), d));
    eprintln!("memtrace: watching for OOM kills machine-wide; Ctrl-C to stop");
    let mut entries = Vec::new();
    let mut kill_counts = KillCounts::scan();
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("wait for events")?;
                while let Some(item) = guard.get_inner_mut().next() {
                    let Ok(Event::Oom { event }) = decode(&item) else { continue };
                    match format.decode(event) {
                        Ok(rec) => {
                            let t_s = rec.ts_ns.saturating_sub(started) as f64 / 1e9;
                            let memcg = kill_counts.victim_memcg(rec.pid);
                            let entry = crate::analysis::oom_kill(&rec, memcg, procfs::cmdline(rec.pid), t_s);
                            println!(
                                "OOM kill: pid {} ({}) anon-rss {} file-rss {} shmem-rss {} total-vm {} oom_score_adj {} scope {} cgroup {} limit {} (allocating: {} {})",
                                entry.pid,
                                entry.comm,
                                human_bytes(entry.anon_rss_bytes),
                                human_bytes(entry.file_rss_bytes),
                                human_bytes(entry.shmem_rss_bytes),
                                human_bytes(entry.total_vm_bytes),
                                entry.oom_score_adj,
                                entry.scope,
                                if entry.cgroup.is_empty() { "?" } else { &entry.cgroup },
                                if entry.memcg_limit_bytes == 0 { "none".to_string() } else { human_bytes(entry.memcg_limit_bytes) },
                                entry.trigger_pid,
                                entry.trigger_comm,
                            );
                            entries.push(entry);
                        }
                        Err(e) => log::warn!("undecodable OOM record: {e}"),
                    }
                }
                guard.clear_ready();
            }
            () = signals.recv() => break,
            () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => break,
        }
    }
    let lost = tracer.counters()[tracer_common::COUNTER_OOM_LOST as usize];
    if lost > 0 {
        eprintln!("memtrace: {lost} OOM events were lost (ring buffer full)");
    }
    Ok(entries)
}

/// Where the memory cgroups are: the v1 memory controller, else the v2 hierarchy.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Cgroup directories visited at most per scan, and how deep.
const SCAN_MAX_DIRS: usize = 10_000;
const SCAN_MAX_DEPTH: usize = 16;
/// How long to wait for the victim's cgroup to count the kill (the kernel counts it
/// just after `oom:mark_victim`).
const KILL_COUNT_WAIT: Duration = Duration::from_millis(200);

/// The OOM kill count of every memory cgroup. A victim is often gone (or, on cgroup v1,
/// shown in the root cgroup) by the time its record is read; the cgroup whose count
/// went up is the one the kill was charged to.
struct KillCounts {
    v1: bool,
    root: PathBuf,
    counts: HashMap<PathBuf, u64>,
}

impl KillCounts {
    fn scan() -> Self {
        let v1_root = Path::new(CGROUP_ROOT).join("memory");
        let v1 = v1_root.join("memory.oom_control").exists();
        let root = if v1 { v1_root } else { PathBuf::from(CGROUP_ROOT) };
        let mut me = Self { v1, root, counts: HashMap::new() };
        me.counts = me.read_all();
        me
    }

    fn read_all(&self) -> HashMap<PathBuf, u64> {
        let file = if self.v1 { "memory.oom_control" } else { "memory.events" };
        let mut counts = HashMap::new();
        let mut stack = vec![(self.root.clone(), 0)];
        while let Some((dir, depth)) = stack.pop() {
            if counts.len() >= SCAN_MAX_DIRS {
                break;
            }
            if let Some(n) =
                std::fs::read_to_string(dir.join(file)).ok().and_then(|t| procfs::parse_keyed(&t, "oom_kill"))
            {
                counts.insert(dir.clone(), n);
            }
            if depth < SCAN_MAX_DEPTH
                && let Ok(entries) = std::fs::read_dir(&dir)
            {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| (e.path(), depth + 1)),
                );
            }
        }
        counts
    }

    /// The victim's memory cgroup: from /proc while it is there, else the one whose
    /// kill count went up.
    fn victim_memcg(&mut self, pid: u32) -> Option<procfs::Memcg> {
        let seen = procfs::memcg(pid).filter(|m| m.path != "/");
        let waited = std::time::Instant::now();
        let bumped = loop {
            let now = self.read_all();
            let bumped: Vec<PathBuf> = now
                .iter()
                .filter(|(dir, n)| self.counts.get(*dir).is_none_or(|before| *n > before))
                .map(|(dir, _)| dir.clone())
                .collect();
            if !bumped.is_empty() || seen.is_some() || waited.elapsed() >= KILL_COUNT_WAIT {
                self.counts = now;
                // The deepest cgroup that counted it (on v2 parents count their
                // children's kills too).
                break bumped.into_iter().max_by_key(|d| d.components().count());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if seen.is_some() {
            return seen;
        }
        let dir = bumped?;
        let rel = dir.strip_prefix(&self.root).ok()?;
        let path = format!("/{}", rel.display());
        let line = if self.v1 { format!("0:memory:{path}\n") } else { format!("0::{path}\n") };
        log::debug!("OOM victim {pid} was gone; its kill was counted by cgroup {path}");
        procfs::memcg_under(Path::new(CGROUP_ROOT), &line)
    }
}
