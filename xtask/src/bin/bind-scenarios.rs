//! bind-scenarios: a fixed list of binds (TCP/UDP, IPv4/IPv6, success, EADDRINUSE, EACCES,
//! EINVAL, socket options set before bind; AF_UNIX paths and abstract names; the caller's
//! errors EBADF, ENOTSOCK, EFAULT) made for real, each printed as one JSON line with what
//! was asked and what bind() returned. `cargo xtask vm` runs it under bindtrace in
//! each test kernel and checks that every scenario has a matching event, field by field.
//!
//! Raw libc calls: the scenarios set options the standard library does not expose, and the
//! binary must stay small and self-contained for the initramfs.

use std::{
    io::Write as _,
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr},
};

struct Scenario {
    name: &'static str,
    family: i32,
    sock_type: i32,
    addr: String,
    port: u16,
    /// (level, option) pairs set to 1 before bind.
    options: &'static [(i32, i32)],
    /// Bind this socket once before the measured bind (for EINVAL).
    bind_twice: bool,
    /// Hold the address with a listener first (for EADDRINUSE).
    hold_first: bool,
    /// Run in a child with this uid (for EACCES).
    uid: Option<u32>,
}

fn bind_raw(fd: i32, family: i32, addr: &str, port: u16) -> i32 {
    // SAFETY: the sockaddrs are plain data on the stack, with their true lengths.
    unsafe {
        let rc = if family == libc::AF_INET {
            let ip: Ipv4Addr = addr.parse().unwrap_or(Ipv4Addr::LOCALHOST);
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
                sin_zero: [0; 8],
            };
            libc::bind(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in>() as u32)
        } else {
            let ip: Ipv6Addr = addr.parse().unwrap_or(Ipv6Addr::LOCALHOST);
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: port.to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: ip.octets() },
                sin6_scope_id: 0,
            };
            libc::bind(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in6>() as u32)
        };
        if rc == 0 {
            0
        } else {
            *libc::__errno_location()
        }
    }
}

/// Runs one scenario; returns the errno of the measured bind and the pid that made it.
fn run(s: &Scenario) -> (i32, u32) {
    // SAFETY: plain socket calls; the forked child runs only raw syscalls until _exit.
    unsafe {
        if s.hold_first {
            let holder = libc::socket(s.family, s.sock_type, 0);
            bind_raw(holder, s.family, &s.addr, s.port);
            if s.sock_type == libc::SOCK_STREAM {
                libc::listen(holder, 1);
            }
            // Leaked on purpose: it must hold the port until the process ends.
        }
        if let Some(uid) = s.uid {
            let pid = libc::fork();
            if pid == 0 {
                if libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    libc::_exit(200);
                }
                let fd = libc::socket(s.family, s.sock_type, 0);
                libc::_exit(bind_raw(fd, s.family, &s.addr, s.port));
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            return (libc::WEXITSTATUS(status), pid as u32);
        }
        let fd = libc::socket(s.family, s.sock_type, 0);
        for &(level, option) in s.options {
            let on: libc::c_int = 1;
            libc::setsockopt(fd, level, option, (&raw const on).cast(), size_of::<libc::c_int>() as u32);
        }
        if s.bind_twice {
            bind_raw(fd, s.family, &s.addr, s.port - 1);
        }
        // Leaked on purpose: closing would let later scenarios reuse the ports.
        (bind_raw(fd, s.family, &s.addr, s.port), std::process::id())
    }
}

/// bind() on a raw fd with a raw sockaddr pointer and length: the errno (0 on success).
fn bind_ptr(fd: i32, addr: *const libc::sockaddr, len: u32) -> i32 {
    // SAFETY: the kernel validates every argument; bad ones are what some scenarios test.
    unsafe {
        if libc::bind(fd, addr, len) == 0 {
            0
        } else {
            *libc::__errno_location()
        }
    }
}

/// A `sockaddr_un` for `name` (a leading NUL makes it abstract) and its length.
fn sockaddr_un(name: &[u8]) -> (libc::sockaddr_un, u32) {
    // SAFETY: sockaddr_un is plain data; all zeros is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as u16;
    for (slot, byte) in sa.sun_path.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    (sa, (2 + name.len()) as u32)
}

