//! Types shared by the eBPF programs and the `memtrace` userspace.
//!
//! Every type is `#[repr(C)]`, `Copy`, made of fixed-width integers with its padding
//! written out, and its size is asserted at compile time so that both sides agree.
#![cfg_attr(not(test), no_std)]

pub mod cfi;
pub mod config;
pub mod event;
pub mod malloc;
pub mod syscall;

pub use cfi::{CfiBiases, CfiChunk, CfiModule, CfiRow};
pub use config::*;
pub use event::*;
pub use malloc::*;
