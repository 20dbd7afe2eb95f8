//! cargo-fuzz entry of the `vhost_blk` target; the body is `faultline_fuzz::vhost_blk::vhost_blk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::vhost_blk::vhost_blk(data));
