#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzzing::oom_format(data));
