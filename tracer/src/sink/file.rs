//! `--file`: opened for writing while the input is checked, before anything is attached, so
//! that every unusable path is refused the same way (one line, exit 2); truncated only once
//! tracing starts, so a refused start leaves an existing file as it was.

use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use nix::sys::statfs::{self, FsType};

/// Kernel filesystems whose files are interfaces, not storage: opening one for writing can
/// succeed (as root) and every write then fails, after the trace was made.
const INTERFACE_FILESYSTEMS: [(FsType, &str); 8] = [
    (statfs::PROC_SUPER_MAGIC, "proc"),
    (statfs::SYSFS_MAGIC, "sysfs"),
    (statfs::CGROUP2_SUPER_MAGIC, "cgroup2"),
    (statfs::CGROUP_SUPER_MAGIC, "cgroup"),
    (statfs::TRACEFS_MAGIC, "tracefs"),
    (statfs::DEBUGFS_MAGIC, "debugfs"),
    (statfs::BPF_FS_MAGIC, "bpf"),
    (statfs::SECURITYFS_MAGIC, "securityfs"),
];

/// The `--file` to write, open, not yet truncated.
pub(crate) struct OutputFile {
    path: PathBuf,
    file: Option<File>,
    /// bindtrace made it: removed again if tracing never starts.
    created: bool,
}

impl OutputFile {
    /// Opens `path` for writing (creating it if needed), or says in one line why it cannot
    /// take the trace.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let shown = path.display();
        if path.is_dir() {
            bail!("cannot write --file {shown}: it is a directory");
        }
        let existed = path.symlink_metadata().is_ok();
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot write --file {shown}"))?;
        let mut opened = Self { path: path.to_owned(), file: Some(file), created: !existed };
        if let Some(name) = opened.interface_filesystem() {
            opened.discard();
            bail!("cannot write --file {shown}: it is a file of {name}, a kernel interface that stores nothing");
        }
        Ok(opened)
    }

    fn interface_filesystem(&self) -> Option<&'static str> {
        let fs = statfs::fstatfs(self.file.as_ref()?).ok()?.filesystem_type();
        INTERFACE_FILESYSTEMS.iter().find(|(magic, _)| *magic == fs).map(|(_, name)| *name)
    }

    /// Tracing has started: the file, emptied if it is a regular file (a FIFO or a device is
    /// written as it is).
    pub(crate) fn start(mut self) -> Result<File> {
        let file = self.file.take().context("--file was already started")?;
        let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        if regular {
            file.set_len(0).with_context(|| format!("cannot truncate --file {}", self.path.display()))?;
        }
        Ok(file)
    }

    fn discard(&mut self) {
        if self.file.take().is_some() && self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for OutputFile {
    /// Never started (the probe was refused, say): a file bindtrace created is removed.
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_interface_files_are_refused_and_nothing_is_left_behind() {
        let err = OutputFile::open(Path::new("/proc/version")).err().expect("proc stores nothing");
        assert!(err.to_string().contains("a file of proc"), "{err}");
        let dir = std::env::temp_dir().join(format!("bindtrace-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("never-started.ndjson");
        drop(OutputFile::open(&path).expect("a new file in a writable directory"));
        assert!(!path.exists(), "a file bindtrace created and never started is removed");
        std::fs::write(&path, "kept\n").expect("write");
        drop(OutputFile::open(&path).expect("an existing file"));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "kept\n", "not truncated before the start");
        let started = OutputFile::open(&path).expect("open").start().expect("start");
        assert_eq!(started.metadata().expect("metadata").len(), 0, "truncated at the start");
        let err = OutputFile::open(&dir).err().expect("a directory");
        assert!(err.to_string().contains("it is a directory"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
