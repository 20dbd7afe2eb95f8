//! cargo-fuzz entry of the `control` target; the body is `faultline_fuzz::control::control`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::control::control(data));