/// The scenarios no inet address identifies: unix names and the caller's own errors. Each
/// line carries `match` (the event fields that find its event) and `expect` (the fields
/// every backend that sees bind(2) must report).
fn special_scenarios(out: &mut impl std::io::Write) {
    let pid = std::process::id();
    let line = |out: &mut dyn std::io::Write, name: &str, matching: String, expect: String| {
        let _ =
            writeln!(out, "{{\"scenario\":\"{name}\",\"pid\":{pid},\"match\":{{{matching}}},\"expect\":{{{expect}}}}}");
    };
    // SAFETY: plain socket calls on fds this process owns; leaked on purpose (holders).
    unsafe {
        let path = b"/tmp/bind-scenarios.sock";
        let _ = std::fs::remove_file(std::str::from_utf8(path).unwrap_or_default());
        let (sa, len) = sockaddr_un(path);
        let first = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        let ok = bind_ptr(first, (&raw const sa).cast(), len);
        libc::listen(first, 1);
        let second = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        let taken = bind_ptr(second, (&raw const sa).cast(), len);
        let shown = "/tmp/bind-scenarios.sock";
        line(
            out,
            "unix_path_ok",
            format!("\"unix_path\":\"{shown}\",\"fd\":{first}"),
            format!("\"errno\":{ok},\"family\":\"AF_UNIX\",\"proto\":\"stream\",\"port\":null,\"freebind\":null"),
        );
        line(
            out,
            "unix_path_eaddrinuse",
            format!("\"unix_path\":\"{shown}\",\"fd\":{second}"),
            format!(
                "\"errno\":{taken},\"errno_name\":\"EADDRINUSE\",\"family\":\"AF_UNIX\",\"port\":null,\
                 \"diagnosis_kind\":\"in_use_self\""
            ),
        );
        let (abstract_sa, abstract_len) = sockaddr_un(b"\0bind-scenarios");
        let datagram = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0);
        let ok = bind_ptr(datagram, (&raw const abstract_sa).cast(), abstract_len);
        line(
            out,
            "unix_abstract_ok",
            format!("\"unix_path\":\"@bind-scenarios\",\"fd\":{datagram}"),
            format!("\"errno\":{ok},\"unix_abstract\":true,\"proto\":\"dgram\""),
        );

        let v4 = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 41_200u16.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
            sin_zero: [0; 8],
        };
        let v4_len = size_of::<libc::sockaddr_in>() as u32;
        let closed_fd = 987;
        let err = bind_ptr(closed_fd, (&raw const v4).cast(), v4_len);
        line(
            out,
            "ebadf",
            format!("\"fd\":{closed_fd}"),
            format!("\"errno\":{err},\"errno_name\":\"EBADF\",\"proto\":null,\"diagnosis_kind\":\"bad_fd\""),
        );
        let mut pipe = [0; 2];
        libc::pipe(pipe.as_mut_ptr());
        let err = bind_ptr(pipe[0], (&raw const v4).cast(), v4_len);
        line(
            out,
            "enotsock",
            format!("\"fd\":{}", pipe[0]),
            format!("\"errno\":{err},\"errno_name\":\"ENOTSOCK\",\"proto\":null,\"diagnosis_kind\":\"not_a_socket\""),
        );
        let sock = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let err = bind_ptr(sock, 8 as *const libc::sockaddr, v4_len);
        line(
            out,
            "efault_unmapped",
            format!("\"fd\":{sock}"),
            format!(
                "\"errno\":{err},\"errno_name\":\"EFAULT\",\"family\":null,\"proto\":\"tcp\",\"diagnosis_kind\":\"bad_address\""
            ),
        );
        // listen() after two SO_REUSEADDR binds of one address: the second listen fails.
        for (family, addr, port) in [(libc::AF_INET, "127.0.0.1", 41_201), (libc::AF_INET6, "::1", 41_202)] {
            // Both bound before either listens: the second bind succeeds, the second listen not.
            let fds = [0, 1].map(|_| {
                let fd = libc::socket(family, libc::SOCK_STREAM, 0);
                let on: libc::c_int = 1;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&raw const on).cast(),
                    size_of::<libc::c_int>() as u32,
                );
                bind_raw(fd, family, addr, port);
                fd
            });
            let mut listen_errno = 0;
            for fd in fds {
                if libc::listen(fd, 1) != 0 {
                    listen_errno = *libc::__errno_location();
                }
            }
            line(
                out,
                if family == libc::AF_INET { "tcp4_listen_eaddrinuse" } else { "tcp6_listen_eaddrinuse" },
                format!("\"op\":\"listen\",\"port\":{port}"),
                format!(
                    "\"errno\":{listen_errno},\"errno_name\":\"EADDRINUSE\",\"addr\":\"{addr}\",\"family\":\"{}\",\"proto\":\"tcp\",\"reuseaddr\":true,\"diagnosis_kind\":\"listen_in_use\"",
                    if family == libc::AF_INET { "AF_INET" } else { "AF_INET6" }
                ),
            );
        }
        // io_uring's bind: no bind(2), so the syscall tracepoints cannot see it; the inet_bind
        // hooks (fexit, kprobe) do. Only where the kernel has IORING_OP_BIND (6.11).
        let uring_sock = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let uring_addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 41_210u16.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
            sin_zero: [0; 8],
        };
        // -EINVAL: this kernel has no IORING_OP_BIND; None: no io_uring at all.
        if io_uring_bind(uring_sock, (&raw const uring_addr).cast(), v4_len) == Some(0) {
            let _ = writeln!(
                out,
                "{{\"scenario\":\"io_uring_bind\",\"pid\":{pid},\"seen_by\":[\"fexit\",\"kprobe\"],\
                 \"match\":{{\"port\":41210,\"addr\":\"127.0.0.1\"}},\
                 \"expect\":{{\"errno\":0,\"fd\":-1,\"family\":\"AF_INET\",\"proto\":\"tcp\"}}}}"
            );
        }
        let sock = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let err = bind_ptr(sock, std::ptr::null(), v4_len);
        line(
            out,
            "efault_null",
            format!("\"fd\":{sock}"),
            format!("\"errno\":{err},\"errno_name\":\"EFAULT\",\"family\":null"),
        );
    }
}

