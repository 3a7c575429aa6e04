#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regmean_gpu::fuzzing::preprocessor_config(data));
