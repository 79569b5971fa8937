//! bindtrace's one voice on stderr: `bindtrace: ...`, one line each, for its own lines and
//! for log records.
//!
//! Written by a thread of its own through a bounded queue: under systemd stderr is the same
//! journal stream as stdout, and with `2>&1 |` the same pipe, so a write to a stalled stderr
//! would hold up the event loop exactly when it reports that the output does not keep up.
//! `eprintln!` also panics when stderr is a closed pipe; a line that cannot be written is
//! dropped instead (and counted), and the run goes on.

use std::{
    io::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender},
        Mutex, OnceLock,
    },
    time::Duration,
};

/// Lines waiting for stderr; past this, new ones are dropped.
const QUEUE_MAX: usize = 256;
/// How long the end of a run waits for stderr to take what is queued.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

enum Message {
    Line(Vec<u8>),
    /// Answered once everything before it was written.
    Flush(mpsc::SyncSender<()>),
}

struct Voice {
    queue: SyncSender<Message>,
}

static VOICE: OnceLock<Option<Voice>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

fn write_lines(queue: &Receiver<Message>) {
    let mut stderr = std::io::stderr();
    while let Ok(message) = queue.recv() {
        match message {
            Message::Line(line) => {
                let _ = stderr.write_all(&line);
            }
            Message::Flush(done) => {
                let _ = done.try_send(());
            }
        }
    }
}

fn voice() -> Option<&'static Voice> {
    VOICE
        .get_or_init(|| {
            let (queue, lines) = mpsc::sync_channel(QUEUE_MAX);
            std::thread::Builder::new().name("bindtrace-stderr".into()).spawn(move || write_lines(&lines)).ok()?;
            Some(Voice { queue })
        })
        .as_ref()
}

/// Queues `bytes` (whole lines) for stderr; written at once when the thread cannot start.
fn send(bytes: Vec<u8>) {
    match voice() {
        Some(voice) => {
            if voice.queue.try_send(Message::Line(bytes)).is_err() {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            let _ = std::io::stderr().write_all(&bytes);
        }
    }
}

/// Writes `bindtrace: {text}` and a newline to stderr, if stderr takes it.
pub(crate) fn line(text: &str) {
    send(format!("bindtrace: {text}\n").into_bytes());
}

/// A warning: the same voice as every other line (log records from the modules too, see
/// [`init_log`]).
pub(crate) fn warn(text: &str) {
    line(text);
}

/// Waits (at most a second) until every queued line is written: before exit, and before
/// anything written to stderr directly (the table's report).
pub(crate) fn flush() {
    let Some(voice) = voice() else { return };
    let (done, written) = mpsc::sync_channel(1);
    if send_within(&voice.queue, Message::Flush(done), FLUSH_AT_EXIT) {
        let _ = written.recv_timeout(FLUSH_AT_EXIT);
    }
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let _ = writeln!(std::io::stderr(), "bindtrace: {dropped} lines for stderr were dropped: it did not take them");
    }
}

/// `SyncSender::send` with a bound (std has none): `try_send` again until `within` passes.
fn send_within(queue: &SyncSender<Message>, mut message: Message, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        match queue.try_send(message) {
            Ok(()) => return true,
            Err(mpsc::TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                message = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return false,
        }
    }
}

/// Log records as whole lines into the same queue.
struct LogPipe(Mutex<Vec<u8>>);

impl std::io::Write for LogPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.extend_from_slice(buf);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let rest = pending.split_off(end + 1);
            send(std::mem::replace(&mut *pending, rest));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Routes `log` records (RUST_LOG, warn by default) to stderr in the same voice: `bindtrace:
/// ...` for warnings and errors, with the level and module only for debug output.
pub(crate) fn init_log() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|out, record| match record.level() {
            log::Level::Error | log::Level::Warn => writeln!(out, "bindtrace: {}", record.args()),
            level => writeln!(out, "bindtrace: [{level} {}] {}", record.target(), record.args()),
        })
        .target(env_logger::Target::Pipe(Box::new(LogPipe(Mutex::new(Vec::new())))))
        .init();
}
