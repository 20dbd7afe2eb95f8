//! cargo-fuzz entry of the `nbd` target; the body is `faultline_fuzz::nbd::nbd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::nbd::nbd(data));
