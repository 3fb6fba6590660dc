//! Fuzz the transmission-phase state machine the servers run, over an arbitrary byte stream
//! arriving in arbitrary pieces.
//!
//! The first bytes choose the connection parameters and the size of the pieces; the rest is
//! the stream. The [`Transmission`] machine is driven as both servers drive it: fed what has
//! arrived, each run request's payload taken off the stream by the driver. Asserts: no
//! panic; no allocation above the cap (see `capped_alloc`); it never asks for more than one
//! header at a time, nor skips or charges more than the 32 MiB payload cap; it never takes
//! more than it was given; once closed it stays closed; and it gives the same requests,
//! refusals and closes, at the same places in the stream, as [`RequestDecoder`] decoding the
//! whole stream at once (so after a refused request the next header is read from the right
//! place, whatever the pieces), with the header bytes re-encoding to what was sent.
#![no_main]

mod capped_alloc;

use clonebd_nbd::NbdError;
use clonebd_nbd::codec::{
    DecodeError, Frame, Progress, RequestDecoder, RequestHeader, TransmissionParams,
};
use clonebd_nbd::proto::{
    EXTENDED_REQUEST_LEN, HeaderStyle, MAX_PAYLOAD, transmission_flags as tf,
};
use clonebd_nbd::transmission::{Step, Transmission};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: capped_alloc::CappedAlloc = capped_alloc::CappedAlloc;

fn params(b: &[u8; 5]) -> TransmissionParams {
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

/// What the connection does with a header, and where in the stream that header ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Run(RequestHeader, usize),
    Refuse(RequestHeader, NbdError),
    Close(Option<(RequestHeader, NbdError)>, Option<DecodeError>),
}

/// The whole stream decoded at once by `RequestDecoder`; also whether it stopped for want
/// of bytes.
fn reference(p: TransmissionParams, mut stream: &[u8]) -> (Vec<(Event, usize)>, bool) {
    let decoder = RequestDecoder::new(p);
    let header_len = p.style.request_len();
    let mut events = Vec::new();
    let mut at = 0;
    loop {
        match decoder.decode(stream) {
            Ok(Progress::Need(n)) => {
                assert!(n > stream.len(), "asked for bytes it already had");
                assert!(
                    n <= EXTENDED_REQUEST_LEN + MAX_PAYLOAD as usize,
                    "asked for {n} bytes"
                );
                return (events, true);
            }
            Ok(Progress::Frame { frame, consumed }) => {
                assert!(consumed <= stream.len());
                let (header, event) = match frame {
                    Frame::Request(h, payload) => {
                        assert_eq!(payload.len() as u64, h.wire_payload(p.style));
                        assert_eq!(&stream[header_len..consumed], payload);
                        (h, Event::Run(h, payload.len()))
                    }
                    Frame::Reject(h, e) => (h, Event::Refuse(h, e)),
                    Frame::Disconnect(h) => (h, Event::Close(None, None)),
                };
                assert_eq!(
                    consumed as u64,
                    header_len as u64 + header.wire_payload(p.style)
                );
                let mut buf = [0u8; EXTENDED_REQUEST_LEN];
                let n = header.encode(p.style, &mut buf);
                assert_eq!(&buf[..n], &stream[..header_len]);
                events.push((event, at + header_len));
                if matches!(frame, Frame::Disconnect(_)) {
                    return (events, false);
                }
                at += consumed;
                stream = &stream[consumed..];
            }
            Err(e) => {
                let reply = match e {
                    DecodeError::PayloadTooLarge(h) => {
                        assert!(h.wire_payload(p.style) > u64::from(MAX_PAYLOAD));
                        Some((h, NbdError::Invalid))
                    }
                    _ => None,
                };
                events.push((Event::Close(reply, Some(e)), at + header_len));
                return (events, false);
            }
        }
    }
}

/// The stream fed to the machine in pieces of `piece` bytes, as a driver feeds it.
fn driven(p: TransmissionParams, stream: &[u8], piece: usize) -> Vec<(Event, usize)> {
    let mut m = Transmission::new(p);
    let mut events = Vec::new();
    // Bytes of the stream taken: by the machine, or by the driver as a payload.
    let mut at = 0;
    let mut payload = 0;
    let mut arrived = 0;
    while arrived < stream.len() {
        arrived = (arrived + piece).min(stream.len());
        loop {
            let take = payload.min(arrived - at);
            payload -= take;
            at += take;
            if payload > 0 {
                break;
            }
            let (used, step) = m.feed(&stream[at..arrived]);
            assert!(used <= arrived - at);
            at += used;
            let event = match step {
                Step::Need(n) => {
                    assert!(n > 0 && n <= EXTENDED_REQUEST_LEN, "needs {n}");
                    assert_eq!(at, arrived, "needs more with input left");
                    break;
                }
                Step::Skip(n) => {
                    assert!(n > 0 && n <= u64::from(MAX_PAYLOAD), "skips {n}");
                    assert_eq!(at, arrived, "skips more with input left");
                    break;
                }
                Step::Run {
                    header,
                    cost,
                    payload: n,
                } => {
                    assert!(cost <= MAX_PAYLOAD as usize && n <= MAX_PAYLOAD as usize);
                    payload = n;
                    Event::Run(header, n)
                }
                Step::Reply { header, error } => Event::Refuse(header, error),
                Step::Close { reply, error } => {
                    events.push((Event::Close(reply, error), at));
                    let closed = Step::Close {
                        reply: None,
                        error: None,
                    };
                    assert_eq!(m.feed(&stream[at..arrived]), (0, closed));
                    return events;
                }
            };
            events.push((event, at));
        }
    }
    events
}

fuzz_target!(|input: &[u8]| {
    let Some((head, stream)) = input.split_first_chunk::<5>() else {
        return;
    };
    let p = params(head);
    let piece = usize::from(head[4]) % 64 + 1;
    let (whole, short) = reference(p, stream);
    let pieces = driven(p, stream, piece);
    // The machine acts on a header before its payload is all there; the decoder waits for
    // the whole frame. So the machine may be one event ahead, where the decoder wanted bytes.
    assert!(pieces.len() >= whole.len(), "{pieces:?} / {whole:?}");
    assert_eq!(&pieces[..whole.len()], &whole[..]);
    assert!(pieces.len() == whole.len() || (short && pieces.len() == whole.len() + 1));
});
