//! Reads of the traced process's memory, many objects per system call.
//!
//! The garbage collector moves objects, so every read happens while the event is being
//! ingested, and everything read is checked (instance types, cross-references) before a
//! name is believed.

use std::collections::BTreeMap;

/// Reads another address space.
pub(crate) trait Memory {
    /// Reads each `(address, length)`; `None` for the ones that could not be read whole.
    fn read_many(&mut self, requests: &[(u64, usize)]) -> Vec<Option<Vec<u8>>>;

    fn read(&mut self, addr: u64, len: usize) -> Option<Vec<u8>> {
        self.read_many(&[(addr, len)]).pop().flatten()
    }
}

/// The most `iovec`s one `process_vm_readv` takes (`IOV_MAX`).
const IOV_MAX: usize = 1024;

/// `process_vm_readv` on a live process.
#[derive(Debug)]
pub(crate) struct ProcessMemory {
    pid: libc::pid_t,
    /// System calls made and bytes read, for the cost figures.
    pub calls: u64,
    pub bytes: u64,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        Self { pid: pid.cast_signed(), calls: 0, bytes: 0 }
    }

    /// One `process_vm_readv` for `requests`, all into `out`; returns how many leading
    /// requests were read whole (the kernel stops at the first unreadable byte).
    fn readv(&self, requests: &[(u64, usize)], out: &mut [u8]) -> usize {
        let mut local = Vec::with_capacity(requests.len());
        let mut remote = Vec::with_capacity(requests.len());
        let mut offset = 0;
        for &(addr, len) in requests {
            local.push(libc::iovec { iov_base: out[offset..].as_mut_ptr().cast(), iov_len: len });
            remote.push(libc::iovec { iov_base: addr as usize as *mut libc::c_void, iov_len: len });
            offset += len;
        }
        // SAFETY: each local iovec points into `out` at a disjoint range of its stated
        // length (the lengths sum to `out.len()`); remote iovecs are only addresses in the
        // other process, which the kernel checks. Counts are at most IOV_MAX.
        let n = unsafe {
            libc::process_vm_readv(
                self.pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        let Ok(mut n) = usize::try_from(n) else { return 0 };
        requests
            .iter()
            .take_while(|&&(_, len)| {
                let whole = n >= len;
                n = n.saturating_sub(len);
                whole
            })
            .count()
    }
}

impl Memory for ProcessMemory {
    fn read_many(&mut self, requests: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
        let mut out = vec![None; requests.len()];
        let mut next = 0;
        while next < requests.len() {
            let chunk = &requests[next..requests.len().min(next + IOV_MAX)];
            let total: usize = chunk.iter().map(|&(_, len)| len).sum();
            let mut buf = vec![0u8; total];
            self.calls += 1;
            let whole = self.readv(chunk, &mut buf);
            let mut offset = 0;
            for (i, &(_, len)) in chunk.iter().enumerate().take(whole) {
                out[next + i] = Some(buf[offset..offset + len].to_vec());
                self.bytes += len as u64;
                offset += len;
            }
            // Skip the request that failed, if one did; go on with the ones after it.
            next += if whole == chunk.len() { whole } else { whole + 1 };
        }
        out
    }
}

/// An address space made of byte ranges: captured heap objects, in tests and fuzzing.
#[derive(Clone, Debug, Default)]
pub(crate) struct FakeMemory {
    regions: BTreeMap<u64, Vec<u8>>,
}

impl FakeMemory {
    pub fn insert(&mut self, addr: u64, bytes: Vec<u8>) {
        self.regions.insert(addr, bytes);
    }

    /// Parses `ADDR HEX` lines (`#` starts a comment), as the testdata captures are written.
    #[cfg(test)]
    pub fn parse(text: &str) -> Self {
        let mut memory = Self::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (addr, hex) = line.split_once(' ').unwrap_or_else(|| panic!("bad capture line {line:?}"));
            let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).expect("hex address");
            let hex = hex.trim();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex bytes"))
                .collect();
            memory.insert(addr, bytes);
        }
        memory
    }

    fn read_one(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let (&start, bytes) = self.regions.range(..=addr).next_back()?;
        let from = usize::try_from(addr - start).ok()?;
        bytes.get(from..from.checked_add(len)?).map(<[u8]>::to_vec)
    }
}

impl Memory for FakeMemory {
    fn read_many(&mut self, requests: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
        requests.iter().map(|&(addr, len)| self.read_one(addr, len)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_in_batches() {
        let a = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let b = vec![9u8; 3000];
        let mut memory = ProcessMemory::new(std::process::id());
        let requests = [
            (a.as_ptr() as u64, a.len()),
            (8, 16),
            (b.as_ptr() as u64 + 100, 2000),
            (a.as_ptr() as u64 + 2, 2),
        ];
        let got = memory.read_many(&requests);
        assert_eq!(got[0].as_deref(), Some(&a[..]));
        assert_eq!(got[1], None, "unmapped address");
        assert_eq!(got[2].as_deref(), Some(&b[100..2100]));
        assert_eq!(got[3].as_deref(), Some(&[3u8, 4][..]), "requests after a failed one are retried");
        assert_eq!(memory.calls, 2);
    }

    #[test]
    fn many_requests_are_split_at_iov_max() {
        let data: Vec<u8> = (0..=255).collect();
        let requests: Vec<(u64, usize)> = (0..2500).map(|i| (data.as_ptr() as u64 + (i % 256), 1)).collect();
        let mut memory = ProcessMemory::new(std::process::id());
        let got = memory.read_many(&requests);
        assert!(got.iter().enumerate().all(|(i, b)| b.as_deref() == Some(&[(i % 256) as u8][..])));
        assert_eq!(memory.calls, 3);
    }

    #[test]
    fn gone_process_reads_nothing() {
        let mut memory = ProcessMemory::new(u32::MAX / 2);
        assert_eq!(memory.read_many(&[(0x1000, 8), (0x2000, 8)]), vec![None, None]);
    }

    #[test]
    fn fake_memory_reads_inside_regions() {
        let mut memory = FakeMemory::parse("# test\n0x1000 0102030405\n2000 ff\n");
        assert_eq!(memory.read(0x1001, 3), Some(vec![2, 3, 4]));
        assert_eq!(memory.read(0x1003, 3), None, "past the region's end");
        assert_eq!(memory.read(0x2000, 1), Some(vec![0xff]));
        assert_eq!(memory.read(0x0fff, 1), None);
    }
}