/// Binds `fd` to `addr` through io_uring's IORING_OP_BIND (Linux 6.11): the kernel calls the
/// bind itself, with no bind(2). Returns the completion's result (0 or -errno); `None` when
/// io_uring is unavailable here.
fn io_uring_bind(fd: i32, addr: *const libc::sockaddr, len: u32) -> Option<i32> {
    const IORING_OP_BIND: u8 = 56;
    const IORING_ENTER_GETEVENTS: u32 = 1;
    const IORING_OFF_SQ_RING: libc::off_t = 0;
    const IORING_OFF_CQ_RING: libc::off_t = 0x800_0000;
    const IORING_OFF_SQES: libc::off_t = 0x1000_0000;
    /// `struct io_uring_params` (UAPI): 10 u32s, then the SQ and CQ ring offsets (10 u32s and
    /// a u64 each, as 40 bytes).
    #[repr(C)]
    struct Params {
        sq_entries: u32,
        cq_entries: u32,
        rest: [u32; 8],
        sq_off: [u32; 10],
        cq_off: [u32; 10],
    }
    // SAFETY: raw io_uring setup on memory the kernel maps for this process; every offset
    // comes from the kernel's params.
    unsafe {
        let mut params: Params = std::mem::zeroed();
        let ring = libc::syscall(libc::SYS_io_uring_setup, 1u32, &raw mut params) as i32;
        if ring < 0 {
            return None;
        }
        let map = |size: usize, offset: libc::off_t| {
            let at = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                ring,
                offset,
            );
            (at != libc::MAP_FAILED).then_some(at.cast::<u8>())
        };
        let (sq_off, cq_off) = (params.sq_off, params.cq_off);
        let sq = map(sq_off[6] as usize + params.sq_entries as usize * 4, IORING_OFF_SQ_RING)?;
        let cq = map(cq_off[5] as usize + params.cq_entries as usize * 16, IORING_OFF_CQ_RING)?;
        let sqes = map(params.sq_entries as usize * 64, IORING_OFF_SQES)?;
        // One SQE: opcode, fd, the sockaddr in `addr`, its length in `addr2` (the `off` slot).
        let sqe = sqes;
        std::ptr::write_bytes(sqe, 0, 64);
        *sqe = IORING_OP_BIND;
        sqe.add(4).cast::<i32>().write(fd);
        sqe.add(8).cast::<u64>().write(u64::from(len));
        sqe.add(16).cast::<u64>().write(addr as u64);
        let mask = sq.add(sq_off[2] as usize).cast::<u32>().read();
        let tail = sq.add(sq_off[1] as usize).cast::<u32>();
        let index = tail.read() & mask;
        sq.add(sq_off[6] as usize).cast::<u32>().add(index as usize).write(0);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        tail.write(tail.read() + 1);
        let entered = libc::syscall(libc::SYS_io_uring_enter, ring, 1u32, 1u32, IORING_ENTER_GETEVENTS, 0usize, 0usize);
        if entered < 0 {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let head = cq.add(cq_off[0] as usize).cast::<u32>().read();
        let cq_mask = cq.add(cq_off[2] as usize).cast::<u32>().read();
        let cqe = cq.add(cq_off[5] as usize + (head & cq_mask) as usize * 16);
        Some(cqe.add(8).cast::<i32>().read())
    }
}

