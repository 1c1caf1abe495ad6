//! Allocation probes that can be detached and attached again (`--malloc-duty`): a detached
//! uprobe costs nothing, whereas a disabled one still traps.

use std::{num::NonZeroU32, path::PathBuf};

use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};

use super::{AttachedAllocator, UprobeError, attach_one};

/// Programs whose probes duty cycling switches: the node-buffers allocation probes, which
/// have no return probe (a return probe's trap is at the function's entry too, so the
/// malloc family would need both switched, and its frees of unseen blocks are many).
pub(super) const CYCLED_PROGRAMS: &[&str] =
    &["uprobe_backing_store_new", "uprobe_backing_store_wrap", "uprobe_backing_store_wrap_isolate"];

/// Where a cycled probe goes.
#[derive(Debug, Clone)]
pub(super) struct CycledProbe {
    pub(super) program: &'static str,
    pub(super) symbol: &'static str,
    pub(super) module: String,
    pub(super) path: PathBuf,
    pub(super) offset: u64,
    pub(super) pid: u32,
}

impl AttachedAllocator {
    /// Whether some probes can be duty cycled.
    #[must_use]
    pub fn can_cycle(&self) -> bool {
        !self.cycled.is_empty()
    }

    /// Detaches the allocation probes (frees stay probed).
    pub fn disarm_allocations(&mut self) {
        self.cycled_links.clear();
    }

    /// Attaches the allocation probes again (nothing after [`Self::detach`]).
    pub fn arm_allocations(&mut self, ebpf: &mut Ebpf) -> Result<(), UprobeError> {
        if self.detached || !self.cycled_links.is_empty() {
            return Ok(());
        }
        for site in &self.cycled {
            let probe: &mut UProbe = ebpf
                .program_mut(site.program)
                .ok_or(UprobeError::MissingProgram(site.program))?
                .try_into()
                .map_err(|_| UprobeError::MissingProgram(site.program))?;
            let scope = NonZeroU32::new(site.pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
            let link = attach_one(probe, &site.path, site.offset, scope, None).map_err(|source| {
                UprobeError::Attach { path: site.module.clone(), symbol: site.symbol, pid: site.pid, source }
            })?;
            self.cycled_links.push(link);
        }
        Ok(())
    }
}
