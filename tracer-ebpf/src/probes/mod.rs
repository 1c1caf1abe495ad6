mod cgroup;
mod fault;
mod malloc;
mod mmap;
mod oom;
mod process;
mod stack;
