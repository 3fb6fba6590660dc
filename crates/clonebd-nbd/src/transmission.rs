//! The transmission phase as a sans-IO state machine, the one both servers drive.
//!
//! Like the [`Handshake`](crate::handshake::Handshake), it performs no I/O: the driver
//! [feeds](Transmission::feed) it the bytes it has received, and it says what to do next as
//! a [`Step`]: receive more (`Need`), receive and drop a refused request's payload (`Skip`),
//! run a request (`Run`), send an error reply (`Reply`), or close (`Close`). Every header is
//! judged by the [`RequestDecoder`] (so the rules are [`TransmissionParams::check`]'s), and
//! the machine keeps the stream in step: after a refused request it drops exactly the
//! payload that request declared, so the next header is read from the right place whatever
//! pieces the input arrives in.
//!
//! What stays with the driver is what needs I/O or threads: admitting a request against the
//! memory budget (blocking on the threaded path, waiting on the ring on the io_uring path),
//! reading a write's payload into its own buffer within the payload deadline (the machine
//! says how many bytes it is, and takes the stream up again after them), running the request
//! and sending the replies. The rule both follow for admission: a `Run` is admitted before
//! any of its payload is read, so no connection ever waits while holding a partly received
//! request (see [`crate::admission`]).
//!
//! ```text
//!   Header --(header complete)--> Run      --(driver reads the payload)--> Header
//!                             \-> Reply    --> Skip(n) --(n bytes fed)---> Header
//!                             \-> Close (disconnect, bad magic, payload over the cap)
//! ```

use crate::backend::NbdError;
use crate::codec::{DecodeError, Disposition, RequestDecoder, RequestHeader, TransmissionParams};
use crate::proto::{Command, EXTENDED_REQUEST_LEN};

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Receive more: `n` more bytes complete the header being read (never more than one
    /// extended header).
    Need(usize),
    /// Receive more: the next `n` bytes are the payload of a refused request, and the machine
    /// drops them as they are fed (never more than the payload cap).
    Skip(u64),
    /// Run this request, charged `cost` bytes of the memory budget (admitted before any of
    /// its payload is read). The next `payload` bytes of the stream are its payload (a
    /// write's data, zero otherwise): the driver reads them into the request's buffer and
    /// feeds the machine only what follows them.
    Run {
        /// The request.
        header: RequestHeader,
        /// Payload bytes it holds in flight: a read's data to send or a write's to receive.
        cost: usize,
        /// Bytes of payload that follow the header.
        payload: usize,
    },
    /// Send this reply: answer `header` with `error`, without running it. Any payload it
    /// declared is then dropped by the machine (`Skip`).
    Reply {
        /// The refused request.
        header: RequestHeader,
        /// The error to answer with.
        error: NbdError,
    },
    /// Take no more requests: finish those in flight and close. `reply`: an error reply to
    /// send first (a payload over the cap, which is not read); `error`: the protocol
    /// violation that ends the connection (`None`: the client's `NBD_CMD_DISC`).
    Close {
        /// A last reply: the request and its error.
        reply: Option<(RequestHeader, NbdError)>,
        /// Why the connection ends, if the client broke the protocol.
        error: Option<DecodeError>,
    },
}

/// Payload bytes a request holds in flight: read data until it is sent, write data from
/// the moment it is received. Other requests are not charged.
fn cost(header: &RequestHeader) -> usize {
    match header.command {
        // Lengths of reads and writes were checked against the 32 MiB cap.
        Command::Read | Command::Write => header.length as usize,
        _ => 0,
    }
}

/// The transmission phase of one connection.
#[derive(Debug, Clone)]
pub struct Transmission {
    decoder: RequestDecoder,
    /// The header being received, `have` bytes of it so far.
    header: [u8; EXTENDED_REQUEST_LEN],
    have: usize,
    /// Payload bytes of a refused request still to drop.
    skip: u64,
    /// A `Close` was given: every later feed gives it again.
    closed: Option<Step>,
}

