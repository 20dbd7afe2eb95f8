//! Guest page frame numbers → global page numbers of a migration layout.

use std::ops::Range;

use thiserror::Error;
use transport::{Layout, PAGE_SIZE};

/// A layout the hints cannot be mapped onto.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MapError {
    /// The layout's page size (held, in bytes) is not 4096, the size of the agent's frames.
    #[error("the layout has {0}-byte pages; hints need {PAGE_SIZE}-byte pages")]
    PageSize(u32),
    /// A region's guest-physical start or length is not a multiple of 4096 bytes.
    #[error("region at {guest_addr:#x} ({len} bytes) is not page aligned")]
    Unaligned {
        /// The region's guest-physical start address.
        guest_addr: u64,
        /// The region's length in bytes.
        len: u64,
    },
    /// Two regions share guest-physical frames, so a frame would have two pages. Holds the
    /// two regions' guest-physical start addresses, lower first.
    #[error("regions at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
}

#[derive(Clone, Copy, Debug)]
struct Region {
    first_pfn: u64,
    pages: u64,
    first_page: u64,
}

/// Where each guest frame lives in the layout's page numbering (see the
/// [module docs](super)): regions sorted by guest-physical address for lookup, each with
/// its first global page.
#[derive(Clone, Debug)]
pub struct GuestMap {
    regions: Vec<Region>,
    pages: u64,
}

const PAGE: u64 = PAGE_SIZE as u64;

impl GuestMap {
    /// The map of `layout`'s regions. Refused if its pages are not 4096 bytes, a region is
    /// not page aligned, or two regions overlap in guest-physical memory.
    pub fn new(layout: &Layout) -> Result<GuestMap, MapError> {
        if layout.page_size as u64 != PAGE {
            return Err(MapError::PageSize(layout.page_size));
        }
        let mut next = 0u64;
        let mut regions = Vec::with_capacity(layout.regions.len());
        for r in &layout.regions {
            if r.guest_addr % PAGE != 0 || r.len % PAGE != 0 {
                return Err(MapError::Unaligned {
                    guest_addr: r.guest_addr,
                    len: r.len,
                });
            }
            regions.push(Region {
                first_pfn: r.guest_addr / PAGE,
                pages: r.len / PAGE,
                first_page: next,
            });
            next += r.len / PAGE;
        }
        regions.sort_by_key(|r| r.first_pfn);
        for w in regions.windows(2) {
            if w[0].first_pfn + w[0].pages > w[1].first_pfn {
                return Err(MapError::Overlap(
                    w[0].first_pfn * PAGE,
                    w[1].first_pfn * PAGE,
                ));
            }
        }
        Ok(GuestMap {
            regions,
            pages: next,
        })
    }

    /// Pages in the layout.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The global page ranges of frames `first..first + count`, in frame order (one range
    /// per region crossed), or the first frame that is not guest memory. Overflowing input
    /// is refused, not wrapped.
    pub fn pages_of(&self, first: u64, count: u64) -> Result<Vec<Range<u64>>, u64> {
        let end = first.checked_add(count).ok_or(first)?;
        let mut out = Vec::new();
        let mut pfn = first;
        while pfn < end {
            // The last region starting at or before `pfn`.
            let i = self.regions.partition_point(|r| r.first_pfn <= pfn);
            let Some(r) = i.checked_sub(1).map(|i| self.regions[i]) else {
                return Err(pfn);
            };
            let r_end = r.first_pfn + r.pages;
            if pfn >= r_end {
                return Err(pfn);
            }
            let upto = end.min(r_end);
            let page = r.first_page + (pfn - r.first_pfn);
            out.push(page..page + (upto - pfn));
            pfn = upto;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::RegionDesc;

    fn one(r: Range<u64>) -> Vec<Range<u64>> {
        vec![r]
    }

    #[test]
    fn one_region_at_zero_maps_frames_to_the_same_page() {
        let m = GuestMap::new(&Layout::single(64 * PAGE)).unwrap();
        assert_eq!(m.pages(), 64);
        assert_eq!(m.pages_of(3, 5), Ok(one(3..8)));
        assert_eq!(m.pages_of(60, 4), Ok(one(60..64)));
        assert_eq!(m.pages_of(60, 5), Err(64));
        assert_eq!(m.pages_of(1 << 40, 1), Err(1 << 40));
        assert_eq!(m.pages_of(u64::MAX - 1, 5), Err(u64::MAX - 1));
    }

    #[test]
    fn regions_with_a_hole_map_in_layout_order() {
        // Layout order: high region first, so it holds pages 0..4.
        let layout = Layout {
            page_size: 4096,
            regions: vec![
                RegionDesc {
                    guest_addr: 100 * PAGE,
                    len: 4 * PAGE,
                },
                RegionDesc {
                    guest_addr: 0,
                    len: 8 * PAGE,
                },
            ],
            disks: Vec::new(),
        };
        let m = GuestMap::new(&layout).unwrap();
        assert_eq!(m.pages(), 12);
        assert_eq!(m.pages_of(0, 8), Ok(one(4..12)));
        assert_eq!(m.pages_of(101, 3), Ok(one(1..4)));
        assert_eq!(m.pages_of(7, 2), Err(8), "frame 8 is in the hole");
        assert_eq!(m.pages_of(99, 2), Err(99));
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut l = Layout::single(8 * PAGE);
        l.page_size = 2 << 20;
        assert_eq!(GuestMap::new(&l).unwrap_err(), MapError::PageSize(2 << 20));
        let l = Layout {
            page_size: 4096,
            regions: vec![
                RegionDesc {
                    guest_addr: 0,
                    len: 8 * PAGE,
                },
                RegionDesc {
                    guest_addr: 4 * PAGE,
                    len: 8 * PAGE,
                },
            ],
            disks: Vec::new(),
        };
        assert!(matches!(GuestMap::new(&l), Err(MapError::Overlap(..))));
    }
}