/// A bind refused by a cgroup BPF program: a cgroup with a `cgroup/bind4` program that
/// returns 0, and a child that joins it and binds (EPERM). The line names the child; where
/// the setup fails it says which step, and the matrix counts that as a failure.
fn cgroup_denial_scenario(out: &mut dyn std::io::Write) {
    /// bpf(2) with a 128-byte `union bpf_attr` given as words (the kernel zero-extends it).
    fn bpf(cmd: i32, attr: &mut [u64; 16]) -> libc::c_long {
        // SAFETY: `attr` lives for the call; its pointers point at live buffers.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) }
    }
    const BPF_PROG_LOAD: i32 = 5;
    const BPF_PROG_ATTACH: i32 = 8;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u64 = 18;
    const BPF_CGROUP_INET4_BIND: u64 = 8;
    let Some(root) = std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|info| {
        info.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| mount_point.to_owned())
        })
    }) else {
        return setup_error_no_dir(out);
    };
    let dir = format!("{root}/bind-scenarios-deny-{}", std::process::id());
    // A setup that fails is said, so that the matrix fails rather than skips the scenario.
    let setup_error = |out: &mut dyn std::io::Write, step: &str| {
        let err = std::io::Error::last_os_error();
        let _ = writeln!(
            out,
            "{{\"scenario\":\"tcp4_eperm_cgroup_bpf\",\"pid\":{},\"setup_error\":\"{step}: {err}\"}}",
            std::process::id()
        );
    };
    if std::fs::create_dir(&dir).is_err() {
        return setup_error(out, &format!("mkdir {dir}"));
    }
    // Before 5.11 BPF memory is charged to RLIMIT_MEMLOCK, per user: bindtrace's maps
    // already hold most of root's default allowance.
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads the struct only.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    // r0 = 0; exit: refuse.
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = b"GPL\0";
    let mut attr = [0u64; 16];
    attr[0] = BPF_PROG_TYPE_CGROUP_SOCK_ADDR | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // expected_attach_type: the u32 at byte 68.
    attr[8] = BPF_CGROUP_INET4_BIND << 32;
    let program = bpf(BPF_PROG_LOAD, &mut attr);
    if program < 0 {
        let _ = std::fs::remove_dir(&dir);
        return setup_error(out, "BPF_PROG_LOAD");
    }
    let Ok(cgroup) = std::fs::File::open(&dir) else { return setup_error(out, "open the cgroup") };
    let mut attr = [0u64; 16];
    attr[0] = u64::from(std::os::fd::AsRawFd::as_raw_fd(&cgroup) as u32) | (program as u64) << 32;
    attr[1] = BPF_CGROUP_INET4_BIND;
    if bpf(BPF_PROG_ATTACH, &mut attr) < 0 {
        setup_error(out, "BPF_PROG_ATTACH");
        let _ = std::fs::remove_dir(&dir);
        return;
    }
    let procs = std::ffi::CString::new(format!("{dir}/cgroup.procs")).unwrap_or_default();
    // SAFETY: the child makes raw syscalls only (open, write, socket, bind) and _exits.
    let (child, errno) = unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            // "0" moves the writing process itself.
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(200);
            }
            let sock = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let errno = bind_raw(sock, libc::AF_INET, "127.0.0.1", 41_320);
            // Stays in the cgroup while bindtrace looks at what is in force there.
            let linger = libc::timespec { tv_sec: 1, tv_nsec: 500_000_000 };
            libc::nanosleep(&linger, std::ptr::null_mut());
            libc::_exit(errno);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        (pid, libc::WEXITSTATUS(status))
    };
    let _ = std::fs::remove_dir(&dir);
    let _ = writeln!(
        out,
        "{{\"scenario\":\"tcp4_eperm_cgroup_bpf\",\"pid\":{child},\"match\":{{\"port\":41320,\"addr\":\"127.0.0.1\"}},\
         \"expect\":{{\"errno\":{errno},\"errno_name\":\"EPERM\",\"family\":\"AF_INET\",\"proto\":\"tcp\",\
         \"diagnosis_kind\":\"refused_by_cgroup_bpf\"}}}}"
    );
}