impl Transmission {
    /// The machine for a connection that negotiated `params`.
    pub fn new(params: TransmissionParams) -> Self {
        Self {
            decoder: RequestDecoder::new(params),
            header: [0; EXTENDED_REQUEST_LEN],
            have: 0,
            skip: 0,
            closed: None,
        }
    }

    /// What requests are checked against.
    pub fn params(&self) -> &TransmissionParams {
        self.decoder.params()
    }

    /// Take bytes from the start of `input`; returns how many were taken and the next step.
    ///
    /// It takes at most up to the end of one header (or of a refused payload), so a driver
    /// calls it again with what is left until it says `Need` or `Skip`, having handled each
    /// other step first (after a `Run`, by taking the request's payload off the stream).
    /// Feeding an empty slice is harmless and gives the step the machine is waiting at.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Step) {
        if let Some(step) = self.closed {
            return (0, step);
        }
        let mut used = 0;
        if self.skip > 0 {
            let n = usize::try_from(self.skip).map_or(input.len(), |s| s.min(input.len()));
            self.skip -= n as u64;
            used = n;
            if self.skip > 0 {
                return (used, Step::Skip(self.skip));
            }
        }
        let len = self.decoder.params().style.request_len();
        let n = (len - self.have).min(input.len() - used);
        self.header[self.have..self.have + n].copy_from_slice(&input[used..used + n]);
        self.have += n;
        used += n;
        if self.have < len {
            return (used, Step::Need(len - self.have));
        }
        self.have = 0;
        (used, self.decide(len))
    }

    fn decide(&mut self, len: usize) -> Step {
        let step = match self.decoder.header(&self.header[..len]) {
            Ok((header, Disposition::Execute)) => Step::Run {
                header,
                cost: cost(&header),
                // Within the payload cap: `check` refused anything larger.
                payload: header.wire_payload(self.decoder.params().style) as usize,
            },
            Ok((header, Disposition::Reject { error, skip })) => {
                // Keep the stream in step: drop exactly the declared payload.
                self.skip = u64::from(skip);
                Step::Reply { header, error }
            }
            Ok((_, Disposition::Disconnect)) => Step::Close {
                reply: None,
                error: None,
            },
            // Answer, so the client learns why, then close: the payload is not read.
            Err(error @ DecodeError::PayloadTooLarge(header)) => Step::Close {
                reply: Some((header, NbdError::Invalid)),
                error: Some(error),
            },
            Err(error) => Step::Close {
                reply: None,
                error: Some(error),
            },
        };
        if let Step::Close { .. } = step {
            // Whatever follows is never looked at, and the last reply is given once.
            self.closed = Some(Step::Close {
                reply: None,
                error: None,
            });
        }
        step
    }
}

