//! MQTT over WebSocket (RFC 6455): the HTTP/1.1 upgrade on the configured
//! path with the `mqtt` sub-protocol, then binary frames carrying the MQTT
//! byte stream. Two small pump tasks translate between frames and an
//! in-memory pipe that the ordinary MQTT session runs over.

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use handler_api::{Connection, HandlerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::state::Shared;

const MAX_REQUEST: usize = 8 * 1024;
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub(crate) async fn serve(shared: Arc<Shared>, conn: Connection) -> Result<(), HandlerError> {
    let Connection {
        mut stream,
        shutdown,
        ..
    } = conn;
    // ---- HTTP upgrade ----
    let mut buf = BytesMut::with_capacity(1024);
    let head_len = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_REQUEST {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\r\n",
                )
                .await;
            return Ok(());
        }
        let n = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_millis(shared.config.connect_timeout_ms)) => return Ok(()),
            r = stream.read_buf(&mut buf) => r?,
        };
        if n == 0 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    buf.advance(head_len);
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or("");
    let mut parts = request.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let mut key = None;
    let mut upgrade = false;
    let mut protocols = Vec::new();
    for l in lines {
        let Some((n, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match n.trim().to_ascii_lowercase().as_str() {
            "sec-websocket-key" => key = Some(v.to_owned()),
            "upgrade" => upgrade = v.eq_ignore_ascii_case("websocket"),
            "sec-websocket-protocol" => {
                protocols.extend(v.split(',').map(|p| p.trim().to_owned()));
            }
            _ => {}
        }
    }
    if method != "GET" || path != shared.config.ws_path {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return Ok(());
    }
    let Some(key) = key.filter(|_| upgrade) else {
        let _ = stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
        return Ok(());
    };
    let proto = protocols
        .iter()
        .find(|p| p.as_str() == "mqtt" || p.as_str() == "mqttv3.1")
        .cloned();
    let accept = base64(&sha1(format!("{key}{GUID}").as_bytes()));
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = proto {
        resp.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    resp.push_str("\r\n");
    stream.write_all(resp.as_bytes()).await?;

    // ---- frames <-> pipe ----
    let (mqtt_side, pump_side) = tokio::io::duplex(16 * 1024);
    let (mut sock_r, mut sock_w) = tokio::io::split(stream);
    let (mut pipe_r, mut pipe_w) = tokio::io::split(pump_side);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<(u8, Vec<u8>)>(4);
    let max_frame = shared.config.max_packet_size as usize + 16;
    // socket -> pipe
    let reader = tokio::spawn(async move {
        let mut buf = buf;
        loop {
            match parse_frame(&mut buf, max_frame) {
                Ok(Some((opcode, payload))) => match opcode {
                    0 | 2 => {
                        if pipe_w.write_all(&payload).await.is_err() {
                            return;
                        }
                    }
                    8 => {
                        let _ = ctl_tx.send((8, Vec::new())).await;
                        return;
                    }
                    9 => {
                        let _ = ctl_tx.send((10, payload)).await;
                    }
                    10 => {}
                    _ => {
                        // Text frames are not MQTT (the spec requires binary).
                        let _ = ctl_tx.send((8, 1003u16.to_be_bytes().to_vec())).await;
                        return;
                    }
                },
                Ok(None) => match sock_r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                Err(()) => {
                    let _ = ctl_tx.send((8, 1009u16.to_be_bytes().to_vec())).await;
                    return;
                }
            }
        }
    });
    // pipe -> socket
    let writer = tokio::spawn(async move {
        let mut chunk = vec![0u8; 8 * 1024];
        let mut out = BytesMut::new();
        loop {
            tokio::select! {
                r = pipe_r.read(&mut chunk) => {
                    let n = match r { Ok(0) | Err(_) => 0, Ok(n) => n };
                    if n == 0 {
                        out.clear();
                        put_frame(&mut out, 8, &1000u16.to_be_bytes());
                        let _ = sock_w.write_all(&out).await;
                        let _ = sock_w.shutdown().await;
                        return;
                    }
                    out.clear();
                    put_frame(&mut out, 2, &chunk[..n]);
                    if sock_w.write_all(&out).await.is_err() { return; }
                }
                c = ctl_rx.recv() => {
                    let Some((op, payload)) = c else { continue };
                    out.clear();
                    put_frame(&mut out, op, &payload);
                    if sock_w.write_all(&out).await.is_err() || op == 8 {
                        let _ = sock_w.shutdown().await;
                        return;
                    }
                }
            }
        }
    });
    let r = crate::session::run(shared, Box::new(mqtt_side), shutdown).await;
    reader.abort();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer).await;
    r
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One frame from the front of `buf`: `(opcode, unmasked payload)`.
/// Fragmented binary frames are passed on piecewise (the MQTT stream does
/// not care where frames end).
fn parse_frame(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, Vec<u8>)>, ()> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let mut len = u64::from(buf[1] & 0x7F);
    let mut pos = 2;
    if len == 126 {
        if buf.len() < 4 {
            return Ok(None);
        }
        len = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
        pos = 4;
    } else if len == 127 {
        if buf.len() < 10 {
            return Ok(None);
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[2..10]);
        len = u64::from_be_bytes(b);
        pos = 10;
    }
    if len > max as u64 {
        return Err(());
    }
    let len = len as usize;
    let mask_len = if masked { 4 } else { 0 };
    if buf.len() < pos + mask_len + len {
        buf.reserve(pos + mask_len + len - buf.len());
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    if masked {
        mask.copy_from_slice(&buf[pos..pos + 4]);
    }
    buf.advance(pos + mask_len);
    let mut payload = buf.split_to(len).to_vec();
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
    }
    Ok(Some((opcode, payload)))
}

fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

/// SHA-1, only for the handshake's accept key (not for security).
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        h[0] = h[0].wrapping_add(a);
        h[1] = h[1].wrapping_add(b);
        h[2] = h[2].wrapping_add(c);
        h[3] = h[3].wrapping_add(d);
        h[4] = h[4].wrapping_add(e);
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        let k = format!("dGhlIHNhbXBsZSBub25jZQ=={GUID}");
        assert_eq!(base64(&sha1(k.as_bytes())), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn frames_round_trip_and_unmask() {
        let mut out = BytesMut::new();
        put_frame(&mut out, 2, &[1, 2, 3]);
        let mut b = out.clone();
        assert_eq!(parse_frame(&mut b, 100), Ok(Some((2, vec![1, 2, 3]))));
        // masked client frame
        let mut m = BytesMut::from(&[0x82u8, 0x83, 1, 2, 3, 4, 1 ^ 1, 2 ^ 2, 3 ^ 3][..]);
        assert_eq!(parse_frame(&mut m, 100), Ok(Some((2, vec![1, 2, 3]))));
        let mut big = BytesMut::from(&[0x82u8, 127, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(parse_frame(&mut big, 100), Err(()));
    }
}
