//! `memtrace oom`: every OOM kill on the machine, as it happens.

use std::{path::Path, process::ExitCode, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::SignalKind;
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
    crate::bpf::require_root()?;
    let format = OomFormat::load().context("read the oom:mark_victim tracepoint format")?;
    let mut tracer = Tracer::load(&LoadOptions {
        targets: Vec::new(),
        follow_children: false,
        track: TRACK_OOM,
        stack_copy_bytes: 512,
        ring_buffer_bytes: 1 << 20,
        fault_sample_period: 1,
        malloc: crate::bpf::uprobe::MallocSettings::default(),
    })
    .context("attach to oom:mark_victim")?;
    let mut events = crate::session::readable_fd(tracer.take_events().context("ring buffer already taken")?)
        .context("poll the ring buffer")?;
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let started = crate::session::monotonic_ns();
    let deadline = duration.and_then(|d| crate::duration::deadline(tokio::time::Instant::now(), d));
    eprintln!("memtrace: watching for OOM kills machine-wide; Ctrl-C to stop");
    let mut entries = Vec::new();
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("wait for events")?;
                while let Some(item) = guard.get_inner_mut().next() {
                    let Ok(Event::Oom { event }) = decode(&item) else { continue };
                    match format.decode(event) {
                        Ok(rec) => {
                            let t_s = rec.ts_ns.saturating_sub(started) as f64 / 1e9;
                            let entry = crate::analysis::oom_kill(&rec, None, procfs::cmdline(rec.pid), t_s);
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
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => break,
        }
    }
    let lost = tracer.counters()[tracer_common::COUNTER_RINGBUF_FULL as usize];
    if lost > 0 {
        eprintln!("memtrace: {lost} OOM events were lost (ring buffer full)");
    }
    Ok(entries)
}