/// Whether a request is run on the connection's own thread rather than the worker pool: a
/// read or write with nothing else in flight (`alone`) and no further input received
/// (`more`): the client is waiting for this one reply, and running it here spares the
/// thread hand-offs on the latency path. A client that keeps several requests in flight
/// gets the worker pool, and so do flushes, which may wait for a commit.
pub(crate) fn runs_inline(header: &RequestHeader, alone: bool, more: bool) -> bool {
    matches!(header.command, Command::Read | Command::Write) && alone && !more
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{HeaderStyle, MAX_PAYLOAD, transmission_flags as tf};

    fn machine(style: HeaderStyle) -> Transmission {
        Transmission::new(TransmissionParams {
            style,
            size: 1 << 20,
            min_block: 512,
            max_payload: MAX_PAYLOAD,
            transmission_flags: tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA,
            has_meta_contexts: false,
        })
    }

    fn wire(style: HeaderStyle, command: Command, offset: u64, length: u64) -> Vec<u8> {
        let h = RequestHeader {
            flags: 0,
            command,
            cookie: offset,
            offset,
            length,
        };
        let mut buf = [0u8; EXTENDED_REQUEST_LEN];
        let n = h.encode(style, &mut buf);
        buf[..n].to_vec()
    }

    /// Feed `stream` in pieces of `piece` bytes, taking each run payload off the stream as a
    /// driver does; the steps other than `Need` and `Skip`.
    fn drive(m: &mut Transmission, stream: &[u8], piece: usize) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut at = 0;
        let mut payload = 0;
        while at < stream.len() {
            let end = (at + piece).min(stream.len());
            let mut chunk = &stream[at..end];
            at = end;
            loop {
                if payload > 0 {
                    let n = payload.min(chunk.len());
                    payload -= n;
                    chunk = &chunk[n..];
                }
                let (used, step) = m.feed(chunk);
                chunk = &chunk[used..];
                match step {
                    Step::Need(_) | Step::Skip(_) => break,
                    Step::Run { payload: p, .. } => payload = p,
                    Step::Close { .. } => {
                        steps.push(step);
                        return steps;
                    }
                    Step::Reply { .. } => {}
                }
                steps.push(step);
                if chunk.is_empty() && payload == 0 {
                    break;
                }
            }
        }
        steps
    }

    #[test]
    fn refused_write_payload_is_dropped_and_the_next_header_read_in_any_pieces() {
        let style = HeaderStyle::Simple;
        let mut stream = wire(style, Command::Write, 3, 1024);
        stream.extend_from_slice(&[0x25; 1024]);
        stream.extend(wire(style, Command::Write, 512, 512));
        stream.extend_from_slice(&[7; 512]);
        stream.extend(wire(style, Command::Read, 4096, 512));
        let whole = drive(&mut machine(style), &stream, stream.len());
        assert_eq!(whole.len(), 3);
        assert!(matches!(
            whole[0],
            Step::Reply {
                error: NbdError::Invalid,
                ..
            }
        ));
        assert!(matches!(
            whole[1],
            Step::Run {
                cost: 512,
                payload: 512,
                ..
            }
        ));
        assert!(matches!(
            whole[2],
            Step::Run {
                cost: 512,
                payload: 0,
                ..
            }
        ));
        for piece in [1, 5, 27, 28, 29, 511, 1000] {
            assert_eq!(
                drive(&mut machine(style), &stream, piece),
                whole,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn a_payload_over_the_cap_is_answered_then_closes_for_good() {
        let style = HeaderStyle::Extended;
        let stream = wire(style, Command::Write, 0, u64::from(MAX_PAYLOAD) + 512);
        let mut m = machine(style);
        let (used, step) = m.feed(&stream);
        assert_eq!(used, stream.len());
        let Step::Close {
            reply: Some((h, NbdError::Invalid)),
            error: Some(DecodeError::PayloadTooLarge(_)),
        } = step
        else {
            panic!("{step:?}")
        };
        assert_eq!(h.length, u64::from(MAX_PAYLOAD) + 512);
        let again = m.feed(&[0; 64]);
        let closed = Step::Close {
            reply: None,
            error: None,
        };
        assert_eq!(again, (0, closed));
    }

    #[test]
    fn disconnect_and_bad_magic_close() {
        let style = HeaderStyle::Structured;
        let disc = wire(style, Command::Disc, 0, 0);
        let closed = Step::Close {
            reply: None,
            error: None,
        };
        assert_eq!(machine(style).feed(&disc), (28, closed));
        let mut bad = disc.clone();
        bad[0] ^= 1;
        let (_, step) = machine(style).feed(&bad);
        assert!(matches!(
            step,
            Step::Close {
                reply: None,
                error: Some(DecodeError::BadMagic(_))
            }
        ));
    }

    #[test]
    fn a_header_in_pieces_is_asked_for_to_its_end() {
        let style = HeaderStyle::Simple;
        let read = wire(style, Command::Read, 0, 512);
        let mut m = machine(style);
        assert_eq!(m.feed(&[]), (0, Step::Need(28)));
        assert_eq!(m.feed(&read[..10]), (10, Step::Need(18)));
        let (used, step) = m.feed(&read[10..]);
        assert_eq!(used, 18);
        assert!(matches!(
            step,
            Step::Run {
                cost: 512,
                payload: 0,
                ..
            }
        ));
    }
}
