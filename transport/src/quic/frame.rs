//! Reading and writing framed messages on QUIC streams.

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use thiserror::Error;

use crate::codec::{decode_body, decode_header, encode, pages_frame_len, CodecError, HEADER_LEN};
use crate::message::{Message, Pages};

/// Why a message could not be read from or written to a stream.
#[derive(Debug, Error)]
pub enum FrameError {
    /// quinn could not read the stream (reset by the peer, connection lost).
    #[error("read failed")]
    Read(#[from] quinn::ReadError),
    /// quinn could not write the stream (stopped by the peer, connection lost).
    #[error("write failed")]
    Write(#[from] quinn::WriteError),
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The bytes read are not a valid frame.
    #[error("malformed frame")]
    Codec(#[from] CodecError),
}

/// Reads one message. `Ok(None)` when the stream ended cleanly at a frame boundary.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Option<Message>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match recv.read(&mut header[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Truncated),
        }
    }
    let (ty, body_len) = decode_header(header)?;
    Ok(Some(decode_body(ty, read_body(recv, body_len).await?)?))
}

/// Reads exactly `len` bytes. When quinn hands over the whole body as one chunk (the usual
/// case for a page run) it is used as is, without a copy or a zero-filled buffer.
async fn read_body(recv: &mut RecvStream, len: usize) -> Result<Bytes, FrameError> {
    let mut first = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut got = 0;
    while got < len {
        let chunk = recv
            .read_chunk(len - got, true)
            .await?
            .ok_or(FrameError::Truncated)?;
        got += chunk.bytes.len();
        match (first.take(), joined.as_mut()) {
            (None, None) => first = Some(chunk.bytes),
            (Some(f), None) => {
                let mut b = bytes::BytesMut::with_capacity(len);
                b.extend_from_slice(&f);
                b.extend_from_slice(&chunk.bytes);
                joined = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&chunk.bytes),
        }
    }
    Ok(match (first, joined) {
        (_, Some(b)) => b.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// Writes one message.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), FrameError> {
    if let Message::Pages(p) = msg {
        return write_pages(send, p).await;
    }
    let mut buf = Vec::with_capacity(64);
    encode(msg, &mut buf);
    send.write_all(&buf).await?;
    Ok(())
}

/// Writes a fatal `Error` message as the last thing on `send`, and waits (briefly) until the
/// peer has it, so closing the connection right after does not discard the reason.
pub async fn write_final(send: &mut SendStream, msg: &Message) -> Result<(), FrameError> {
    write_message(send, msg).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), send.stopped()).await;
    Ok(())
}

/// Writes a `Pages` message handing its payload to quinn without copying it: a demand
/// reply, on the fault path, where a copy is latency; replies in flight are few, so their
/// segments cost quinn little ([`write_pages_batch`] says why that matters for the push).
pub async fn write_pages(send: &mut SendStream, pages: &Pages) -> Result<(), FrameError> {
    let mut header = Vec::with_capacity(HEADER_LEN + 10 + pages.kinds.len());
    append_pages_header(pages, &mut header);
    let mut chunks = [Bytes::from(header), pages.payload.clone()];
    send.write_all_chunks(&mut chunks).await?;
    Ok(())
}

/// Writes several `Pages` frames with one call: a push of scattered pages (a stale set)
/// is many one-page frames, and each write to the stream costs more than the frame.
///
/// Headers and small payloads are copied together into one chunk; payloads of
/// [`OWN_CHUNK`] or more go as chunks of their own, without copying. quinn keeps each
/// chunk as a segment of the stream's send buffer until it is acknowledged, and finds the
/// bytes of every STREAM frame it builds by walking those segments from the oldest: a
/// window of one-page frames in two chunks each is thousands of segments at 1 Gbit/s ×
/// 50 ms, and in an 8-VM fleet at that rate the walk took a twelfth of the machine
/// (docs/fleet.md). Copying a page costs less than a walk.
pub async fn write_pages_batch(send: &mut SendStream, batch: &[Pages]) -> Result<(), FrameError> {
    let mut chunks = batch_chunks(batch);
    send.write_all_chunks(&mut chunks).await?;
    Ok(())
}

