//! memtrace: an eBPF memory tracer for live processes.
//!
//! Data flows one way: [`cli`] → [`bpf`] (load, attach) → [`events`] (ring buffer,
//! decoding) → [`model`] (live memory by stack) → [`analysis`] (leaks, OOM) →
//! [`symbolize`] → [`export`].

pub mod export;
pub mod report;
pub mod symbolize;
