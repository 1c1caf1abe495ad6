mod fault;
mod mmap;
mod oom;
mod stack;
