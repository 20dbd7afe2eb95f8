//! The embedding example a VMM author copies (`vmm-shim/examples/embed.rs`) runs and
//! migrates its guest memory byte for byte: userfaultfd, QUIC on loopback, two
//! `vm-memory` regions, a stand-in vCPU faulting on missing pages.

use std::process::Command;

use faultline_tests::embed_example;
use serde_json::Value;

#[test]
fn the_embedding_example_migrates_guest_memory_exactly() {
    let out = Command::new(embed_example())
        .arg("16")
        .output()
        .expect("run the embedding example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["digest_match"], true, "{v}");
    assert_eq!(v["source_digest"], v["dest_digest"], "{v}");
    assert_eq!(v["state_match"], true, "{v}");
    assert_eq!(v["pages"], 16 * 256, "{v}");
    // Every page was installed exactly once, by the push or on demand (how many the
    // stand-in vCPU faulted on depends on scheduling, so it is not asserted).
    let installed = |k: &str| v[k].as_u64().unwrap();
    assert_eq!(
        installed("installed_by_push") + installed("installed_on_demand"),
        16 * 256,
        "{v}"
    );
}