fn setup_error_no_dir(out: &mut dyn std::io::Write) {
    let _ = writeln!(
        out,
        "{{\"scenario\":\"tcp4_eperm_cgroup_bpf\",\"pid\":{},\"setup_error\":\"no cgroup2 hierarchy is mounted\"}}",
        std::process::id()
    );
}

/// `--compat`: the one scenario of a 32-bit build, a bind through the ia32 compat syscalls,
/// which the syscall tracepoints do not see and `__sys_bind` hooks do.
fn compat_scenario() {
    // SAFETY: plain socket calls; the socket is leaked on purpose (it holds the port).
    let (errno, fd) = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        (bind_raw(fd, libc::AF_INET, "127.0.0.1", 41_310), fd)
    };
    println!(
        "{{\"scenario\":\"compat_i386_bind\",\"pid\":{},\"seen_by\":[\"fexit\",\"kprobe\"],\
         \"match\":{{\"port\":41310,\"addr\":\"127.0.0.1\"}},\
         \"expect\":{{\"errno\":{errno},\"fd\":{fd},\"family\":\"AF_INET\",\"proto\":\"tcp\"}}}}",
        std::process::id()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--compat") {
        compat_scenario();
        return;
    }
    match args.get(1).map(String::as_str) {
        Some("--collide") => {
            let binds = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(COLLIDE_BINDS);
            collide(binds);
            return;
        }
        Some("--sleepers") => {
            sleepers(SLEEPER_THREADS, SLEEPER_BINDS);
            return;
        }
        Some("--bind") => {
            // One TCP bind of 127.0.0.1:PORT, its errno as the exit status: the process tree's
            // scenario runs it in children, grandchildren, a daemon and an exec chain.
            let Some(port) = args.get(2).and_then(|p| p.parse::<u16>().ok()) else {
                eprintln!("usage: bind-scenarios --bind PORT");
                std::process::exit(2);
            };
            // SAFETY: a plain socket; bind_raw is given its true family.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            std::process::exit(bind_raw(fd, libc::AF_INET, "127.0.0.1", port));
        }
        Some("--count") => {
            let (Some(plan), Some(events)) = (args.get(2), args.get(3)) else {
                eprintln!("usage: bind-scenarios --count PLAN.json EVENTS.ndjson");
                std::process::exit(2);
            };
            count_collisions(plan, events);
            return;
        }
        _ => {}
    }
    let (v4, v6) = (libc::AF_INET, libc::AF_INET6);
    let (tcp, udp) = (libc::SOCK_STREAM, libc::SOCK_DGRAM);
    let base = 41000;
    let scenario = |name, family, sock_type, addr: &str, port| Scenario {
        name,
        family,
        sock_type,
        addr: addr.to_owned(),
        port,
        options: &[],
        bind_twice: false,
        hold_first: false,
        uid: None,
    };
    let scenarios = vec![
        scenario("tcp4_ok", v4, tcp, "127.0.0.1", base + 1),
        scenario("udp4_ok", v4, udp, "127.0.0.1", base + 2),
        scenario("tcp6_ok", v6, tcp, "::1", base + 3),
        scenario("udp6_ok", v6, udp, "::1", base + 4),
        Scenario { hold_first: true, ..scenario("tcp4_eaddrinuse", v4, tcp, "127.0.0.1", base + 5) },
        Scenario { hold_first: true, ..scenario("udp6_eaddrinuse", v6, udp, "::1", base + 6) },
        Scenario { uid: Some(65534), ..scenario("tcp4_eacces_uid65534", v4, tcp, "127.0.0.1", 80) },
        Scenario { bind_twice: true, ..scenario("tcp4_einval_second_bind", v4, tcp, "127.0.0.1", base + 8) },
        Scenario {
            options: &[(libc::SOL_SOCKET, libc::SO_REUSEADDR), (libc::SOL_SOCKET, libc::SO_REUSEPORT)],
            ..scenario("tcp4_reuseaddr_reuseport", v4, tcp, "127.0.0.1", base + 9)
        },
        Scenario {
            options: &[(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)],
            ..scenario("tcp6_v6only", v6, tcp, "::", base + 10)
        },
        Scenario {
            options: &[
                (libc::IPPROTO_IP, libc::IP_FREEBIND),
                (libc::IPPROTO_IP, libc::IP_TRANSPARENT),
                (libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT),
            ],
            ..scenario("tcp4_freebind_transparent_noport", v4, tcp, "192.0.2.1", base + 11)
        },
    ];
    let mut out = std::io::stdout().lock();
    for s in &scenarios {
        let (errno, pid) = run(s);
        let options: Vec<String> = s.options.iter().map(|(l, o)| format!("\"{l}:{o}\"")).collect();
        let _ = writeln!(
            out,
            "{{\"scenario\":\"{}\",\"pid\":{pid},\"family\":\"{}\",\"proto\":\"{}\",\"addr\":\"{}\",\"port\":{},\"errno\":{errno},\"options\":[{}]}}",
            s.name,
            if s.family == v4 { "AF_INET" } else { "AF_INET6" },
            if s.sock_type == tcp { "tcp" } else { "udp" },
            s.addr,
            s.port,
            options.join(",")
        );
    }
    special_scenarios(&mut out);
    cgroup_denial_scenario(&mut out);
    // The holders are this process's sockets: it stays a moment, so that the diagnoses find
    // them in place rather than released.
    let _ = out.flush();
    std::thread::sleep(std::time::Duration::from_millis(1500));
}

