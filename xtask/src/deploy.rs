//! What runs bindtrace on a fleet: the container image (`cargo xtask image`, from
//! deploy/Dockerfile and the static binary alone) and the Kubernetes manifests in
//! deploy/kubernetes/, checked against the Kubernetes schema by `cargo xtask test`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{dist, run, setup::output, workspace_root};

/// The oldest Kubernetes release the manifests must validate against, and the validator's
/// default (its newest).
const KUBERNETES_VERSIONS: [Option<&str>; 2] = [Some("1.27"), None];

fn manifests() -> Result<Vec<PathBuf>> {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    found.sort();
    if found.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    Ok(found)
}

/// PyPI's kubernetes-validate, installed when missing.
fn ensure_validator() -> Result<()> {
    if Command::new("kubernetes-validate").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "kubernetes-validate"]))
}

fn validate(path: &Path, version: Option<&str>) -> Result<()> {
    let mut command = Command::new("kubernetes-validate");
    command.args(["--strict", "--quiet"]);
    if let Some(version) = version {
        command.args(["--kubernetes-version", version]);
    }
    run(command.arg(path))
}

/// Every manifest validates (strictly: no unknown fields) against the oldest and the newest
/// schema; and a copy with one misspelt field does not, so the check is known to bite.
pub(crate) fn validate_manifests() -> Result<()> {
    ensure_validator()?;
    let manifests = manifests()?;
    for manifest in &manifests {
        for version in KUBERNETES_VERSIONS {
            validate(manifest, version)?;
        }
    }
    let original = std::fs::read_to_string(&manifests[0])?;
    // The key itself, not the comment that explains it.
    let broken = original.replacen("hostPID: true", "hostPIDs: true", 1);
    if broken == original {
        bail!("{} has no hostPID to misspell for the validator's self-check", manifests[0].display());
    }
    let copy = workspace_root().join("target/kubernetes-validate-self-check.yaml");
    std::fs::write(&copy, broken)?;
    let refused = validate(&copy, None).is_err();
    let _ = std::fs::remove_file(&copy);
    if !refused {
        bail!("kubernetes-validate accepted a misspelt field: the manifest check proves nothing");
    }
    eprintln!(
        "xtask: {} manifest(s) valid for Kubernetes 1.27 and the validator's newest; a misspelt field is refused",
        manifests.len()
    );
    Ok(())
}

/// The static binary of this machine's architecture, for the image and its test.
pub(crate) fn host_static_binary() -> Result<PathBuf> {
    let arch = dist::Arch::by_name(std::env::consts::ARCH)?;
    arch.ensure_toolchain()?;
    arch.build_static("bindtrace", "bindtrace")
}

/// `cargo xtask image`: bindtrace:VERSION from deploy/Dockerfile and the static binary.
pub(crate) fn image() -> Result<()> {
    let binary = host_static_binary()?;
    let context = workspace_root().join("target/image");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&binary, context.join("bindtrace")).context("copying the binary into the image context")?;
    let tag = format!("bindtrace:{}", env!("CARGO_PKG_VERSION"));
    if output(Command::new("docker").arg("version")).is_err() {
        bail!("docker does not answer: start dockerd (Debian's docker.io) first");
    }
    run(Command::new("docker")
        .args(["build", "-f"])
        .arg(workspace_root().join("deploy/Dockerfile"))
        .args(["-t", &tag])
        .arg(&context)
        // The classic builder: `FROM scratch` needs nothing from a registry.
        .env("DOCKER_BUILDKIT", "0"))?;
    eprintln!("xtask: built {tag}");
    Ok(())
}
