//! The raw bpf(2) syscall, for what aya 0.14 does not expose (the cgroup program query of
//! `host::policy`), and the feature probe built on it: does the kernel load an fexit program
//! at all (a two-instruction program), asked before bindtrace commits to the fexit backend. With aya 0.14 that backend needs its own
//! parse of the whole kernel BTF (about 20 ms and 6 MB of peak RSS, `cargo xtask bench`), which
//! is wasted on kernels that refuse tracing programs: EPERM where an LSM or lockdown forbids
//! them (this project's CI host), EINVAL or ENOTSUPP without BPF trampolines.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Result};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};

/// `r0 = 0; exit`: the smallest program the verifier accepts for fexit.
const RETURN_ZERO: [u64; 2] = [0xb7, 0x95];

/// The bpf(2) syscall with the whole `bpf_attr` (an older kernel checks that the fields it
/// does not know are zero). Raw, for the two commands aya 0.14 does not expose this way.
///
/// # Safety
/// The pointers in `attr` must be valid for what `cmd` reads and writes through them.
pub(crate) unsafe fn bpf_syscall(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` lives for the call; the caller vouches for the pointers inside it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads (and at once closes) a do-nothing fexit program on the kernel function whose BTF id
/// is `function_btf_id`. Errors say what the kernel answered.
pub(crate) fn fexit_loadable(function: &str, function_btf_id: u32) -> Result<()> {
    const LICENSE: &[u8] = b"GPL\0";
    // SAFETY: bpf_attr is plain data; all-zero is its documented "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_PROG_LOAD member of the union.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
    load.expected_attach_type = bpf_attach_type::BPF_TRACE_FEXIT as u32;
    load.attach_btf_id = function_btf_id;
    load.insn_cnt = RETURN_ZERO.len() as u32;
    load.insns = RETURN_ZERO.as_ptr() as u64;
    load.license = LICENSE.as_ptr() as u64;
    // SAFETY: BPF_PROG_LOAD reads `attr` (and what it points to, alive for the call) only.
    let fd = match unsafe { bpf_syscall(bpf_cmd::BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => fd,
        Err(err) => bail!("the kernel refuses fexit programs (a minimal one on {function}: BPF_PROG_LOAD: {err})"),
    };
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// Does the kernel let a tracepoint program call helper number `helper`? A helper can exist
/// (its number is in the kernel's `enum bpf_func_id`) and still be refused to tracing
/// programs: `bpf_get_current_ancestor_cgroup_id` was, before 5.14. Asked with a
/// four-instruction program: `r1 = 0; call helper; r0 = 0; exit`.
pub(crate) fn tracing_may_call(helper: u32) -> bool {
    const LICENSE: &[u8] = b"GPL\0";
    let program: [u64; 4] = [0x01b7, 0x85 | (u64::from(helper) << 32), 0xb7, 0x95];
    // SAFETY: bpf_attr is plain data; all-zero is its documented "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_PROG_LOAD member of the union.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT as u32;
    load.insn_cnt = program.len() as u32;
    load.insns = program.as_ptr() as u64;
    load.license = LICENSE.as_ptr() as u64;
    // SAFETY: BPF_PROG_LOAD reads `attr` (and what it points to, alive for the call) only.
    match unsafe { bpf_syscall(bpf_cmd::BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => {
            // SAFETY: the syscall returned a new file descriptor that nothing else owns.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            true
        }
        Err(_) => false,
    }
}