/// Binds each of the two colliding threads makes (the measurement: 20,000 each).
const COLLIDE_BINDS: u32 = 20_000;
/// The probe once kept each thread's entry in slot `tid % 16384`: two threads whose tids
/// differ by this shared one.
const OLD_ENTRY_SLOTS: u32 = 16_384;
/// The UDP ports the two threads bind, again and again (one new socket each time).
const COLLIDE_PORTS: [u16; 2] = [41901, 41902];

fn gettid() -> u32 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Asks the kernel to give the next new task id `tid` (as root: the next pid allocated is
/// ns_last_pid + 1 when that one is free).
fn set_next_tid(tid: u32) -> bool {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (tid - 1).to_string()).is_ok()
}

/// Two task ids `OLD_ENTRY_SLOTS` apart, both free, under pid_max.
fn colliding_tids() -> Option<(u32, u32)> {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").ok()?.trim().parse().ok()?;
    let free = |tid: u32| !std::path::Path::new(&format!("/proc/{tid}")).exists();
    (1_000..pid_max.checked_sub(OLD_ENTRY_SLOTS)?)
        .step_by(7)
        .find(|&a| free(a) && free(a + OLD_ENTRY_SLOTS) && free(a + 1) && free(a + OLD_ENTRY_SLOTS + 1))
        .map(|a| (a, a + OLD_ENTRY_SLOTS))
}

