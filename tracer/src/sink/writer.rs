//! Output written on a thread of its own, through a bounded queue: a stdout that blocks (a
//! slow log pipe, `| less` waiting for a key) never holds up the ring reader, the signals or
//! `/metrics`, which share the event loop's thread. What the queue cannot take is dropped and
//! counted (lines), said live and in the summary; never a silent loss.

use std::{
    io::{self, Write},
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::Duration,
};

/// Bytes waiting for a writer that does not keep up; past this, output is dropped.
const QUEUE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Chunks waiting (one per batch of the event loop).
const QUEUE_CHUNKS_MAX: usize = 4_096;
/// At exit, how long bindtrace waits for an output that takes nothing of what is queued.
const DRAIN_AT_EXIT: Duration = Duration::from_secs(1);

/// Lines dropped because the output did not keep up, over the whole run (every writer).
static LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines dropped so far because the output did not take them in time.
pub(crate) fn lines_dropped() -> u64 {
    LINES_DROPPED.load(Ordering::Relaxed)
}

#[derive(Default)]
struct State {
    queued_bytes: AtomicU64,
    /// The reader went away (EPIPE): the run ends as it does for a closed pipe.
    closed: AtomicBool,
    /// Another write error, reported at the next write.
    failed: Mutex<Option<io::Error>>,
}

/// An `io::Write` that hands each write to the writer thread and returns at once.
pub(crate) struct ThreadWriter {
    chunks: Option<SyncSender<Vec<u8>>>,
    state: Arc<State>,
    done: Receiver<()>,
    /// The fd the thread writes to, when it is a pipe or a terminal whose reader can go away
    /// while nothing is written: polled for POLLERR/POLLHUP at each flush.
    watched_fd: Option<RawFd>,
}

impl ThreadWriter {
    /// Starts a thread writing to `inner`. `watched_fd`: stdout's fd, to notice its reader
    /// going away (as `journalctl -f` does) without waiting for the next event.
    pub(crate) fn spawn(inner: Box<dyn Write + Send>, watched_fd: Option<RawFd>) -> io::Result<Self> {
        let (chunks, receiver) = mpsc::sync_channel::<Vec<u8>>(QUEUE_CHUNKS_MAX);
        let (done_tx, done) = mpsc::channel();
        let state = Arc::new(State::default());
        let shared = state.clone();
        std::thread::Builder::new().name("bindtrace-output".into()).spawn(move || {
            write_all_chunks(inner, &receiver, &shared);
            let _ = done_tx.send(());
        })?;
        Ok(Self { chunks: Some(chunks), state, done, watched_fd })
    }

    fn check(&self) -> io::Result<()> {
        if self.state.closed.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let failed = self.state.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        failed.map_or(Ok(()), Err)
    }
}

fn write_all_chunks(mut inner: Box<dyn Write + Send>, chunks: &Receiver<Vec<u8>>, state: &State) {
    while let Ok(chunk) = chunks.recv() {
        let written = inner.write_all(&chunk).and_then(|()| inner.flush());
        state.queued_bytes.fetch_sub(chunk.len() as u64, Ordering::Relaxed);
        match written {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
                state.closed.store(true, Ordering::Relaxed);
                return;
            }
            Err(err) => {
                *state.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(err);
                return;
            }
        }
    }
}

fn count_lines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Has the reader of `fd` gone away (a pipe whose read end is closed: POLLERR; a terminal
/// hung up: POLLHUP)?
fn reader_gone(fd: RawFd) -> bool {
    let mut poll = libc::pollfd { fd, events: 0, revents: 0 };
    // SAFETY: one valid pollfd, a zero timeout.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

impl Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        let Some(chunks) = &self.chunks else { return Err(io::ErrorKind::BrokenPipe.into()) };
        let len = buf.len() as u64;
        if self.state.queued_bytes.load(Ordering::Relaxed) + len > QUEUE_BYTES_MAX {
            LINES_DROPPED.fetch_add(count_lines(buf), Ordering::Relaxed);
            return Ok(buf.len());
        }
        self.state.queued_bytes.fetch_add(len, Ordering::Relaxed);
        match chunks.try_send(buf.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(chunk)) => {
                self.state.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                LINES_DROPPED.fetch_add(count_lines(&chunk), Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.state.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.check()?;
                return Err(io::ErrorKind::BrokenPipe.into());
            }
        }
        Ok(buf.len())
    }

    /// Returns at once; it reports a reader that went away, and a failed write.
    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        if self.watched_fd.is_some_and(reader_gone) {
            self.state.closed.store(true, Ordering::Relaxed);
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }
}

impl Drop for ThreadWriter {
    /// Lets the thread write what is queued, for at most [`DRAIN_AT_EXIT`]; what it could not
    /// is counted as dropped.
    fn drop(&mut self) {
        self.chunks = None;
        // A slow reader that still takes output gets the time it needs; one that took nothing
        // for DRAIN_AT_EXIT does not.
        let mut queued = self.state.queued_bytes.load(Ordering::Relaxed);
        loop {
            match self.done.recv_timeout(DRAIN_AT_EXIT) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = self.state.queued_bytes.load(Ordering::Relaxed);
                    if now >= queued || self.state.closed.load(Ordering::Relaxed) {
                        break;
                    }
                    queued = now;
                }
            }
        }
        if !self.state.closed.load(Ordering::Relaxed) && queued > 0 {
            crate::say::line(&format!(
                "{queued} bytes of output were not written: the output took nothing for {} s",
                DRAIN_AT_EXIT.as_secs()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that blocks until told to go on.
    struct Stalled(Arc<Mutex<()>>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _gate = self.0.lock().expect("gate");
            self.1.lock().expect("out").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_never_blocks_the_caller_and_drops_are_counted() {
        let gate = Arc::new(Mutex::new(()));
        let out = Arc::new(Mutex::new(Vec::new()));
        let held = gate.lock().expect("gate");
        let mut writer = ThreadWriter::spawn(Box::new(Stalled(gate.clone(), out.clone())), None).expect("thread");
        let line = vec![b'x'; 1023].into_iter().chain([b'\n']).collect::<Vec<u8>>();
        let before = lines_dropped();
        let started = std::time::Instant::now();
        // 16 MiB into a writer that takes nothing (the queue holds 4): the caller goes on, the
        // excess is counted.
        for _ in 0..16 * 1024 {
            writer.write_all(&line).expect("never blocks");
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(lines_dropped() - before >= 11 * 1024, "{}", lines_dropped() - before);
        drop(held);
        drop(writer);
        let written = out.lock().expect("out").len() as u64;
        assert!(written > 0 && written <= QUEUE_BYTES_MAX + 1024, "{written}");
    }

    #[test]
    fn a_reader_that_went_away_is_noticed_without_a_write() {
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the pipe's write end, owned by nothing else.
        let writer_end = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
        let mut writer = ThreadWriter::spawn(Box::new(writer_end), Some(fds[1])).expect("thread");
        writer.flush().expect("the reader is there");
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
        let err = writer.flush().expect_err("the reader is gone");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
