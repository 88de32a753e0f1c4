//! Frame decoder and encoder microbenchmarks (issue 5).
//!
//! * `decode/publish_1KiB`: a `basic.publish` method frame + content header + one 1 KiB
//!   body frame, decoded from a `BytesMut` by [`FrameDecoder::decode`] and joined by
//!   [`CommandAssembler::push`], as the connection reader does.
//! * `encode/deliver_1KiB`: a `basic.deliver` method frame + content header + body, written
//!   by [`encode_method`] / [`encode_content_header`] / [`encode_body`], as the writer does.
//!
//! Throughput is reported in wire bytes of the three frames.
//!
//! Run: `cargo bench -p holdfast-codec --bench frames`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use holdfast_codec::{
    AMQPClass, Command, CommandAssembler, FrameDecoder, basic, encode_body, encode_content_header,
    encode_method, encode_properties,
};

const BODY_SIZE: usize = 1024;
const FRAME_MAX: u32 = 128 * 1024;
const CHANNEL: u16 = 1;

fn properties() -> Bytes {
    encode_properties(
        &basic::AMQPProperties::default()
            .with_content_type("application/octet-stream".into())
            .with_delivery_mode(2),
    )
}

/// The wire bytes a client sends for one persistent 1 KiB publish.
fn publish_wire() -> BytesMut {
    let method = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "amq.topic".into(),
        routing_key: "orders.eu.created".into(),
        mandatory: false,
        immediate: false,
    }));
    let body = vec![0xA5u8; BODY_SIZE];
    let mut wire = BytesMut::new();
    encode_method(&mut wire, CHANNEL, &method);
    encode_content_header(&mut wire, CHANNEL, BODY_SIZE as u64, &properties());
    encode_body(&mut wire, CHANNEL, &body, FRAME_MAX);
    wire
}

fn decode(c: &mut Criterion) {
    let wire = publish_wire();
    let decoder = FrameDecoder::new(FRAME_MAX);
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("publish_1KiB", |b| {
        b.iter_batched_ref(
            || (wire.clone(), CommandAssembler::new(u64::from(u32::MAX))),
            |(buffer, assembler)| {
                let mut command = None;
                while let Some(frame) = decoder.decode(buffer).expect("valid frame") {
                    if let Some(done) = assembler.push(frame).expect("valid sequence") {
                        command = Some(done);
                    }
                }
                match command {
                    Some(Command::Content { content, .. }) => {
                        assert_eq!(content.body.len(), BODY_SIZE);
                        black_box(content);
                    }
                    other => panic!("expected a content command, got {other:?}"),
                }
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    let properties = properties();
    let body = Bytes::from(vec![0x5Au8; BODY_SIZE]);
    let mut wire_len = 0;
    {
        let mut probe = BytesMut::new();
        encode_deliver(&mut probe, 1, &properties, &body);
        wire_len += probe.len();
    }
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Bytes(wire_len as u64));
    // One reused output buffer, cleared each time, as the connection writer reuses its
    // buffer; the delivery tag changes so the work cannot be hoisted.
    let mut out = BytesMut::with_capacity(4 * wire_len);
    let mut delivery_tag = 0u64;
    group.bench_function("deliver_1KiB", |b| {
        b.iter(|| {
            out.clear();
            delivery_tag += 1;
            encode_deliver(&mut out, delivery_tag, &properties, &body);
            black_box(&out);
        });
    });
    group.finish();
}

fn encode_deliver(out: &mut BytesMut, delivery_tag: u64, properties: &[u8], body: &[u8]) {
    encode_method(
        out,
        CHANNEL,
        &AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "amq.ctag-benchmark".into(),
            delivery_tag,
            redelivered: false,
            exchange: "amq.topic".into(),
            routing_key: "orders.eu.created".into(),
        })),
    );
    encode_content_header(out, CHANNEL, body.len() as u64, properties);
    encode_body(out, CHANNEL, body, FRAME_MAX);
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
