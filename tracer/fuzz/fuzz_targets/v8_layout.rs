#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzzing::v8_layout(data));
