//! Wire limits at their edges: the largest frame and the most messages per frame are
//! accepted; one byte or one message more is refused with a typed error.

use cofab_protocol::wire::{Frame, Payload, SyncMessage, MAX_FRAME_BYTES, MAX_MESSAGES_PER_FRAME};
use cofab_protocol::{Clock, DecodeError, DocId};

fn msg(snapshot: Option<usize>) -> SyncMessage {
    SyncMessage {
        doc: DocId([3; 16]),
        genesis: None,
        clock: Clock::new(),
        heads: vec![],
        payload: snapshot
            .map(|n| Payload::Snapshot {
                bytes: vec![7; n],
                sigs: vec![],
            })
            .unwrap_or_default(),
        decline: false,
    }
}

/// A frame of exactly the limit decodes; one byte more is `TooLarge`.
#[test]
fn frame_size_limit_edge() {
    // Find the snapshot length that makes the encoded frame exactly MAX_FRAME_BYTES long
    // (the varint length prefix grows with the length, so search near the estimate).
    let overhead = Frame::Sync(vec![msg(Some(0))]).encode().len();
    let mut n = MAX_FRAME_BYTES - overhead;
    while Frame::Sync(vec![msg(Some(n))]).encode().len() > MAX_FRAME_BYTES {
        n -= 1;
    }
    let exact = Frame::Sync(vec![msg(Some(n))]).encode();
    assert_eq!(exact.len(), MAX_FRAME_BYTES);
    assert!(Frame::decode(&exact).is_ok());
    let over = Frame::Sync(vec![msg(Some(n + 1))]).encode();
    assert_eq!(over.len(), MAX_FRAME_BYTES + 1);
    assert_eq!(
        Frame::decode(&over),
        Err(DecodeError::TooLarge {
            len: MAX_FRAME_BYTES + 1,
            max: MAX_FRAME_BYTES
        })
    );
}

/// The most sync messages a frame may carry decode; one more is `TooLarge`.
#[test]
fn messages_per_frame_limit_edge() {
    let ok = Frame::Sync(vec![msg(None); MAX_MESSAGES_PER_FRAME]).encode();
    match Frame::decode(&ok) {
        Ok(Frame::Sync(m)) => assert_eq!(m.len(), MAX_MESSAGES_PER_FRAME),
        other => panic!("expected {MAX_MESSAGES_PER_FRAME} messages, got {other:?}"),
    }
    let over = Frame::Sync(vec![msg(None); MAX_MESSAGES_PER_FRAME + 1]).encode();
    assert_eq!(
        Frame::decode(&over),
        Err(DecodeError::TooLarge {
            len: MAX_MESSAGES_PER_FRAME + 1,
            max: MAX_MESSAGES_PER_FRAME
        })
    );
}