/// Payloads at least this long are a chunk of their own in [`write_pages_batch`]: a copy
/// would cost more than the segment.
const OWN_CHUNK: usize = 16 * 1024;

/// The frames of `batch` as few chunks: runs of headers and small payloads joined, large
/// payloads shared.
fn batch_chunks(batch: &[Pages]) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    // Room for every frame but the large payloads: one allocation for a scattered batch.
    let small: u64 = batch
        .iter()
        .map(|p| pages_frame_len(p) - own_chunk(p).map_or(0, |c| c.len() as u64))
        .sum();
    let mut joined: Vec<u8> = Vec::with_capacity(small as usize);
    for pages in batch {
        append_pages_header(pages, &mut joined);
        let Some(payload) = own_chunk(pages) else {
            joined.extend_from_slice(&pages.payload);
            continue;
        };
        chunks.push(Bytes::from(std::mem::take(&mut joined)));
        chunks.push(payload.clone());
    }
    if !joined.is_empty() {
        chunks.push(Bytes::from(joined));
    }
    chunks
}

/// The payload of `pages` if it goes as a chunk of its own ([`OWN_CHUNK`]).
fn own_chunk(pages: &Pages) -> Option<&Bytes> {
    (pages.payload.len() >= OWN_CHUNK).then_some(&pages.payload)
}

/// Appends everything of a `Pages` frame up to its payload to `out`.
fn append_pages_header(pages: &Pages, out: &mut Vec<u8>) {
    // Encode an empty-payload copy (its kinds are shared, not copied), then patch the
    // length to cover the real payload.
    let shell = Message::Pages(Pages {
        first: pages.first,
        kinds: pages.kinds.clone(),
        payload: Bytes::new(),
    });
    let start = out.len();
    encode(&shell, out);
    let len = (out.len() - start - 4 + pages.payload.len()) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode_to_vec};
    use crate::message::PAGE_SIZE;

    #[test]
    fn split_pages_frame_equals_the_plain_encoding() {
        let mut mem = vec![3u8; 4 * PAGE_SIZE];
        mem[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
        let p = Pages::from_memory(9, &mem);
        let mut joined = Vec::new();
        append_pages_header(&p, &mut joined);
        joined.extend_from_slice(&p.payload);
        assert_eq!(joined, encode_to_vec(&Message::Pages(p.clone())));
        let (back, _) = decode(&joined).unwrap().unwrap();
        assert_eq!(back, Message::Pages(p));
    }

    #[test]
    fn a_batch_is_its_frames_one_after_another_in_few_chunks() {
        let mut mem = vec![5u8; 8 * PAGE_SIZE];
        mem[2 * PAGE_SIZE..3 * PAGE_SIZE].fill(0);
        let batch = [
            Pages::from_memory(40, &mem[..PAGE_SIZE]),
            Pages::from_memory(7, &mem[..3 * PAGE_SIZE]),
            Pages::zeros(100, 3).unwrap(),
            Pages::from_memory(200, &mem),
            Pages::from_memory(300, &mem[..PAGE_SIZE]),
        ];
        let mut expected = Vec::new();
        for p in &batch {
            expected.extend_from_slice(&encode_to_vec(&Message::Pages(p.clone())));
        }
        let chunks = batch_chunks(&batch);
        // The three small frames and the large one's header; its payload, shared; the last.
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[1].as_ptr(), batch[3].payload.as_ptr(), "not copied");
        assert_eq!(chunks.concat(), expected);
        let mut rest = &expected[..];
        for p in &batch {
            let (back, used) = decode(rest).unwrap().unwrap();
            assert_eq!(back, Message::Pages(p.clone()));
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        assert!(batch_chunks(&[]).is_empty());
    }
}
