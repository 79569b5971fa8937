//! The filters the probe applies in the kernel, and the predicates both sides decide "does
//! this event pass" with.

use crate::{BindEvent, AF_INET, AF_INET6, COMM_LEN};

/// Most port ranges `--port` accepts; the probe walks them in a bounded loop.
pub const MAX_PORT_RANGES: usize = 16;
/// Most cgroups `--container` and `--cgroup` select together.
pub const MAX_CGROUPS: usize = 8;
/// One slot of the `SELECTED_CGROUPS` map: a task passes when its cgroup ancestor at `level`
/// is `id` (id 0: an unused slot); or, with `parent_id` set, when that ancestor is a cgroup
/// made after `id` (ids only grow) in the same parent: a restarted container or unit, whose
/// new cgroup its first binds run in before the tracer can learn its id. The tracer checks
/// those by path, and moves `id` to the new cgroup once it sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CgroupSlot {
    pub id: u64,
    pub parent_id: u64,
    pub level: u32,
    pub _pad: u32,
}

/// Errnos 1..=254 have their own bit in [`FilterConfig::results`]; larger ones share bit 255.
pub const ERRNO_BITS: usize = 256;
/// Bits of [`FilterConfig::flags`]: which filters are active.
pub mod filter_flags {
    pub const PIDS: u32 = 1 << 0;
    pub const PORTS: u32 = 1 << 1;
    pub const RESULTS: u32 = 1 << 2;
    pub const FAMILY: u32 = 1 << 3;
    pub const PROTOCOL: u32 = 1 << 4;
    pub const COMM: u32 = 1 << 5;
    pub const CGROUPS: u32 = 1 << 6;
    /// Only the followed process tree (the `FOLLOWED` map).
    pub const TREE: u32 = 1 << 7;
}

/// Filters applied in the kernel, so that a rejected event costs no ring-buffer space.
/// The pid set lives in the `FILTER_PIDS` hash map; everything else is here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FilterConfig {
    /// Accepted results: bit 0 is success, bit N is errno N (N >= 255 all map to bit 255).
    pub results: [u64; ERRNO_BITS / 64],
    /// cgroup v2 ids (`--container`, `--cgroup`): a task passes when its ancestor at
    /// `cgroup_levels[i]` (its own cgroup or above) is `cgroup_ids[i]`, so that descendants
    /// match. The first `cgroup_count` are used. These are the ids at start: the probe reads
    /// the current ones from the `SELECTED_CGROUPS` map, which the tracer fills from these and
    /// updates when a followed container or unit restarts in a new cgroup.
    pub cgroup_ids: [u64; MAX_CGROUPS],
    pub cgroup_levels: [u32; MAX_CGROUPS],
    /// Inclusive port ranges; the first `port_range_count` are used.
    pub port_ranges: [[u16; 2]; MAX_PORT_RANGES],
    /// Exact `comm` to match, NUL-padded.
    pub comm: [u8; COMM_LEN],
    pub port_range_count: u32,
    /// [`filter_flags`] bits.
    pub flags: u32,
    pub family: u16,
    pub protocol: u16,
    /// bindtrace's own process (its lookups bind netlink sockets), never reported; 0: none.
    pub exclude_tgid: u32,
    pub cgroup_count: u32,
    pub _reserved: u32,
}

impl FilterConfig {
    pub const fn accept_all() -> Self {
        Self {
            results: [0; ERRNO_BITS / 64],
            cgroup_ids: [0; MAX_CGROUPS],
            cgroup_levels: [0; MAX_CGROUPS],
            port_ranges: [[0; 2]; MAX_PORT_RANGES],
            comm: [0; COMM_LEN],
            port_range_count: 0,
            flags: 0,
            family: 0,
            protocol: 0,
            exclude_tgid: 0,
            cgroup_count: 0,
            _reserved: 0,
        }
    }

    /// Is this process excluded (bindtrace itself)?
    #[inline(always)]
    pub const fn excludes_tgid(&self, tgid: u32) -> bool {
        self.exclude_tgid != 0 && self.exclude_tgid == tgid
    }

    #[inline(always)]
    pub const fn is_active(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// The bit of [`Self::results`] a bind return value maps to.
    #[inline(always)]
    pub const fn result_bit(ret: i32) -> usize {
        if ret >= 0 {
            0
        } else {
            let errno = ret.unsigned_abs() as usize;
            if errno >= ERRNO_BITS - 1 {
                ERRNO_BITS - 1
            } else {
                errno
            }
        }
    }

    pub fn accept_result_bit(&mut self, bit: usize) {
        let bit = if bit >= ERRNO_BITS { ERRNO_BITS - 1 } else { bit };
        self.results[bit / 64] |= 1u64 << (bit % 64);
        self.flags |= filter_flags::RESULTS;
    }

    /// Does the return value pass the result filter (`--errno`, `--failed`)?
    #[inline(always)]
    pub fn accepts_result(&self, ret: i32) -> bool {
        if !self.is_active(filter_flags::RESULTS) {
            return true;
        }
        let bit = Self::result_bit(ret);
        // `bit` is at most 255, so the index is at most 3; the mask keeps the verifier sure.
        let word = self.results[(bit / 64) & 3];
        word & (1u64 << (bit % 64)) != 0
    }

    /// Does the requested port pass `--port`? Walks a bounded number of ranges.
    #[inline(always)]
    pub fn accepts_port(&self, port: u16) -> bool {
        if !self.is_active(filter_flags::PORTS) {
            return true;
        }
        let mut i = 0;
        while i < MAX_PORT_RANGES {
            if (i as u32) >= self.port_range_count {
                break;
            }
            let [lo, hi] = self.port_ranges[i];
            if port >= lo && port <= hi {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Does the requested address pass `--port`? Only inet families have ports: an AF_UNIX
    /// bind (whose path would read as a "port") never matches a port filter.
    #[inline(always)]
    pub fn accepts_address(&self, family: u16, port: u16) -> bool {
        if !self.is_active(filter_flags::PORTS) {
            return true;
        }
        (family == AF_INET || family == AF_INET6) && self.accepts_port(port)
    }

    #[inline(always)]
    pub fn accepts_family(&self, family: u16) -> bool {
        !self.is_active(filter_flags::FAMILY) || self.family == family
    }

    #[inline(always)]
    pub fn accepts_protocol(&self, protocol: u16) -> bool {
        !self.is_active(filter_flags::PROTOCOL) || self.protocol == protocol
    }

    #[inline(always)]
    pub fn accepts_comm(&self, comm: &[u8; COMM_LEN]) -> bool {
        if !self.is_active(filter_flags::COMM) {
            return true;
        }
        let mut i = 0;
        while i < COMM_LEN {
            if comm[i] != self.comm[i] {
                return false;
            }
            if comm[i] == 0 {
                return true;
            }
            i += 1;
        }
        true
    }

    /// Every predicate on an event except the pid set (which the caller checks against its
    /// own pid list): the userspace mirror of what the probe decides in the kernel.
    pub fn accepts_event(&self, event: &BindEvent) -> bool {
        !self.excludes_tgid(event.tgid)
            && self.accepts_result(event.ret)
            && self.accepts_address(event.family, event.port)
            && self.accepts_family(event.family)
            && self.accepts_protocol(event.protocol)
            && self.accepts_comm(&event.comm)
    }
}
