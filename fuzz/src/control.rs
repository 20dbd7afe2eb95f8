//! Target `control`: the orchestrator's control protocol (`fleet::control`), what
//! `faultline replicate --control` reads from the network (requests) and `faultline
//! evacuate` reads back (replies).
//!
//! Checks: no input panics; a frame that decodes used a whole frame of at most
//! `MAX_FRAME` bytes of body, and its message re-encodes to a frame that decodes to the
//! same message.

use fleet::control::{
    decode, decode_body, encode, EvacState, ReplState, Reply, Request, Status, MAX_FRAME,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The target: `data` as a stream of request frames, as a stream of reply frames, and as
/// one body of each.
pub fn control(data: &[u8]) {
    frames::<Request>(data);
    frames::<Reply>(data);
    if let Ok(m) = decode_body::<Request>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<Reply>(data) {
        round_trip(&m);
    }
}

fn frames<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let mut buf = data;
    while let Ok((msg, used)) = decode::<T>(buf) {
        assert!(
            (4..=4 + MAX_FRAME).contains(&used) && used <= buf.len(),
            "decode used {used} of {} bytes",
            buf.len()
        );
        round_trip(&msg);
        buf = &buf[used..];
    }
}

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(msg: &T) {
    let Ok(frame) = encode(msg) else {
        // Only a message larger than a frame may not encode; it did not come in one.
        return;
    };
    match decode::<T>(&frame) {
        Ok((back, used)) => {
            assert_eq!(used, frame.len(), "{msg:?} re-encoded decodes short");
            assert_eq!(&back, msg, "decode(encode(m)) != m");
        }
        Err(e) => panic!("{msg:?} re-encoded does not decode: {e}"),
    }
}

/// One frame of every request and reply, and two frames in a row.
pub fn seeds() -> Vec<Vec<u8>> {
    let status = Status {
        vm_id: "web-1".into(),
        memory_bytes: 64 << 20,
        stale_bytes: 40960,
        dirty_rate_bps: 8_000_000,
        stale_growth_bps: Some(1_000_000),
        replication: ReplState::Running,
        evacuation: EvacState::Transferring,
        bytes_sent: 123_456,
        pages_remaining: Some(7),
        progress_age_ms: Some(40),
        progress_measured: None,
        pages_stale: None,
        error: None,
        pages_pushed: Some(300),
        wire_bytes_pushed: Some(600_000),
        pages_sampled: Some(256),
        wire_bytes_sampled: Some(500_000),
        disk_bytes: Some(1 << 30),
        own_rate_cap_bps: Some(40_000_000),
    };
    let failed = Status {
        evacuation: EvacState::Failed,
        replication: ReplState::Stopped,
        error: Some("the standby refused".into()),
        ..status.clone()
    };
    let mut out: Vec<Vec<u8>> = [
        Request::Status,
        Request::Evacuate { rate_cap_bps: None },
        Request::Evacuate {
            rate_cap_bps: Some(100_000_000),
        },
        Request::SetRate {
            rate_cap_bps: Some(40_000_000),
            seq: Some(1),
        },
    ]
    .iter()
    .filter_map(|m| encode(m).ok())
    .collect();
    out.extend(
        [
            Reply::Status(status.clone()),
            Reply::Accepted {
                rate_cap_honoured: false,
            },
            Reply::Refused {
                reason: "no".into(),
            },
            Reply::Event(status),
            Reply::Event(failed),
            Reply::RateSet {
                rate_cap_bps: Some(40_000_000),
                seq: Some(1),
            },
        ]
        .iter()
        .filter_map(|m| encode(m).ok()),
    );
    let two = [out[0].clone(), out[5].clone()].concat();
    out.push(two);
    out
}
