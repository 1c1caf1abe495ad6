//! From the model to the report: suspects grouped by culprit, with evidence per view;
//! segment growth; OOM kills; the timeline.

pub mod culprit;
pub mod limit;
mod suspects;
pub mod trend;

pub use culprit::{CulpritRules, culprit, culprit_index, segment_of};
pub use suspects::build_report;
pub use trend::{History, Trend, Verdict, assess, series_key};

use crate::{
    events::OomRecord,
    model::{StackAgg, StackId},
    procfs::{self, Memcg},
    report::{Frame, MemoryBreakdown, OomKill, TimelinePoint, Totals},
};

/// Everything the report is made from, gathered by the session.
pub struct ReportInputs<'a> {
    pub target: crate::report::Target,
    pub duration_s: f64,
    pub tracked: Vec<String>,
    pub totals: Totals,
    /// Held memory by stack and view, as the model and the other views group it.
    pub stacks: Vec<StackAgg>,
    /// End of the trace (`bpf_ktime_get_ns` clock), for ages.
    pub end_ns: u64,
    /// Symbolized frames of a stack, leaf first.
    pub frames: &'a dyn Fn(StackId) -> Vec<Frame>,
    pub ooms: &'a [OomKill],
    pub timeline: Vec<TimelinePoint>,
    pub history: &'a History,
    pub lost_events: u64,
    pub rules: &'a CulpritRules,
    pub memory: Option<MemoryBreakdown>,
    /// The target runs V8 (the advice for segments names the JS heap view and Buffer probes).
    pub node: bool,
    /// The processes traced, indexed by [`crate::model::ProcIndex`].
    pub processes: Vec<crate::report::Process>,
}

/// Whether a kill was made because the victim's cgroup hit its limit.
#[must_use]
///
/// The cgroup's `oom_kill` counter moves only after `oom:mark_victim` fires, and the OOM
/// reaper may already have lowered its usage when memtrace looks, so a kill counts as the
/// cgroup's when its limit is set and was reached: a kill already counted, usage at 90% of
/// the limit or more, or the kernel's count of limit hits.
pub fn oom_scope(memcg: Option<&Memcg>) -> &'static str {
    let Some(m) = memcg else { return "unknown" };
    if m.limit_bytes == 0 {
        return "machine";
    }
    let killed = m.oom_kills().unwrap_or(0) > 0;
    let full = m.usage_bytes().is_some_and(|u| u.saturating_mul(10) >= m.limit_bytes.saturating_mul(9));
    let hit = m.limit_hits().unwrap_or(0) > 0;
    if killed || full || hit { "cgroup" } else { "machine" }
}

/// The report's record of a kill: the kernel's figures plus the victim's cgroup, read
/// now (the caller passes the cgroup it read earlier when the victim may be gone).
#[must_use]
pub fn oom_kill(rec: &OomRecord, memcg: Option<Memcg>, cmdline: String, t_s: f64) -> OomKill {
    let memcg = memcg.or_else(|| procfs::memcg(rec.pid));
    OomKill {
        pid: rec.pid,
        comm: rec.comm.clone(),
        anon_rss_bytes: rec.anon_rss_bytes,
        file_rss_bytes: rec.file_rss_bytes,
        shmem_rss_bytes: rec.shmem_rss_bytes,
        total_vm_bytes: rec.total_vm_bytes,
        oom_score_adj: rec.oom_score_adj,
        cgroup: memcg.as_ref().map(|m| m.path.clone()).unwrap_or_default(),
        memcg_limit_bytes: memcg.as_ref().map_or(0, |m| m.limit_bytes),
        t_s,
        cmdline,
        scope: oom_scope(memcg.as_ref()).to_string(),
        trigger_pid: rec.trigger_pid,
        trigger_comm: rec.trigger_comm.clone(),
        pgtables_bytes: rec.pgtables_bytes.unwrap_or(0),
        uid: rec.uid,
        memcg_usage_bytes: memcg.as_ref().and_then(Memcg::usage_bytes).unwrap_or(0),
    }
}
