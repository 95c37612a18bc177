//! The bytes of one file: a size and a sparse map of fixed-size pages.
//!
//! Pages are shared `Arc`s, so that copying a whole file's contents (making
//! it durable, or going back to the durable copy on a power cut) costs one
//! `Arc` clone per allocated page, and a write copies only the pages it
//! touches that are still shared. A page that was never written is a hole
//! and reads as zeros: a 1 GiB file made with `set_len` holds no page.

use std::collections::BTreeMap;
use std::sync::Arc;

/// The size of one page of file contents.
pub const PAGE_SIZE: usize = 4096;

const PAGE: u64 = PAGE_SIZE as u64;

type Page = [u8; PAGE_SIZE];

/// A file's contents: its size and its allocated pages.
///
/// Invariant: every byte at or past `size` in an allocated page is zero, and
/// no page lies wholly past `size`, so that growing the file exposes zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    size: u64,
    pages: BTreeMap<u64, Arc<Page>>,
}

impl Contents {
    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many pages hold data (the rest are holes).
    pub fn allocated_pages(&self) -> usize {
        self.pages.len()
    }

    /// Up to `len` bytes from `offset`, fewer at the end of the file, none
    /// past it. Holes read as zeros.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        for (&index, page) in self.pages.range(first..=last) {
            let page_start = index * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - page_start) as usize..(to - page_start) as usize]);
        }
        out
    }

    /// Writes `data` at `offset`, growing the file if it ends past the end
    /// (an empty write changes nothing). The caller checks that
    /// `offset + data.len()` does not overflow.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE;
            let page_start = index * PAGE;
            let to = end.min(page_start + PAGE);
            let page = self
                .pages
                .entry(index)
                .or_insert_with(|| Arc::new([0u8; PAGE_SIZE]));
            Arc::make_mut(page)[(pos - page_start) as usize..(to - page_start) as usize]
                .copy_from_slice(&data[(pos - offset) as usize..(to - offset) as usize]);
            pos = to;
        }
        self.size = self.size.max(end);
    }

    /// Sets the size: shrinking drops the bytes past `len`, growing adds
    /// zeros (a hole, nothing allocated).
    pub fn set_len(&mut self, len: u64) {
        if len < self.size {
            // Drop every page wholly past the new end, zero the tail of the
            // page the new end falls in.
            let keep = len.div_ceil(PAGE);
            self.pages.split_off(&keep);
            let tail = (len % PAGE) as usize;
            if tail != 0 {
                if let Some(page) = self.pages.get_mut(&(len / PAGE)) {
                    Arc::make_mut(page)[tail..].fill(0);
                }
            }
        }
        self.size = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_read_as_zeros_and_reads_stop_at_the_end() {
        let mut c = Contents::default();
        c.set_len(3 * PAGE + 10);
        assert_eq!(c.allocated_pages(), 0);
        c.write(PAGE + 5, b"hello");
        assert_eq!(c.allocated_pages(), 1);
        let all = c.read(0, usize::MAX);
        assert_eq!(all.len() as u64, 3 * PAGE + 10);
        assert_eq!(&all[PAGE as usize + 5..PAGE as usize + 10], b"hello");
        assert!(all[..PAGE as usize + 5].iter().all(|&b| b == 0));
        assert!(c.read(3 * PAGE + 10, 5).is_empty());
        assert_eq!(c.read(3 * PAGE + 8, 5), vec![0, 0]);
    }

    #[test]
    fn writes_across_pages_read_back() {
        let mut c = Contents::default();
        let data: Vec<u8> = (0..3 * PAGE_SIZE + 7).map(|i| (i % 251) as u8).collect();
        c.write(PAGE - 3, &data);
        assert_eq!(c.size(), PAGE - 3 + data.len() as u64);
        assert_eq!(c.read(PAGE - 3, data.len()), data);
        assert_eq!(c.read(PAGE - 1, 4), data[2..6].to_vec());
    }

    #[test]
    fn shrinking_then_growing_exposes_zeros() {
        let mut c = Contents::default();
        c.write(0, &[7u8; 3 * PAGE_SIZE]);
        c.set_len(PAGE + 1);
        assert_eq!(c.allocated_pages(), 2);
        c.set_len(3 * PAGE);
        let all = c.read(0, usize::MAX);
        assert!(all[..PAGE as usize + 1].iter().all(|&b| b == 7));
        assert!(all[PAGE as usize + 1..].iter().all(|&b| b == 0));
        c.set_len(0);
        assert_eq!(c.allocated_pages(), 0);
    }

    #[test]
    fn a_copy_shares_pages_until_written() {
        let mut c = Contents::default();
        c.write(0, &[1u8; 2 * PAGE_SIZE]);
        let copy = c.clone();
        c.write(10, b"x");
        assert_eq!(copy.read(10, 1), vec![1]);
        assert_eq!(c.read(10, 1), b"x".to_vec());
        // The untouched second page is still the same allocation.
        assert!(Arc::ptr_eq(&c.pages[&1], &copy.pages[&1]));
        assert!(!Arc::ptr_eq(&c.pages[&0], &copy.pages[&0]));
    }
}
