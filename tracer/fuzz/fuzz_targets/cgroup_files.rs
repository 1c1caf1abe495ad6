#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzzing::cgroup_files(data));
