//! Fetching what the guests boot: a private apt configuration beside the host's (its mirrors,
//! never its state), Debian's kernels and a static busybox, unpacked into a cache.

use std::{path::PathBuf, process::Command};

use anyhow::{anyhow, bail, Result};

use super::matrix::GuestKernel;
use crate::{
    dist::Arch,
    run,
    setup::{apt_install, output},
    workspace_root,
};

/// Where downloaded kernels are kept between runs, outside the repository.
pub(super) fn cache_dir() -> PathBuf {
    let system = PathBuf::from("/var/cache/bindtrace-vm");
    if std::fs::create_dir_all(&system).is_ok() {
        system
    } else {
        workspace_root().join("target/vm/cache")
    }
}

/// Numeric components of a package name, for "newest" comparisons (6.12.117 > 6.12.99).
pub(super) fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

/// The package-name pattern of a Debian cloud kernel series for one architecture.
pub(super) fn kernel_package_pattern(series: &str, arch: Arch) -> Result<String> {
    let deb = arch.deb;
    Ok(match series {
        "5.10" => format!(r"^linux-image-5\.10\.0-[0-9]+-cloud-{deb}-unsigned$"),
        "6.1" => format!(r"^linux-image-6\.1\.0-[0-9]+-cloud-{deb}-unsigned$"),
        "6.12" => format!(r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-{deb}-unsigned$"),
        "6.1-rt" => format!(r"^linux-image-6\.1\.0-[0-9]+-rt-{deb}-unsigned$"),
        "6.12-16k" => format!(r"^linux-image-6\.12\.[0-9]+\+deb12-{deb}-16k-unsigned$"),
        other => bail!("unknown kernel series {other}: use 5.10, 6.1, 6.1-rt, 6.12 or 6.12-16k"),
    })
}

/// An apt configuration of bindtrace's own, beside the host's and never touching it: its own
/// state, cache, package list and architecture, with the suites the matrix needs (bookworm
/// for 6.1 and 6.12, bullseye for 5.10) on the mirrors the host's sources already use.
pub(super) struct PrivateApt {
    pub(super) dir: PathBuf,
    pub(super) arch: Arch,
}

/// Debian's archive signing keys, as the debian-archive-keyring package installs them.
pub(super) const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

impl PrivateApt {
    pub(super) fn new(arch: Arch) -> Result<Self> {
        let dir = cache_dir().join(format!("apt-{}", arch.deb));
        for sub in ["state/lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/apt.conf.d"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let status = dir.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        let (main, security) = host_debian_mirrors()?;
        let line = |uri: &str, suite: &str| format!("deb [signed-by={DEBIAN_KEYRING}] {uri} {suite} main\n");
        let sources = [
            line(&main, "bookworm"),
            line(&main, "bookworm-updates"),
            line(&security, "bookworm-security"),
            line(&main, "bullseye"),
            line(&security, "bullseye-security"),
        ]
        .concat();
        std::fs::write(dir.join("etc/sources.list"), sources)?;
        let apt = Self { dir, arch };
        // Lists fetched within the hour serve (xtask test fetches them ahead of the matrix).
        let fresh = std::fs::metadata(apt.dir.join("state/lists"))
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age < std::time::Duration::from_secs(3600)));
        if !fresh {
            run(apt.command("apt-get").args(["update", "-qq"]))?;
        }
        Ok(apt)
    }

    pub(super) fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let dir = self.dir.display();
        for option in [
            format!("Dir::State={dir}/state"),
            format!("Dir::State::status={dir}/state/status"),
            format!("Dir::Cache={dir}/cache"),
            format!("Dir::Etc::SourceList={dir}/etc/sources.list"),
            format!("Dir::Etc::SourceParts={dir}/etc/sources.list.d"),
            format!("Dir::Etc::Parts={dir}/etc/apt.conf.d"),
            format!("APT::Architecture={}", self.arch.deb),
            format!("APT::Architectures={}", self.arch.deb),
        ] {
            command.arg("-o").arg(option);
        }
        command
    }

    /// Packages matching `pattern`, newest first.
    pub(super) fn packages(&self, pattern: &str) -> Result<Vec<String>> {
        let listing = output(self.command("apt-cache").args(["search", "--names-only", pattern]))?;
        let mut names: Vec<String> =
            listing.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
        names.sort_by_key(|name| std::cmp::Reverse(version_key(name)));
        if names.is_empty() {
            bail!("apt knows no {} package matching {pattern}", self.arch.deb);
        }
        Ok(names)
    }

    /// Downloads (once) and unpacks the newest of `candidates` that the archive serves: the
    /// index may list versions the archive no longer has.
    pub(super) fn unpack_newest(&self, candidates: &[String]) -> Result<PathBuf> {
        let cache = cache_dir().join(self.arch.deb);
        std::fs::create_dir_all(&cache)?;
        let mut refusals = Vec::new();
        for package in candidates {
            let unpacked = cache.join(package);
            if unpacked.join(".unpacked").exists() {
                return Ok(unpacked);
            }
            let _ = std::fs::remove_dir_all(&unpacked);
            if let Err(err) = run(self.command("apt-get").args(["download", "-qq", package]).current_dir(&cache)) {
                eprintln!("xtask: vm: {package} is listed but did not download; trying the next");
                refusals.push(format!("{package}: {err:#}"));
                continue;
            }
            let deb = std::fs::read_dir(&cache)?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.extension().is_some_and(|e| e == "deb")
                        && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
                })
                .ok_or_else(|| anyhow!("apt-get download left no {package} .deb"))?;
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
            std::fs::remove_file(&deb)?;
            std::fs::write(unpacked.join(".unpacked"), "")?;
            return Ok(unpacked);
        }
        bail!("none of the candidate packages downloaded: {}", refusals.join("; "))
    }
}

