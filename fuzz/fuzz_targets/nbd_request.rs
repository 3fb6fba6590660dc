//! Fuzz the transmission-phase request decoder over an arbitrary byte stream.
//!
//! The first bytes choose the connection parameters; the rest is the stream. Asserts: no
//! panic; no allocation above the cap (see `capped_alloc`); the decoder never asks for more
//! than one header plus the 32 MiB payload cap; and every frame spans exactly its header plus
//! the payload its header declares (so after a rejected request the next header is read from
//! the right place), with the header bytes re-encoding to what was consumed.
#![no_main]

mod capped_alloc;

use clonebd_nbd::codec::{
    DecodeError, Frame, Progress, RequestDecoder, RequestHeader, TransmissionParams,
};
use clonebd_nbd::proto::{
    EXTENDED_REQUEST_LEN, HeaderStyle, MAX_PAYLOAD, transmission_flags as tf,
};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: capped_alloc::CappedAlloc = capped_alloc::CappedAlloc;

fn params(b: &[u8; 4]) -> TransmissionParams {
    let style = match b[0] % 3 {
        0 => HeaderStyle::Simple,
        1 => HeaderStyle::Structured,
        _ => HeaderStyle::Extended,
    };
    let min_block = 1u32 << (b[1] % 17);
    // Sizes from tiny to enormous, to reach the overflow and range checks.
    let size = match b[2] % 4 {
        0 => 0,
        1 => 1 << 20,
        2 => (1 << 40) + u64::from(b[2]),
        _ => u64::MAX,
    };
    let mut flags = tf::HAS_FLAGS | (u16::from(b[3]) << 1);
    if style == HeaderStyle::Simple {
        flags &= !tf::SEND_DF;
    }
    TransmissionParams {
        style,
        size,
        min_block,
        max_payload: MAX_PAYLOAD,
        transmission_flags: flags,
        has_meta_contexts: b[3] & 1 == 1,
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((head, mut stream)) = input.split_first_chunk::<4>() else {
        return;
    };
    let p = params(head);
    let decoder = RequestDecoder::new(p);
    let header_len = p.style.request_len();
    loop {
        match decoder.decode(stream) {
            Ok(Progress::Need(n)) => {
                assert!(n > stream.len(), "asked for bytes it already had");
                assert!(
                    n <= EXTENDED_REQUEST_LEN + MAX_PAYLOAD as usize,
                    "asked for {n} bytes"
                );
                break;
            }
            Ok(Progress::Frame { frame, consumed }) => {
                assert!(consumed <= stream.len());
                let header = match frame {
                    Frame::Request(h, payload) => {
                        assert_eq!(payload.len() as u64, h.wire_payload(p.style));
                        assert_eq!(&stream[header_len..consumed], payload);
                        h
                    }
                    Frame::Reject(h, _) | Frame::Disconnect(h) => h,
                };
                assert_eq!(
                    consumed as u64,
                    header_len as u64 + header.wire_payload(p.style)
                );
                assert!(header.wire_payload(p.style) <= u64::from(MAX_PAYLOAD));
                let mut buf = [0u8; EXTENDED_REQUEST_LEN];
                let n = header.encode(p.style, &mut buf);
                assert_eq!(&buf[..n], &stream[..header_len]);
                assert_eq!(
                    RequestHeader::parse(p.style, &stream[..header_len]),
                    Ok(header)
                );
                if matches!(frame, Frame::Disconnect(_)) {
                    break;
                }
                stream = &stream[consumed..];
            }
            Err(DecodeError::PayloadTooLarge(h)) => {
                assert!(h.wire_payload(p.style) > u64::from(MAX_PAYLOAD));
                break;
            }
            Err(_) => break,
        }
    }
});
