#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tailweave_fuzz::otlp_json(data));