/// The URIs the host's apt sources use for Debian's main archive and its security archive:
/// the matrix fetches from the same mirrors (and names none itself).
pub(crate) fn host_debian_mirrors() -> Result<(String, String)> {
    let mut pairs = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    files.extend(std::fs::read_dir("/etc/apt/sources.list.d").into_iter().flatten().flatten().map(|e| e.path()));
    for file in files {
        let name = file.to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        if name.ends_with(".sources") {
            pairs.extend(deb822_uri_suites(&text));
        } else if name.ends_with(".list") {
            pairs.extend(one_line_uri_suites(&text));
        }
    }
    mirrors_of(&pairs).ok_or_else(|| {
        anyhow!("the host's apt sources name no Debian archive with a bookworm and a bookworm-security suite")
    })
}

/// (URI, suite) pairs of a deb822 `.sources` file.
pub(super) fn deb822_uri_suites(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let enabled = !stanza.lines().any(|l| l.trim().eq_ignore_ascii_case("enabled: no"));
        if enabled && field("Types").iter().any(|t| t == "deb") {
            for uri in field("URIs") {
                pairs.extend(field("Suites").into_iter().map(|suite| (uri.clone(), suite)));
            }
        }
    }
    pairs
}

/// (URI, suite) pairs of a one-line-style `.list` file.
pub(super) fn one_line_uri_suites(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().filter(|w| !w.starts_with('[') && !w.ends_with(']'));
            (words.next()? == "deb").then_some(())?;
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// The main and security archive URIs among the host's (URI, suite) pairs.
pub(super) fn mirrors_of(pairs: &[(String, String)]) -> Option<(String, String)> {
    let main = pairs.iter().find(|(_, suite)| suite == "bookworm")?.0.clone();
    let security = pairs.iter().find(|(_, suite)| suite == "bookworm-security")?.0.clone();
    Some((main, security))
}

/// What one guest boots: its kernel and its initramfs.
pub(super) fn guest_kernel(apt: &PrivateApt, guest: &GuestKernel) -> Result<PathBuf> {
    let candidates = apt.packages(&kernel_package_pattern(guest.series, guest.arch)?)?;
    let unpacked = apt.unpack_newest(&candidates)?;
    std::fs::read_dir(unpacked.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .ok_or_else(|| anyhow!("{} has no boot/vmlinuz-*", unpacked.display()))
}

/// A static busybox for the guest's architecture, from Debian's busybox-static.
pub(super) fn guest_busybox(apt: &PrivateApt) -> Result<PathBuf> {
    let unpacked = apt.unpack_newest(&["busybox-static".to_owned()])?;
    let busybox = unpacked.join("bin/busybox");
    busybox.exists().then_some(busybox).ok_or_else(|| anyhow!("busybox-static has no bin/busybox"))
}

/// The QEMU packages for the guests, and cpio for the initramfs.
pub(crate) const APT_PACKAGES: [&str; 3] = ["qemu-system-x86", "qemu-system-arm", "cpio"];

pub(super) fn ensure_packages() -> Result<()> {
    apt_install(&APT_PACKAGES.map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_debian_mirrors_are_read_from_either_sources_format() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let pairs = deb822_uri_suites(deb822);
        assert_eq!(pairs.len(), 3);
        assert_eq!(
            mirrors_of(&pairs),
            Some(("http://mirror.example/debian".to_owned(), "http://mirror.example/debian-security".to_owned()))
        );
        let list = "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main\ndeb http://m.example/sec bookworm-security main\n";
        let pairs = one_line_uri_suites(list);
        assert_eq!(mirrors_of(&pairs), Some(("http://m.example/debian".to_owned(), "http://m.example/sec".to_owned())));
        assert_eq!(mirrors_of(&pairs[..1]), None, "no security archive");
        let disabled = "Types: deb\nURIs: http://x/debian\nSuites: bookworm\nEnabled: no\n";
        assert!(deb822_uri_suites(disabled).is_empty());
    }
    #[test]
    fn newer_kernel_packages_sort_first() {
        assert_eq!(version_key("linux-image-6.12.117+deb12"), vec![6, 12, 117, 12]);
        assert!(version_key("6.12.117") > version_key("6.12.99"));
    }
}
