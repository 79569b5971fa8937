//! `cargo xtask dist`: fully static (musl) `bindtrace` binaries for x86_64 and aarch64, each
//! with the probe built for its own architecture embedded (the kprobe programs read that
//! architecture's registers), a `.deb` per architecture with the man page and shell
//! completions, and `SHA256SUMS`. Everything lands in `target/dist/`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    cargo, run,
    setup::{self, apt_install, output},
    workspace_root,
};

/// A CPU architecture bindtrace ships for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Arch {
    /// Rust's name (`target_arch`).
    pub name: &'static str,
    pub musl_target: &'static str,
    /// Debian's name.
    pub deb: &'static str,
    /// Debian packages that link and strip for it from an x86_64 host.
    cross_packages: &'static [&'static str],
    /// The C compiler driver that links a musl binary for it (None: the host's).
    linker: Option<&'static str>,
    strip: &'static str,
}

pub(crate) const X86_64: Arch = Arch {
    name: "x86_64",
    musl_target: "x86_64-unknown-linux-musl",
    deb: "amd64",
    cross_packages: &[],
    linker: None,
    strip: "strip",
};

/// 32-bit x86 (ia32 compat on an x86_64 kernel): only for the VM matrix's compat scenario,
/// not a release architecture.
pub(crate) const I686_COMPAT: Arch = Arch {
    name: "i686",
    musl_target: "i686-unknown-linux-musl",
    deb: "i386",
    cross_packages: &[],
    linker: None,
    strip: "strip",
};

pub(crate) const AARCH64: Arch = Arch {
    name: "aarch64",
    musl_target: "aarch64-unknown-linux-musl",
    deb: "arm64",
    cross_packages: &["gcc-aarch64-linux-gnu"],
    linker: Some("aarch64-linux-gnu-gcc"),
    strip: "aarch64-linux-gnu-strip",
};

pub(crate) const ARCHES: [Arch; 2] = [X86_64, AARCH64];

impl Arch {
    pub(crate) fn by_name(name: &str) -> Result<Arch> {
        ARCHES
            .into_iter()
            .find(|a| a.name == name || a.deb == name)
            .ok_or_else(|| anyhow!("unknown architecture {name}: use x86_64 or aarch64"))
    }

    /// Installs the rustup target and the cross tools this architecture's build needs.
    pub(crate) fn ensure_toolchain(&self) -> Result<()> {
        setup::ensure()?;
        let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
        if !installed.lines().any(|l| l.trim() == self.musl_target) {
            run(Command::new("rustup").args(["target", "add", self.musl_target]))?;
        }
        apt_install(&self.cross_packages.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>())?;
        if self.strip == "strip" {
            apt_install(&["binutils".to_owned()])?;
        }
        Ok(())
    }

    /// Builds `bin` of `package` as a static release binary for this architecture.
    pub(crate) fn build_static(&self, package: &str, bin: &str) -> Result<PathBuf> {
        let mut command = cargo();
        command.args(["build", "--release", "--package", package, "--bin", bin, "--target", self.musl_target]);
        if let Some(linker) = self.linker {
            let variable = format!("CARGO_TARGET_{}_LINKER", self.musl_target.to_uppercase().replace('-', "_"));
            command.env(variable, linker);
        }
        run(&mut command)?;
        let binary = workspace_root().join("target").join(self.musl_target).join("release").join(bin);
        if has_interpreter(&binary)? {
            bail!("{} is dynamically linked (it has a PT_INTERP header); expected a static binary", binary.display());
        }
        Ok(binary)
    }
}

/// Builds `bin` of `package` for every architecture in one cargo run, so that the two
/// fat-LTO links (single-threaded each) run at once on a machine with two cores instead of
/// one after the other; later per-architecture builds find them done.
pub(crate) fn build_static_all(package: &str, bin: &str) -> Result<()> {
    let mut command = cargo();
    command.args(["build", "--release", "--package", package, "--bin", bin]);
    for arch in ARCHES {
        arch.ensure_toolchain()?;
        command.args(["--target", arch.musl_target]);
        if let Some(linker) = arch.linker {
            let variable = format!("CARGO_TARGET_{}_LINKER", arch.musl_target.to_uppercase().replace('-', "_"));
            command.env(variable, linker);
        }
    }
    run(&mut command)
}

