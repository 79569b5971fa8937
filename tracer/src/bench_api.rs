//! What `benches/userspace.rs` measures, and nothing more: one ring-buffer record through the
//! stages the pipeline runs it through (decode, filter, enrich, NDJSON), with the pipeline's
//! calls in the pipeline's order. Behind the `bench` feature, so that the stages stay
//! `pub(crate)`.

use std::{io, time::Instant};

use crate::{
    decode::decode,
    enrich::{Done, Enricher},
    filter::{EventFilter, Selection},
    sink::{ndjson::NdjsonSink, Output, Sink as _},
};

/// The stages after the ring buffer, writing NDJSON to nowhere.
pub struct Stages {
    filter: EventFilter,
    enricher: Enricher,
    results: tokio::sync::mpsc::UnboundedReceiver<Done>,
    sink: NdjsonSink,
    accepted: i128,
}

impl Stages {
    /// With diagnoses on, as `bindtrace` runs by default, and no filter.
    pub fn new() -> io::Result<Self> {
        let filter = EventFilter::new(&Selection::default()).map_err(io::Error::other)?;
        let mut enricher = Enricher::new(true);
        let results = enricher.take_results().ok_or_else(|| io::Error::other("no lookup results channel"))?;
        Ok(Self { filter, enricher, results, sink: NdjsonSink::new(Output::new(Box::new(io::sink()))), accepted: 0 })
    }

    /// One record, arrived at `arrived`; flushed every 64 records, as the loop writes once per
    /// ring-buffer batch. False when the record does not decode.
    pub fn record(&mut self, bytes: &[u8], arrived: Instant) -> io::Result<bool> {
        let Ok(event) = decode(bytes) else { return Ok(false) };
        if self.filter.accepts(&event) {
            self.accepted += 1;
            self.enricher.push(event, self.accepted, arrived);
            while let Ok(done) = self.results.try_recv() {
                self.enricher.complete(done);
            }
            self.enricher.poll(arrived);
            while let Some(ready) = self.enricher.pop(arrived, false) {
                self.sink.event(&ready)?;
            }
        }
        if self.accepted % 64 == 0 {
            self.sink.flush()?;
        }
        Ok(true)
    }
}
