//! cargo-fuzz entry of the `plan_file` target; the body is `faultline_fuzz::plan_file::plan_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::plan_file::plan_file(data));
