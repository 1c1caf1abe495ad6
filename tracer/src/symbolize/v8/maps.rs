//! Instance types of the maps in V8's read-only space, remembered.
//!
//! The root maps (`SharedFunctionInfo`, `ScopeInfo`, `BytecodeArray`, Code, strings…) live in
//! the read-only heap: pages mapped read-only for the isolate's whole life, which the GC
//! never moves nor reuses. A map found there keeps its address and its type, so its type
//! is read once; maps elsewhere (a `JSFunction`'s) are read every time.

use std::collections::HashMap;
use std::ops::Range;

use crate::procfs::maps::parse_maps;

/// Maps remembered at most.
const MAX_MAPS: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct ReadOnlyMaps {
    /// Anonymous read-only mappings of the process (V8's read-only heap among them).
    ranges: Vec<Range<u64>>,
    types: HashMap<u64, u16>,
}

impl ReadOnlyMaps {
    /// Finds the read-only anonymous mappings of `pid`.
    pub fn of(pid: u32) -> Self {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let ranges = parse_maps(&text)
            .into_iter()
            .filter(|m| m.readable && !m.writable && !m.executable && m.path.is_empty())
            .map(|m| m.start..m.end)
            .collect();
        Self { ranges, types: HashMap::new() }
    }

    /// The type of the map whose tagged address is `map`, if it was read before.
    pub fn known(&self, map: u64) -> Option<u16> {
        self.types.get(&map).copied()
    }

    /// Remembers the type read for `map` if the map is in read-only memory.
    pub fn learn(&mut self, map: u64, instance_type: u16) {
        let addr = map & !3;
        if self.types.len() < MAX_MAPS && self.ranges.iter().any(|r| r.contains(&addr)) {
            self.types.insert(map, instance_type);
        }
    }

    #[cfg(test)]
    pub fn with_range(range: Range<u64>) -> Self {
        Self { ranges: vec![range], types: HashMap::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_only_read_only_maps() {
        let mut maps = ReadOnlyMaps::with_range(0x1000..0x2000);
        maps.learn(0x1101, 262);
        maps.learn(0x3101, 2066);
        assert_eq!(maps.known(0x1101), Some(262));
        assert_eq!(maps.known(0x3101), None, "a map outside read-only memory may move");
    }

    #[test]
    fn finds_read_only_mappings() {
        // Our own process has read-only anonymous memory only by chance; just parse it.
        let maps = ReadOnlyMaps::of(std::process::id());
        assert!(maps.ranges.iter().all(|r| r.start < r.end));
    }
}
