//! aya 0.14 workarounds around the kernel's BTF: a loader made without aya's whole-BTF parse,
//! and the parse fexit needs, made only once the kernel has shown it loads fexit programs.
//! Both go with aya 0.15 (its loader parses lazily), which needs a newer rustc than here.

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{Btf, EbpfLoader};
use bindtrace_common::names;

use crate::layout::KernelBtf;

/// aya's loader, created on another thread (see [`spawn_loader_without_kernel_btf`]).
pub(crate) struct PendingLoader {
    loader: std::thread::JoinHandle<EbpfLoader<'static>>,
}

/// Where the loader's thread moves its root: aya's fixed path to the kernel BTF
/// (`/sys/kernel/btf/vmlinux`) does not exist below it.
const LOADER_ROOT: &str = "/sys/kernel/btf";

/// `EbpfLoader::new()`, the only constructor aya 0.14 has, parses the whole kernel BTF:
/// about 20 ms of CPU and 19 MB of peak RSS (VmHWM with and without it), for a copy bindtrace
/// never uses (the probe takes its offsets from the config, not from CO-RE relocations, and
/// fexit parses its own copy only once the kernel has shown it loads fexit programs). So the
/// loader is made on a thread that first takes a private filesystem context
/// (`unshare(CLONE_FS)`, this thread only) and changes its root to [`LOADER_ROOT`], where
/// aya's read fails at once. The thread ends right after; nothing else runs under that root.
/// Without CAP_SYS_CHROOT the parse happens, and is freed at once.
fn spawn_loader_without_kernel_btf() -> std::thread::JoinHandle<EbpfLoader<'static>> {
    // Only ever on a thread of its own: it changes that thread's root.
    std::thread::spawn(|| {
        let isolated = nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
            .and_then(|()| nix::unistd::chroot(LOADER_ROOT))
            .and_then(|()| nix::unistd::chdir("/"));
        if let Err(err) = isolated {
            log::debug!("eBPF loader made with aya's kernel BTF parse (no private root: {err})");
        }
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        loader
    })
}

impl PendingLoader {
    pub(crate) fn start() -> Self {
        Self { loader: spawn_loader_without_kernel_btf() }
    }

    pub(super) fn finish(self) -> Result<EbpfLoader<'static>> {
        self.loader.join().map_err(|_| anyhow!("preparing the eBPF loader panicked"))
    }
}

/// The kernel BTF aya's fexit loading needs, parsed on first use: only on kernels that have
/// shown they load fexit programs (two whole-kernel BTF parses at once took peak RSS to
/// ~41 MB, `cargo xtask bench`).
pub(crate) struct BtfSource {
    parsed: Option<Btf>,
    /// The bind functions' BTF ids, from bindtrace's own (cheap) BTF reading.
    function_ids: [Option<u32>; 2],
    /// See [`KernelBtf::fd_to_socket`].
    fd_to_socket: std::result::Result<(), String>,
}

impl BtfSource {
    pub(super) fn new(kernel: &KernelBtf) -> Self {
        Self { parsed: None, function_ids: kernel.bind_function_ids, fd_to_socket: kernel.fd_to_socket.clone() }
    }

    /// The hooks that find a bind's socket from its fd need the walk's members.
    pub(super) fn fd_to_socket(&self) -> Result<()> {
        self.fd_to_socket.clone().map_err(|why| anyhow!("a bind's socket cannot be found from its fd: {why}"))
    }

    pub(super) fn get(&mut self) -> Result<&Btf> {
        if self.parsed.is_none() {
            self.parsed = Some(Btf::from_sys_fs().context("fexit needs the kernel's BTF")?);
        }
        self.parsed.as_ref().ok_or_else(|| anyhow!("kernel BTF unavailable"))
    }

    /// Proves with a two-instruction program that this kernel loads fexit programs on the
    /// bind functions, before the expensive part (see [`crate::bpf_sys`]).
    pub(super) fn fexit_supported(&self) -> Result<()> {
        // inet_bind is required; inet6_bind may be in a module's BTF (see Coverage::inet6_bind).
        let (function, id) = (names::INET_BIND_FUNCTIONS[0], self.function_ids[0]);
        let Some(id) = id else {
            bail!("the kernel's BTF does not describe {function}");
        };
        crate::bpf_sys::fexit_loadable(function, id)
    }

    /// Does the kernel's BTF describe this function?
    pub(super) fn describes(&mut self, function: &str) -> Result<bool> {
        Ok(self.get()?.id_by_type_name_kind(function, aya_obj::btf::BtfKind::Func).is_ok())
    }
}
