//! Guest RAM layout: where RAM is, given its size.
//!
//! RAM starts at 0. If it would reach into the 32-bit MMIO gap, the part that
//! does not fit below the gap continues at 4 GiB.

use super::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RamRange {
    /// First address past the range.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The guest RAM ranges for `size` bytes of memory, in address order.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    if size <= MMIO_GAP_START {
        vec![RamRange {
            start: 0,
            len: size,
        }]
    } else {
        vec![
            RamRange {
                start: 0,
                len: MMIO_GAP_START,
            },
            RamRange {
                start: MMIO_GAP_END,
                len: size - MMIO_GAP_START,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(
            ram_ranges(128 << 20),
            vec![RamRange {
                start: 0,
                len: 128 << 20
            }]
        );
    }

    #[test]
    fn memory_past_the_gap_moves_above_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), MMIO_GAP_START);
        assert_eq!(r[1].start, MMIO_GAP_END);
        assert_eq!(r[0].len + r[1].len, 4 << 30);
    }
}
