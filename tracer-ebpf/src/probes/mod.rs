mod backing_store;
mod cgroup;
mod common;
mod fault;
pub(crate) mod malloc;
mod mmap;
mod oom;
mod process;
mod stack;