/// `--collide N`: two threads whose tids share what was one entry slot each make N UDP binds
/// at the same time; prints the plan (tids, ports, binds) as one JSON line for `--count`.
/// Every one of the 2N binds must be reported once: no loss, no duplicate.
fn collide(binds: u32) {
    let fail = |why: String| {
        println!("{}", serde_json::json!({ "scenario": "tid_slot_collision", "setup_error": why }));
        std::process::exit(0);
    };
    let Some((tid_a, tid_b)) = colliding_tids() else { fail("no two free tids 16384 apart".into()) };
    let start = std::sync::Arc::new(std::sync::Barrier::new(3));
    let mut threads = Vec::new();
    for (want, port) in [(tid_a, COLLIDE_PORTS[0]), (tid_b, COLLIDE_PORTS[1])] {
        if !set_next_tid(want) {
            fail("cannot write /proc/sys/kernel/ns_last_pid (not root?)".into());
        }
        let start = start.clone();
        threads.push(std::thread::spawn(move || {
            let tid = gettid();
            start.wait();
            if tid != want {
                return (tid, 0);
            }
            let mut failed = 0;
            for _ in 0..binds {
                // SAFETY: plain socket calls on a socket this thread owns.
                unsafe {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                    if bind_raw(fd, libc::AF_INET, "127.0.0.1", port) != 0 {
                        failed += 1;
                    }
                    libc::close(fd);
                }
            }
            (tid, failed)
        }));
    }
    start.wait();
    let results: Vec<(u32, u32)> = threads.into_iter().map(|t| t.join().unwrap_or((0, binds))).collect();
    if results[0].0 != tid_a || results[1].0 != tid_b {
        fail(format!("the threads got tids {} and {}, not {tid_a} and {tid_b}", results[0].0, results[1].0));
    }
    if results.iter().any(|r| r.1 != 0) {
        fail(format!("binds failed: {results:?}"));
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "tid_slot_collision", "pid": std::process::id(), "binds_each": binds,
            "threads": [{ "tid": tid_a, "port": COLLIDE_PORTS[0] }, { "tid": tid_b, "port": COLLIDE_PORTS[1] }],
        })
    );
}

/// `--count PLAN EVENTS`: how many events each colliding thread got in bindtrace's NDJSON,
/// and the run's summary counters, as one JSON line.
fn count_collisions(plan: &str, events: &str) {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let plan: serde_json::Value = serde_json::from_str(read(plan).trim()).unwrap_or_default();
    let mut counts = vec![0u64; plan["threads"].as_array().map_or(0, Vec::len)];
    let mut summary = serde_json::Value::Null;
    for line in read(events).lines() {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if record["type"] == "summary" {
            summary = record;
            continue;
        }
        if record["type"] != "bind" {
            continue;
        }
        for (count, thread) in counts.iter_mut().zip(plan["threads"].as_array().into_iter().flatten()) {
            // Every field the plan gives for the thread (tid, and port or family).
            let fields = thread.as_object().into_iter().flatten();
            if fields.into_iter().all(|(field, wanted)| record[field] == *wanted) {
                *count += 1;
            }
        }
    }
    println!("{}", serde_json::json!({ "plan": plan, "events": counts, "summary": summary }));
}

/// Threads binding AF_UNIX names in one directory at once, and binds each: the directory's
/// lock makes most of them sleep inside bind(), more at once than a kretprobe has return
/// instances (10, or twice the CPUs).
const SLEEPER_THREADS: usize = 64;
const SLEEPER_BINDS: u32 = 100;

/// `--sleepers`: many binds sleeping at once, then one quick bind per thread, one thread at a
/// time (so that a bind of the storm whose return was missed is found and counted); prints
/// the plan for `--count`. Every AF_UNIX bind must be reported, or counted as lost.
fn sleepers(threads: usize, binds: u32) {
    let dir = "/tmp/bt-sleepers";
    let _ = std::fs::remove_dir_all(dir);
    if let Err(err) = std::fs::create_dir_all(dir) {
        println!("{}", serde_json::json!({ "scenario": "sleeping_binds", "setup_error": format!("{dir}: {err}") }));
        return;
    }
    let start = std::sync::Arc::new(std::sync::Barrier::new(threads));
    let turn = std::sync::Arc::new(std::sync::Mutex::new(()));
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (start, turn) = (start.clone(), turn.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..binds {
                    let (addr, len) = sockaddr_un(format!("{dir}/{thread}-{i}").as_bytes());
                    // SAFETY: plain socket calls on a socket this thread owns.
                    unsafe {
                        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                        bind_ptr(fd, (&raw const addr).cast(), len);
                        libc::close(fd);
                    }
                }
                start.wait();
                // One at a time: a quick bind (EBADF, an inet address: not counted with the
                // unix binds) whose entry finds a missed return.
                let _turn = turn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                bind_raw(-1, libc::AF_INET, "127.0.0.1", 1);
                gettid()
            })
        })
        .collect();
    let tids: Vec<u32> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
    let _ = std::fs::remove_dir_all(dir);
    let threads: Vec<_> = tids.iter().map(|tid| serde_json::json!({ "tid": tid, "family": "AF_UNIX" })).collect();
    println!(
        "{}",
        serde_json::json!({
            "scenario": "sleeping_binds", "pid": std::process::id(), "binds_each": binds, "threads": threads,
        })
    );
}
