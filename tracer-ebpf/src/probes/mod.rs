mod backing_store;
mod cfi;
mod cgroup;
mod fault;
pub(crate) mod malloc;
mod mmap;
mod oom;
mod process;
mod stack;
