//! Property tests of the sans-IO codec and handshake: round trips, and arbitrary input that
//! must never panic, over-ask or desynchronise.
#![allow(clippy::unwrap_used)]

use clonebd_nbd::codec::{
    ChunkBody, Frame, Progress, Reply, ReplyHeader, ReplyTo, RequestDecoder, RequestHeader,
    TransmissionParams, decode_reply, encode_block_status,
};
use clonebd_nbd::handshake::{ClientOption, ExportInfo, Handshake, Status};
use clonebd_nbd::proto::{
    Command, EXTENDED_REQUEST_LEN, HeaderStyle, IHAVEOPT, MAX_OPTION_LEN, MAX_PAYLOAD, reply_flags,
};
use clonebd_nbd::{BackendFlags, BlockSizes, Extent};
use proptest::prelude::*;

fn style() -> impl Strategy<Value = HeaderStyle> {
    prop_oneof![
        Just(HeaderStyle::Simple),
        Just(HeaderStyle::Structured),
        Just(HeaderStyle::Extended)
    ]
}

fn chunk_style() -> impl Strategy<Value = HeaderStyle> {
    prop_oneof![Just(HeaderStyle::Structured), Just(HeaderStyle::Extended)]
}

fn nbd_string() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,40}"
}

fn export() -> ExportInfo {
    ExportInfo::new(
        "disk",
        "d",
        1 << 30,
        BlockSizes {
            minimum: 512,
            preferred: 65536,
            maximum: 32 << 20,
        },
        BackendFlags {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            ..Default::default()
        },
        vec!["base:allocation".into(), "clonebd:hydrated".into()],
    )
    .unwrap()
}

