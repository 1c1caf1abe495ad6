#![no_std]
// This file exists to enable the library target, so that `tracer` can build-depend on
// this crate and be rebuilt when it changes.
