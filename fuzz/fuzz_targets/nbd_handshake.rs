//! Fuzz the server handshake: arbitrary client bytes, fed in arbitrary pieces, to a server
//! in NOTLS or FORCEDTLS mode.
//!
//! Asserts: no panic; no allocation above the cap (see `capped_alloc`); the machine never asks
//! for more than 64 KiB at once; and feeding the same bytes in different pieces gives the same
//! replies, the same outcome and the same number of consumed bytes (no state depends on how
//! the stream was split, so the stream cannot desynchronise).
#![no_main]

mod capped_alloc;

use clonebd_nbd::handshake::{ExportInfo, Handshake, Status};
use clonebd_nbd::proto::MAX_OPTION_LEN;
use clonebd_nbd::{BackendFlags, BlockSizes};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: capped_alloc::CappedAlloc = capped_alloc::CappedAlloc;

fn export() -> ExportInfo {
    let flags = BackendFlags {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        cache: true,
        multi_conn: true,
        read_only: false,
    };
    let sizes = BlockSizes {
        minimum: 512,
        preferred: 65536,
        maximum: 32 << 20,
    };
    let contexts = vec!["base:allocation".to_owned(), "clonebd:hydrated".to_owned()];
    match ExportInfo::new("disk", "fuzz", 1 << 30, sizes, flags, contexts) {
        Ok(e) => e,
        Err(_) => unreachable!("valid export"),
    }
}

/// Feed `data` in pieces of the given sizes (cycled) to a server that requires TLS or not;
/// returns (output, status, consumed). An acknowledged `NBD_OPT_STARTTLS` is taken as a TLS
/// handshake that succeeded, the bytes after it as what TLS decoded.
fn drive(data: &[u8], pieces: &[u8], tls: bool) -> (Vec<u8>, Status, usize) {
    let mut hs = if tls {
        Handshake::with_tls(export())
    } else {
        Handshake::new(export())
    };
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut i = 0;
    loop {
        out.extend_from_slice(hs.output());
        hs.consume_output(hs.output().len());
        if *hs.status() == Status::StartTls {
            assert!(tls && hs.wanted() == 0);
            hs.tls_started();
            assert!(hs.tls_active());
        }
        assert!(hs.wanted() <= MAX_OPTION_LEN as usize);
        // While negotiating the machine always wants input, so a caller never spins.
        assert!(hs.wanted() > 0 || *hs.status() != Status::Negotiating);
        if *hs.status() != Status::Negotiating || consumed == data.len() {
            break;
        }
        let piece = if pieces.is_empty() {
            data.len()
        } else {
            usize::from(pieces[i % pieces.len()]) + 1
        };
        i += 1;
        let end = (consumed + piece).min(data.len());
        let avail = end - consumed;
        match hs.feed(&data[consumed..end]) {
            Ok(n) => {
                assert!(n <= avail);
                consumed += n;
                // Input is left over only once the handshake has finished.
                assert!(n == avail || *hs.status() != Status::Negotiating);
            }
            Err(_) => assert!(matches!(hs.status(), Status::Failed(_))),
        }
        if matches!(hs.status(), Status::Failed(_)) {
            out.extend_from_slice(hs.output());
            break;
        }
    }
    (out, hs.status().clone(), consumed)
}

fuzz_target!(|input: &[u8]| {
    let split = input
        .first()
        .map_or(0, |b| usize::from(*b) % 16)
        .min(input.len().saturating_sub(1));
    let (pieces, data) = if input.is_empty() {
        (&[][..], input)
    } else {
        input[1..].split_at(split)
    };
    // Bit 4 of the first byte (the split takes the low four) picks the TLS mode.
    let tls = input.first().is_some_and(|b| b & 0x10 != 0);
    let whole = drive(data, &[], tls);
    let pieced = drive(data, pieces, tls);
    assert_eq!(whole.1, pieced.1);
    assert_eq!(whole.0, pieced.0);
    if !matches!(whole.1, Status::Failed(_)) {
        assert_eq!(whole.2, pieced.2);
    }
});