fn client_option() -> impl Strategy<Value = ClientOption> {
    prop_oneof![
        nbd_string().prop_map(ClientOption::ExportName),
        Just(ClientOption::Abort),
        Just(ClientOption::List),
        Just(ClientOption::StartTls),
        (nbd_string(), prop::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, requests)| ClientOption::Info { name, requests }),
        (nbd_string(), prop::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, requests)| ClientOption::Go { name, requests }),
        Just(ClientOption::StructuredReply),
        (nbd_string(), prop::collection::vec(nbd_string(), 0..6))
            .prop_map(|(name, queries)| ClientOption::ListMetaContext { name, queries }),
        (nbd_string(), prop::collection::vec(nbd_string(), 0..6))
            .prop_map(|(name, queries)| ClientOption::SetMetaContext { name, queries }),
        Just(ClientOption::ExtendedHeaders),
        (12u32.., prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(option, data)| ClientOption::Unknown { option, data }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn request_header_round_trips(
        style in style(),
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    ) {
        let length = if style == HeaderStyle::Extended { length } else { length & 0xffff_ffff };
        let h = RequestHeader { flags, command: Command::from_wire(ty), cookie, offset, length };
        let mut buf = [0u8; EXTENDED_REQUEST_LEN];
        let n = h.encode(style, &mut buf);
        prop_assert_eq!(n, style.request_len());
        prop_assert_eq!(RequestHeader::parse(style, &buf[..n]), Ok(h));
    }

    #[test]
    fn client_option_round_trips(opt in client_option()) {
        let mut wire = Vec::new();
        opt.encode(&mut wire);
        prop_assert_eq!(u64::from_be_bytes(wire[..8].try_into().unwrap()), IHAVEOPT);
        let code = u32::from_be_bytes(wire[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(wire[12..16].try_into().unwrap()) as usize;
        prop_assert_eq!(len, wire.len() - 16);
        prop_assert_eq!(ClientOption::decode(code, &wire[16..]), Ok(opt));
    }

    #[test]
    fn error_chunk_round_trips(
        style in chunk_style(),
        cookie: u64,
        offset: u64,
        error in 1u32..,
        message in "[a-z ]{0,100}",
    ) {
        let h = ReplyHeader::error(style, cookie, offset, error, &message);
        let mut wire = h.as_bytes().to_vec();
        wire.extend_from_slice(message.as_bytes());
        let (reply, used) = decode_reply(&wire, MAX_PAYLOAD).unwrap().unwrap();
        prop_assert_eq!(used, wire.len());
        let echoed = if style == HeaderStyle::Extended { offset } else { 0 };
        prop_assert_eq!(reply, Reply::Chunk {
            flags: reply_flags::DONE,
            cookie,
            offset: echoed,
            body: ChunkBody::Error { error, message: message.into_bytes() },
        });
    }

    #[test]
    fn read_data_round_trips(style in chunk_style(), cookie: u64, offset: u64, data in prop::collection::vec(any::<u8>(), 1..2048)) {
        let h = ReplyHeader::read_data(style, cookie, offset, data.len() as u64);
        let mut wire = h.as_bytes().to_vec();
        wire.extend_from_slice(&data);
        let (reply, used) = decode_reply(&wire, MAX_PAYLOAD).unwrap().unwrap();
        prop_assert_eq!(used, wire.len());
        let Reply::Chunk { cookie: c, body, .. } = reply else { panic!("not a chunk") };
        prop_assert_eq!(c, cookie);
        prop_assert_eq!(body, ChunkBody::OffsetData { offset, data });
    }

    #[test]
    fn simple_and_done_replies_round_trip(style in style(), cookie: u64, offset: u64, error: u32) {
        let (reply, used) = decode_reply(ReplyHeader::simple(cookie, error).as_bytes(), MAX_PAYLOAD).unwrap().unwrap();
        prop_assert_eq!((reply, used), (Reply::Simple { cookie, error }, 16));
        let done = ReplyHeader::done(style, cookie, offset);
        let (reply, _) = decode_reply(done.as_bytes(), MAX_PAYLOAD).unwrap().unwrap();
        match reply {
            Reply::Simple { cookie: c, error: 0 } => prop_assert_eq!(c, cookie),
            Reply::Chunk { flags, cookie: c, body: ChunkBody::None, .. } => {
                prop_assert_eq!(style, HeaderStyle::Extended);
                prop_assert_eq!((flags, c), (reply_flags::DONE, cookie));
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn block_status_round_trips(
        style in chunk_style(),
        cookie: u64,
        id: u32,
        extents in prop::collection::vec((1u64..(1 << 31), any::<u32>()), 1..64),
    ) {
        // Compact chunks carry 32-bit lengths: keep them within u32::MAX rounded down to 512.
        let cap = if style == HeaderStyle::Extended { u64::MAX } else { (1 << 23) - 1 };
        let ext: Vec<Extent> =
            extents.iter().map(|&(l, f)| Extent { length: (l % cap).max(1) * 512, flags: f }).collect();
        let mut wire = Vec::new();
        let to = ReplyTo { style, cookie, offset: 0 };
        let covered = encode_block_status(to, id, &ext, true, 512, &mut wire);
        let (reply, used) = decode_reply(&wire, MAX_PAYLOAD).unwrap().unwrap();
        prop_assert_eq!(used, wire.len());
        let Reply::Chunk { body: ChunkBody::BlockStatus { context_id, extents: got }, .. } = reply else {
            panic!("not block status")
        };
        prop_assert_eq!(context_id, id);
        let want: Vec<(u64, u64)> = ext.iter().map(|e| (e.length, u64::from(e.flags))).collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(covered, want.iter().map(|e| e.0).sum::<u64>());
    }

    #[test]
    fn arbitrary_reply_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(Some((_, used))) = decode_reply(&bytes, MAX_PAYLOAD) {
            prop_assert!(used <= bytes.len());
        }
    }

    #[test]
    fn arbitrary_request_streams_stay_in_step(
        style in style(),
        min_shift in 0u32..17,
        size: u64,
        flags: u16,
        has_ctx: bool,
        stream in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let params = TransmissionParams {
            style,
            size,
            min_block: 1 << min_shift,
            max_payload: MAX_PAYLOAD,
            transmission_flags: flags | 1,
            has_meta_contexts: has_ctx,
        };
        let d = RequestDecoder::new(params);
        let mut rest = &stream[..];
        loop {
            match d.decode(rest) {
                Ok(Progress::Need(n)) => {
                    prop_assert!(n > rest.len());
                    prop_assert!(n <= EXTENDED_REQUEST_LEN + MAX_PAYLOAD as usize);
                    break;
                }
                Ok(Progress::Frame { frame, consumed }) => {
                    let h = match frame {
                        Frame::Request(h, _) | Frame::Reject(h, _) | Frame::Disconnect(h) => h,
                    };
                    prop_assert_eq!(consumed as u64, style.request_len() as u64 + h.wire_payload(style));
                    rest = &rest[consumed..];
                }
                Err(_) => break,
            }
        }
    }

    #[test]
    fn arbitrary_handshake_input_is_split_invariant(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        valid_prefix: bool,
        piece in 1usize..40,
    ) {
        // Half the cases start with a valid client flags word and option magic so that the
        // machine gets past the first checks.
        let mut input = Vec::new();
        if valid_prefix {
            input.extend_from_slice(&1u32.to_be_bytes());
            input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        }
        input.extend_from_slice(&bytes);
        let run = |piece: usize| {
            let mut hs = Handshake::new(export());
            let mut out = Vec::new();
            let mut at = 0;
            while *hs.status() == Status::Negotiating && at < input.len() {
                assert!(hs.wanted() <= MAX_OPTION_LEN as usize);
                assert!(hs.wanted() > 0, "negotiating but wants nothing");
                let end = (at + piece).min(input.len());
                match hs.feed(&input[at..end]) {
                    Ok(n) => at += n,
                    Err(_) => break,
                }
                out.extend_from_slice(hs.output());
                hs.consume_output(hs.output().len());
            }
            out.extend_from_slice(hs.output());
            (out, hs.status().clone(), at)
        };
        let whole = run(input.len().max(1));
        let pieced = run(piece);
        prop_assert_eq!(&whole.0, &pieced.0);
        prop_assert_eq!(&whole.1, &pieced.1);
    }
}

proptest! {
    /// FORCEDTLS: whatever options a client sends before `NBD_OPT_STARTTLS`, none reaches
    /// transmission and each is answered `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_ABORT` acked and
    /// `NBD_OPT_EXPORT_NAME` ending the session, having been sent nothing); after STARTTLS
    /// and a TLS handshake, the same options are served as without TLS.
    #[test]
    fn forced_tls_serves_nothing_before_starttls(
        options in prop::collection::vec(client_option(), 0..12),
    ) {
        let mut hs = Handshake::with_tls(export());
        hs.consume_output(hs.output().len());
        hs.feed(&1u32.to_be_bytes()).unwrap();
        for o in &options {
            let mut bytes = Vec::new();
            o.encode(&mut bytes);
            let over_tls = hs.tls_active();
            let fed = hs.feed(&bytes);
            let out = hs.output().to_vec();
            hs.consume_output(out.len());
            if over_tls {
                // Served as without TLS: the NOTLS tests cover the replies.
                if *hs.status() != Status::Negotiating {
                    return Ok(());
                }
                continue;
            }
            match o {
                ClientOption::ExportName(_) => {
                    prop_assert!(fed.is_err());
                    prop_assert!(out.is_empty());
                    return Ok(());
                }
                ClientOption::Abort => {
                    prop_assert_eq!(hs.status(), &Status::Aborted);
                    return Ok(());
                }
                ClientOption::StartTls => {
                    prop_assert_eq!(hs.status(), &Status::StartTls);
                    hs.tls_started();
                    prop_assert!(hs.tls_active());
                }
                _ => {
                    prop_assert_eq!(fed, Ok(bytes.len()));
                    prop_assert_eq!(hs.status(), &Status::Negotiating);
                    // One reply: magic, the option, NBD_REP_ERR_TLS_REQD.
                    prop_assert_eq!(&out[8..12], &o.option().to_be_bytes());
                    prop_assert_eq!(&out[12..16], &((1u32 << 31) + 5).to_be_bytes());
                    let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
                    prop_assert_eq!(out.len(), 20 + len);
                }
            }
        }
        prop_assert!(!matches!(hs.status(), Status::Transmission(_)) || hs.tls_active());
    }
}

/// A valid option sequence fed one byte at a time reaches transmission with exactly its bytes
/// consumed.
#[test]
fn byte_at_a_time_handshake_reaches_transmission() {
    let mut input = 3u32.to_be_bytes().to_vec();
    ClientOption::ExtendedHeaders.encode(&mut input);
    ClientOption::SetMetaContext {
        name: "disk".into(),
        queries: vec!["clonebd:hydrated".into()],
    }
    .encode(&mut input);
    ClientOption::Go {
        name: String::new(),
        requests: vec![3],
    }
    .encode(&mut input);
    let total = input.len();
    input.extend_from_slice(b"request bytes");
    let mut hs = Handshake::new(export());
    let mut at = 0;
    while *hs.status() == Status::Negotiating {
        at += hs.feed(&input[at..at + 1]).unwrap();
    }
    assert_eq!(at, total);
    let Status::Transmission(n) = hs.status() else {
        panic!("not in transmission")
    };
    assert_eq!(n.style, HeaderStyle::Extended);
    assert_eq!(n.meta_contexts.len(), 1);
    assert_eq!(n.meta_contexts[0].name, "clonebd:hydrated");
}
