#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regmean_gpu::fuzzing::image_file(data));
