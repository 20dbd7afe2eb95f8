//! Well-formed values the seed corpora are built from.

use transport::encoding::{EncodingPolicy, PageEncoder};
use transport::message::{
    DiskDesc, ErrorCode, Layout, Message, Pages, RegionDesc, SessionKind, SetKind, FEATURE_DEDUP,
    FEATURE_LZ4, PAGE_SIZE, PROTOCOL_VERSION,
};

/// Three pages: text-like, zero, the first again (small enough for a seed corpus).
pub fn image() -> Vec<u8> {
    let text: Vec<u8> = b"faultline moves memory; "
        .iter()
        .cycle()
        .take(PAGE_SIZE)
        .copied()
        .collect();
    let mut v = text.clone();
    v.extend_from_slice(&[0; PAGE_SIZE]);
    v.extend_from_slice(&text);
    v
}

/// One message of every type, and `Pages` of every page kind.
pub fn messages() -> Vec<Message> {
    let img = image();
    let mut enc = PageEncoder::new(EncodingPolicy::ALL, FEATURE_LZ4 | FEATURE_DEDUP);
    let encoded = enc.encode_push(10, &img);
    vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            kind: SessionKind::Evacuate,
            vm_id: "vm-1".into(),
            layout: Layout {
                page_size: PAGE_SIZE as u32,
                regions: vec![
                    RegionDesc {
                        guest_addr: 0,
                        len: 1 << 20,
                    },
                    RegionDesc {
                        guest_addr: 1 << 32,
                        len: 8192,
                    },
                ],
                disks: vec![DiskDesc {
                    name: "vda".into(),
                    len: 1 << 20,
                }],
            },
            features: FEATURE_LZ4 | FEATURE_DEDUP | transport::message::FEATURE_VM_STATE,
            epoch: 42,
            session_id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        },
        Message::HelloAck {
            version: PROTOCOL_VERSION,
            features: FEATURE_LZ4,
            conn_epoch: 0,
        },
        Message::Resume {
            session_id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            conn_epoch: 2,
            features: FEATURE_LZ4,
            pages: 130,
            checksum: 0x5eed,
        },
        Message::ResumeAck { conn_epoch: 2 },
        Message::Request {
            pages: vec![0, 7, 300],
            pushed_read: 65_536,
        },
        Message::Pages(Pages::from_memory(10, &img[..2 * PAGE_SIZE])),
        Message::Pages(encoded),
        Message::Update {
            pages: Pages::from_memory(3, &img[PAGE_SIZE..3 * PAGE_SIZE]),
            versions: vec![1, 9],
        },
        Message::Ack {
            entries: vec![(3, 1), (4, 9)],
        },
        Message::PageSet {
            kind: SetKind::Stale,
            first_word: 0,
            words: vec![0xff00, 1],
            last: true,
        },
        Message::PageSet {
            kind: SetKind::Held,
            first_word: 1,
            words: vec![u64::MAX],
            last: true,
        },
        Message::VmState {
            blob: b"vcpu state".to_vec(),
        },
        Message::PushDone { pages_sent: 4 },
        Message::Complete { pages_received: 4 },
        Message::CompleteAck,
        Message::Error {
            code: ErrorCode::LayoutMismatch,
            message: "layout differs".into(),
        },
    ]
}
