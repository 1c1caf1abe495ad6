//! memtrace: an eBPF memory tracer for live processes.
//!
//! Data flows one way: [`cli`] → [`bpf`] (load, attach) → [`events`] (ring buffer,
//! decoding) → [`model`] (live memory by stack) → [`analysis`] (leaks, OOM) →
//! [`symbolize`] → [`export`]. [`session`] drives one trace; [`app`] runs a command.
//! [`jsheap`] is the JS heap view of Node targets (V8's sampling heap profiler), whose
//! stacks arrive named.

pub mod analysis;
pub mod app;
pub mod bpf;
pub mod cli;
pub mod duration;
pub mod events;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod heap;
pub mod jsheap;
pub mod launch;
pub mod live;
pub mod model;
pub mod oomwatch;
pub mod output;
pub mod procfs;
pub mod push;
pub mod record;
pub mod report;
pub mod session;
pub mod symbolize;
pub mod units;
