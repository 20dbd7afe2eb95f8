//! cargo-fuzz entry of the `replica` target; the body is `faultline_fuzz::replica::replica`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::replica::replica(data));
