//! Arbitrary ring-buffer records through the decoder and both sinks (issue 11): whatever the
//! bytes, nothing panics, every NDJSON line is valid JSON, and the table carries no raw
//! control or bidi character a terminal would act on.

use bindtrace_common::{BindEvent, AF_UNIX, BIND_EVENT_SIZE, UNIX_BIND_EVENT_SIZE};
use proptest::prelude::*;

use crate::{
    decode::decode,
    model::{Enriched, Explained},
    sink::{ndjson::NdjsonSink, table::TableSink, tests::Shared, Output, Sink},
};

fn render(sink: &mut dyn Sink, shared: &Shared, record: &[u8]) -> Option<String> {
    let event = decode(record).ok()?;
    let enriched =
        Enriched { seq: 1, event, wall_ns: 1_795_600_931_000_000_000, explained: Explained::Nothing, identity: None };
    sink.event(&enriched).expect("encode");
    sink.flush().expect("flush");
    Some(shared.text())
}

/// Records of the right size with a valid backend byte (every other byte arbitrary: they
/// decode, and reach the sinks), of the right size with any bytes, and of any size.
fn records() -> impl Strategy<Value = Vec<u8>> {
    let backend_at = std::mem::offset_of!(BindEvent, backend);
    let decodable =
        (proptest::collection::vec(any::<u8>(), BIND_EVENT_SIZE), 1u8..=3).prop_map(move |(mut bytes, backend)| {
            bytes[backend_at] = backend;
            bytes
        });
    let family_at = std::mem::offset_of!(BindEvent, family);
    // AF_UNIX records: any path bytes and any path length.
    let unix = (proptest::collection::vec(any::<u8>(), UNIX_BIND_EVENT_SIZE), 1u8..=3).prop_map(
        move |(mut bytes, backend)| {
            bytes[backend_at] = backend;
            bytes[family_at..family_at + 2].copy_from_slice(&AF_UNIX.to_ne_bytes());
            bytes
        },
    );
    prop_oneof![
        6 => decodable,
        3 => unix,
        2 => proptest::collection::vec(any::<u8>(), BIND_EVENT_SIZE),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn any_record_decodes_or_is_refused_and_prints_safely(record in records()) {
        let shared = Shared::default();
        let mut ndjson = NdjsonSink::new(Output::new(Box::new(shared.clone())));
        if let Some(text) = render(&mut ndjson, &shared, &record) {
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
                prop_assert_eq!(&value["type"], "bind");
            }
        }
        let shared = Shared::default();
        let mut table = TableSink::new(Output::new(Box::new(shared.clone())), false);
        if let Some(text) = render(&mut table, &shared, &record) {
            for c in text.chars() {
                let bidi = matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
                prop_assert!(c == '\n' || !(c.is_control() || bidi), "raw {:?} in {:?}", c, text);
            }
        }
    }
}
