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

use std::{
    fmt::Write as _,
    io::{self, Write},
};

use bytes::BytesMut;

use crate::{
    enrich::{Enriched, FollowUp},
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

/// Appends text a process chose (its name, later its command line) with every control
/// character escaped, so that it can never drive the operator's terminal.
/// Unicode's bidirectional formatting characters: not controls to `char::is_control`, but
/// a process name holding U+202E (right-to-left override) reorders the rest of the line on
/// the terminal, so they are escaped like controls.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

pub(crate) fn push_escaped(out: &mut String, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            // The escapes a reader knows for the common controls (a newline inside a
            // `python -c` command line), `\u{..}` for the rest.
            if c == '\n' {
                out.push_str("\\n");
            } else if c == '\t' {
                out.push_str("\\t");
            } else if c == '\r' {
                out.push_str("\\r");
            } else if c.is_control() || is_bidi_control(c) {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            } else if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
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

    fn escaped(bytes: &[u8]) -> String {
        let mut out = String::new();
        push_escaped(&mut out, bytes);
        out
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escaped(b"nginx"), "nginx");
        assert_eq!(escaped(b"\x1b[31mred"), "\\u{1b}[31mred");
        assert_eq!(escaped(b"a\nb\tc\r\x7f"), "a\\nb\\tc\\r\\u{7f}");
        assert_eq!(escaped("é\u{9b}".as_bytes()), "é\\u{9b}", "C1 controls too");
        assert_eq!(escaped(b"\xff\xfe"), "\\xff\\xfe");
        assert_eq!(escaped(b"back\\slash"), "back\\\\slash");
        // Bidi overrides would reorder the terminal line (issue 11).
        assert_eq!(escaped("evil\u{202e}gnp.exe".as_bytes()), "evil\\u{202e}gnp.exe");
        assert_eq!(escaped("a\u{2066}b\u{200f}".as_bytes()), "a\\u{2066}b\\u{200f}");
    }
}
