//! bindtrace's one voice on stderr: `bindtrace: ...`, one line each. `eprintln!` panics when
//! stderr is a closed pipe (exit 101 before anything was traced); a message that cannot be
//! written is dropped instead, and the run goes on.

use std::io::Write as _;

/// Writes `bindtrace: {text}` and a newline to stderr, if stderr takes it.
pub(crate) fn line(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "bindtrace: {text}");
}

/// A warning: the same voice as every other line (log records from the modules too, see
/// [`init_log`]).
pub(crate) fn warn(text: &str) {
    line(text);
}

/// Routes `log` records (RUST_LOG, warn by default) to stderr in the same voice: `bindtrace:
/// ...` for warnings and errors, with the level and module only for debug output.
pub(crate) fn init_log() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|out, record| match record.level() {
            log::Level::Error | log::Level::Warn => writeln!(out, "bindtrace: {}", record.args()),
            level => writeln!(out, "bindtrace: [{level} {}] {}", record.target(), record.args()),
        })
        .init();
}