/// Does this ELF file (64- or 32-bit, little-endian) name a dynamic loader (PT_INTERP)? A
/// static binary does not.
fn has_interpreter(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |at: usize, len: usize| -> Result<u64> {
        let bytes = elf.get(at..at + len).ok_or_else(|| anyhow!("{} is not an ELF file", path.display()))?;
        Ok(bytes.iter().rev().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
    };
    let (phoff, phentsize, phnum) = match elf.get(..5) {
        Some(b"\x7fELF\x02") => (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?),
        Some(b"\x7fELF\x01") => (field(0x1c, 4)?, field(0x2a, 2)?, field(0x2c, 2)?),
        _ => bail!("{} is not an ELF file", path.display()),
    };
    for index in 0..phnum {
        let header = usize::try_from(phoff + index * phentsize)?;
        if field(header, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What `dist` produced.
pub(crate) struct Dist {
    /// The stripped static binary of each architecture, in [`ARCHES`] order.
    pub binaries: Vec<(Arch, PathBuf)>,
}

impl Dist {
    pub(crate) fn binary(&self, arch: Arch) -> Result<&Path> {
        self.binaries
            .iter()
            .find(|(a, _)| *a == arch)
            .map(|(_, path)| path.as_path())
            .ok_or_else(|| anyhow!("no {} binary was built", arch.name))
    }
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Builds everything into `target/dist/`.
pub(crate) fn dist(arches: &[Arch]) -> Result<Dist> {
    let dir = workspace_root().join("target/dist");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut binaries = Vec::new();
    for arch in arches {
        arch.ensure_toolchain()?;
        let built = arch.build_static("bindtrace", "bindtrace")?;
        let shipped = dir.join(format!("bindtrace-{VERSION}-{}-linux-musl", arch.name));
        std::fs::copy(&built, &shipped).with_context(|| format!("copying {}", built.display()))?;
        run(Command::new(arch.strip).arg(&shipped))?;
        binaries.push((*arch, shipped));
    }
    // The man page and completions do not depend on the architecture: any binary that runs
    // here writes them.
    let runnable = binaries
        .iter()
        .find(|(arch, _)| arch.name == std::env::consts::ARCH)
        .map(|(_, path)| path.clone())
        .map_or_else(|| X86_64.build_static("bindtrace", "bindtrace"), Ok)?;
    let docs = generate_docs(&runnable, &dir)?;
    for (arch, binary) in &binaries {
        let deb = build_deb(*arch, binary, &docs, &dir)?;
        eprintln!("xtask: dist: {}", deb.display());
    }
    write_checksums(&dir)?;
    eprintln!("xtask: dist: everything is in {}", dir.display());
    Ok(Dist { binaries })
}

/// The man pages and the completion scripts, written by the binary itself.
struct Docs {
    /// bindtrace.1 and one page per subcommand.
    man_pages: Vec<PathBuf>,
    /// (path in the package, generated file)
    completions: Vec<(&'static str, PathBuf)>,
}

fn generate_docs(bindtrace: &Path, dir: &Path) -> Result<Docs> {
    let man_dir = dir.join("man");
    std::fs::create_dir_all(&man_dir)?;
    run(Command::new(bindtrace).arg("man").arg(&man_dir))?;
    let mut man_pages: Vec<PathBuf> = std::fs::read_dir(&man_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    man_pages.sort();
    if !man_pages.iter().any(|p| p.ends_with("bindtrace.1")) {
        bail!("bindtrace man wrote no bindtrace.1 into {}", man_dir.display());
    }
    let completions_dir = dir.join("completions");
    std::fs::create_dir_all(&completions_dir)?;
    let mut completions = Vec::new();
    for (shell, file, installed) in [
        ("bash", "bindtrace.bash", "usr/share/bash-completion/completions/bindtrace"),
        ("zsh", "_bindtrace", "usr/share/zsh/vendor-completions/_bindtrace"),
        ("fish", "bindtrace.fish", "usr/share/fish/vendor_completions.d/bindtrace.fish"),
    ] {
        let path = completions_dir.join(file);
        std::fs::write(&path, output(Command::new(bindtrace).args(["completions", shell]))?)?;
        completions.push((installed, path));
    }
    Ok(Docs { man_pages, completions })
}

/// Documents the .deb installs under /usr/share/doc/bindtrace: (name there, path in the tree).
const SHIPPED_DOCS: [(&str, &str); 2] = [("ndjson-schema.md", "docs/ndjson-schema.md"), ("README.md", "README.md")];

fn build_deb(arch: Arch, binary: &Path, docs: &Docs, dir: &Path) -> Result<PathBuf> {
    let root = dir.join(format!("deb-{}", arch.deb));
    let _ = std::fs::remove_dir_all(&root);
    let place = |relative: &str, source: &Path| -> Result<()> {
        let target = root.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(source, &target).with_context(|| format!("copying {}", source.display()))?;
        Ok(())
    };
    place("usr/bin/bindtrace", binary)?;
    for (installed, generated) in &docs.completions {
        place(installed, generated)?;
    }
    let man_dir = root.join("usr/share/man/man1");
    std::fs::create_dir_all(&man_dir)?;
    for page in &docs.man_pages {
        let name = page.file_name().ok_or_else(|| anyhow!("man page without a name"))?.to_string_lossy();
        let gzipped = Command::new("gzip").args(["-9", "-n", "-c"]).arg(page).output().context("running gzip")?;
        if !gzipped.status.success() {
            bail!("gzip {} failed", page.display());
        }
        std::fs::write(man_dir.join(format!("{name}.gz")), gzipped.stdout)?;
    }
    let doc_dir = root.join("usr/share/doc/bindtrace");
    std::fs::create_dir_all(&doc_dir)?;
    // What the man page points to (its FILES section): the NDJSON schema and the README.
    for (installed, source) in SHIPPED_DOCS {
        place(&format!("usr/share/doc/bindtrace/{installed}"), &crate::workspace_root().join(source))?;
    }
    std::fs::write(
        doc_dir.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: bindtrace\n\nFiles: *\nLicense: MIT or Apache-2.0\n",
    )?;
    let installed_kib = directory_bytes(&root)?.div_ceil(1024);
    std::fs::create_dir_all(root.join("DEBIAN"))?;
    let mut control = std::fs::File::create(root.join("DEBIAN/control"))?;
    write!(
        control,
        "Package: bindtrace\n\
         Version: {VERSION}\n\
         Architecture: {}\n\
         Maintainer: The bindtrace developers <bindtrace@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Section: net\n\
         Priority: optional\n\
         Description: trace every socket bind, with its result, and who holds the port\n \
         bindtrace records each bind() on a Linux host with eBPF, keeps the address and\n \
         port a failed bind asked for, and explains EADDRINUSE, EACCES, EADDRNOTAVAIL\n \
         and EINVAL live, naming the process that holds the port. A static binary.\n",
        arch.deb
    )?;
    let deb = dir.join(format!("bindtrace_{VERSION}_{}.deb", arch.deb));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&root).arg(&deb))?;
    std::fs::remove_dir_all(&root)?;
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    for expected in [
        "./usr/bin/bindtrace",
        "./usr/share/man/man1/bindtrace.1.gz",
        "bash-completion/completions/bindtrace",
        "./usr/share/doc/bindtrace/ndjson-schema.md",
        "./usr/share/doc/bindtrace/README.md",
    ] {
        if !contents.lines().any(|l| l.contains(expected)) {
            bail!("{} lacks {expected}:\n{contents}", deb.display());
        }
    }
    Ok(deb)
}

fn directory_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { directory_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// `SHA256SUMS` over the binaries and packages, in `sha256sum -c` format.
fn write_checksums(dir: &Path) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bindtrace-") || n.ends_with(".deb"))
        .collect();
    names.sort();
    let sums = output(Command::new("sha256sum").args(&names).current_dir(dir))?;
    std::fs::write(dir.join("SHA256SUMS"), sums)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_has_an_interpreter_or_is_static_as_built() {
        let me = std::env::current_exe().expect("test binary path");
        // A test binary for the host's default (glibc) target is dynamically linked.
        #[cfg(target_env = "gnu")]
        assert!(has_interpreter(&me).expect("ELF"));
        let not_elf = std::env::temp_dir().join("xtask-not-elf");
        std::fs::write(&not_elf, b"#!/bin/sh\n").expect("write");
        assert!(has_interpreter(&not_elf).is_err());
    }

    #[test]
    fn arches_are_found_by_rust_or_debian_name() {
        assert_eq!(Arch::by_name("arm64").expect("arm64").name, "aarch64");
        assert_eq!(Arch::by_name("x86_64").expect("x86_64").deb, "amd64");
        assert!(Arch::by_name("riscv64").is_err());
    }
}
