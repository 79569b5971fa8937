//! The last stage: prints events and the exit report, as a live table or as NDJSON.
//!
//! Sinks append to one reused buffer and write it out at the end of each ring-buffer batch
//! (or when it grows past [`Output::HIGH_WATER`]): one write per batch under load, one per
//! event at low rates, so `bindtrace -o ndjson | jq` shows events as they happen.

#[cfg(test)]
mod arbitrary_records;
pub(crate) mod columns;
pub(crate) mod file;
pub(crate) mod ndjson;
pub(crate) mod table;
pub(crate) mod writer;

use std::io::{self, Write};

use bytes::BytesMut;

use crate::{
    model::{Enriched, FollowUp},
    summary::Report,
};

pub(crate) trait Sink {
    /// Called once the probe is attached (the table prints its header then).
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Formats one event, with the diagnosis of a failure, into the output buffer (written
    /// out by [`Sink::flush`]).
    fn event(&mut self, enriched: &Enriched) -> io::Result<()>;
    /// Formats the diagnosis of an event written earlier without it.
    fn follow_up(&mut self, follow_up: &FollowUp) -> io::Result<()>;
    /// Writes out everything buffered.
    fn flush(&mut self) -> io::Result<()>;
    /// Prints the exit report.
    fn report(&mut self, report: &Report) -> io::Result<()>;
    /// Writes from now on to `writer` (`--file` reopened on SIGHUP), after flushing.
    fn reopen(&mut self, writer: Box<dyn Write + Send>) -> io::Result<()>;
}

/// `-o none`: no events; the exit report as the table prints it, on stderr.
pub(crate) struct NoEvents {
    report: table::TableSink,
}

impl NoEvents {
    pub(crate) fn new(report: table::TableSink) -> Self {
        Self { report }
    }
}

impl Sink for NoEvents {
    fn event(&mut self, _: &Enriched) -> io::Result<()> {
        Ok(())
    }
    fn follow_up(&mut self, _: &FollowUp) -> io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn report(&mut self, report: &Report) -> io::Result<()> {
        self.report.report(report)
    }
    fn reopen(&mut self, _: Box<dyn Write + Send>) -> io::Result<()> {
        Ok(())
    }
}

/// A writer with a reusable buffer in front of it.
pub(crate) struct Output {
    buffer: BytesMut,
    writer: Box<dyn Write + Send>,
}

impl Output {
    /// Buffered bytes that trigger a write in the middle of a batch.
    const HIGH_WATER: usize = 256 * 1024;

    pub(crate) fn new(writer: Box<dyn Write + Send>) -> Self {
        Self { buffer: BytesMut::with_capacity(Self::HIGH_WATER + 4096), writer }
    }

    pub(crate) fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buffer
    }

    pub(crate) fn write_if_full(&mut self) -> io::Result<()> {
        if self.buffer.len() >= Self::HIGH_WATER {
            self.flush()?;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.writer.write_all(&self.buffer)?;
            self.buffer.clear();
        }
        self.writer.flush()
    }

    /// Flushes what is buffered to the old writer, then writes to `writer`.
    pub(crate) fn replace(&mut self, writer: Box<dyn Write + Send>) -> io::Result<()> {
        let flushed = self.flush();
        self.writer = writer;
        flushed
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer the sink tests can read back.
    #[derive(Clone, Default)]
    pub(crate) struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Shared {
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
        }
    }

    impl io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
