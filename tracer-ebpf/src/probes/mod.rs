mod mmap;
mod oom;
mod stack;
