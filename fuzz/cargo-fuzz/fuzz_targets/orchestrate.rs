//! cargo-fuzz entry of the `orchestrate` target; the body is
//! `faultline_fuzz::orchestrate::orchestrate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::orchestrate::orchestrate(data));
