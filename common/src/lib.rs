//! The one header both sides of bindtrace share: the record the probe writes into the ring
//! buffer, the configuration the tracer writes into the probe before load, and the filter
//! predicates, so the kernel and userspace decide "does this event pass" with the same code.
//!
//! Everything here is `#[repr(C)]`, fixed-size and free of pointers: it crosses the
//! kernel/user boundary as raw bytes.
#![no_std]

/// Length of `task_struct.comm`, including the NUL.
pub const COMM_LEN: usize = 16;

mod config;
mod event;
mod filter;
mod layout;
pub mod names;
pub mod sockaddr;
pub mod stat;

pub use config::*;
pub use event::*;
pub use filter::*;
pub use layout::*;

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn result_filter_maps_success_errnos_and_overflow() {
        let mut filter = FilterConfig::accept_all();
        assert!(filter.accepts_result(-98), "inactive filter accepts all");
        filter.accept_result_bit(98);
        assert!(filter.accepts_result(-98));
        assert!(!filter.accepts_result(0));
        assert!(!filter.accepts_result(-13));
        filter.accept_result_bit(0);
        assert!(filter.accepts_result(0));
        assert_eq!(FilterConfig::result_bit(-4000), 255);
        assert_eq!(FilterConfig::result_bit(-255), 255);
        assert_eq!(FilterConfig::result_bit(-254), 254);
    }

    #[test]
    fn port_ranges_are_inclusive_and_bounded_by_count() {
        let mut filter = FilterConfig::accept_all();
        filter.flags |= filter_flags::PORTS;
        filter.port_ranges[0] = [8080, 8080];
        filter.port_ranges[1] = [9000, 9010];
        filter.port_ranges[2] = [1, 65535];
        filter.port_range_count = 2;
        assert!(filter.accepts_port(8080));
        assert!(filter.accepts_port(9000));
        assert!(filter.accepts_port(9010));
        assert!(!filter.accepts_port(9011));
        assert!(!filter.accepts_port(80), "range 3 is beyond the count");
    }

    #[test]
    fn comm_filter_matches_exactly() {
        let mut filter = FilterConfig::accept_all();
        filter.flags |= filter_flags::COMM;
        filter.comm[..5].copy_from_slice(b"nginx");
        let mut comm = [0u8; COMM_LEN];
        comm[..5].copy_from_slice(b"nginx");
        assert!(filter.accepts_comm(&comm));
        comm[5] = b'x';
        assert!(!filter.accepts_comm(&comm));
    }

    #[test]
    fn field_loc_extracts_bitfields() {
        let reuseport = FieldLoc { offset: 0, bit_shift: 4, bit_width: 1, _reserved: [0; 2] };
        assert_eq!(reuseport.extract(0b1_0000), 1);
        assert_eq!(reuseport.extract(0b0_1111), 0);
        let word = FieldLoc { offset: 0, bit_shift: 0, bit_width: 32, _reserved: [0; 2] };
        assert_eq!(word.extract(u32::MAX), u32::MAX);
    }
}
