//! Feeds arbitrary bytes to `FrameDecoder` and a `CommandAssembler` per channel, split in
//! two at a point chosen by the first input byte, as a socket read would split them.
//!
//! Checks: nothing panics, for a handshake-sized and the default `frame_max`; and the
//! frames (and the first error) are the same whether the bytes arrive whole or in two
//! reads, since "need more bytes" must never consume input.
#![no_main]

use std::collections::HashMap;

use bytes::BytesMut;
use holdfast_codec::{CommandAssembler, DecodeError, Frame, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let split = usize::from(selector) * (input.len() + 1) / 256;
    let (first, second) = input.split_at(split);
    for frame_max in [4096, 131_072] {
        let whole = decode_all(frame_max, &[input]);
        let in_two = decode_all(frame_max, &[first, second]);
        // Compared as text: a field table may hold a NaN float, which is never equal to
        // itself, so `==` would report identical decodings as different.
        assert_eq!(
            format!("{whole:?}"),
            format!("{in_two:?}"),
            "split at {split} changed the decoding"
        );
    }
});

/// Decodes `parts` fed one after another; stops at the first error like the server does.
fn decode_all(frame_max: u32, parts: &[&[u8]]) -> Vec<Result<Frame, DecodeError>> {
    let decoder = FrameDecoder::new(frame_max);
    let mut assemblers: HashMap<u16, CommandAssembler> = HashMap::new();
    let mut buffer = BytesMut::new();
    let mut out = Vec::new();
    for part in parts {
        buffer.extend_from_slice(part);
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    let before = buffer.len();
                    let assembler = assemblers
                        .entry(frame.channel())
                        .or_insert_with(|| CommandAssembler::new(1 << 20));
                    // Assembly errors are fine; only a panic is a bug.
                    let _ = assembler.push(frame.clone());
                    assert_eq!(before, buffer.len());
                    out.push(Ok(frame));
                }
                Ok(None) => break,
                Err(err) => {
                    out.push(Err(err));
                    return out;
                }
            }
        }
    }
    out
}
