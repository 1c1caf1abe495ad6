mod backing_store;
mod cgroup;
mod fault;
mod js_stack;
pub(crate) mod malloc;
mod mmap;
mod oom;
mod process;
mod stack;
