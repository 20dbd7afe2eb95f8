//! Control-protocol frames (`fleet::control`) over QUIC streams, for `replicate --control`
//! and `evacuate`: a length prefix checked before anything is allocated, then the body.

use anyhow::Context;
use fleet::control::{body_len, decode_body, encode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The next message on `recv`; `None` when the peer ended the stream between frames.
pub async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> anyhow::Result<Option<T>> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e).context("reading a control frame"),
    }
    let mut body = vec![0u8; body_len(prefix)?];
    recv.read_exact(&mut body)
        .await
        .context("reading a control frame")?;
    Ok(Some(decode_body(&body)?))
}

/// Writes one message to `send`.
pub async fn write_msg<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> anyhow::Result<()> {
    send.write_all(&encode(msg)?)
        .await
        .context("writing a control frame")
}
