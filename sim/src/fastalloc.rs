//! A size-class allocator for the simulator binary: per-thread free lists in front of the
//! system allocator.
//!
//! A simulated week allocates and frees billions of small blocks in bursts (every cloud
//! listing clones every instance's record and tags; every queue poll clones every UUID), a
//! pattern that makes glibc's malloc spend a fifth of the run coalescing and consolidating
//! its bins. Here a small block (at most [`MAX_SMALL`] bytes, alignment at most 16) comes
//! from a per-thread free list of its 16-byte size class, refilled from 2 MiB chunks taken
//! from the system allocator; a freed small block goes back on the free list of the thread
//! that frees it. Blocks of 64 bytes or more start on a cache line (and so serve alignments up
//! to 64), so that a record laid out with its hot fields first loads them as one line. Larger
//! or more aligned blocks go straight to the system allocator.
//!
//! The chunks are 2 MiB-aligned and, on Linux, advised as transparent huge pages: the core's
//! maps (B-tree nodes of workers and queue entries, a few KiB each, small enough to come from
//! here) are walked every scheduling pass and probed at random, and with 4 KiB pages most of
//! those visits also miss the TLB. Where the kernel has no huge page to give, the advice
//! changes nothing.
//!
//! Invariants: every block handed out for class `c` is at least `(c + 1) * 16` bytes and
//! 16-byte aligned (64-byte aligned when it is at least 64 bytes), whichever thread carved it,
//! so any thread may reuse it for that class; small blocks are never returned to the system
//! (the simulator's peak footprint is small and reached early). The simulation's results do
//! not depend on the allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// Size-class granularity and the alignment every small block has.
const GRAIN: usize = 16;
/// The largest block served from the free lists (a B-tree node of the pool's workers is
/// about 4 KiB).
pub const MAX_SMALL: usize = 8 * 1024;
const CLASSES: usize = MAX_SMALL / GRAIN;
/// A cache line: blocks of at least this size are carved at this alignment.
const LINE: usize = 64;
/// Bytes taken from the system at a time to carve small blocks from, and their alignment:
/// one huge page.
const CHUNK: usize = 2 * 1024 * 1024;

/// One thread's free lists and the chunk it is carving.
struct Local {
    /// Head of each class's free list; each free block stores the next one in its first word.
    free: [Cell<*mut u8>; CLASSES],
    /// The unused part of the current chunk.
    next: Cell<*mut u8>,
    end: Cell<*mut u8>,
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            free: [const { Cell::new(ptr::null_mut()) }; CLASSES],
            next: Cell::new(ptr::null_mut()),
            end: Cell::new(ptr::null_mut()),
        }
    };
}

/// The allocator (install with `#[global_allocator]`).
pub struct FastAlloc;

/// The class of a small layout, or `None` for one the system allocator serves.
#[inline]
fn class(layout: Layout) -> Option<usize> {
    // A class's blocks are only ever reused for that class, so they serve any alignment up
    // to the class's.
    let c = layout.size().max(1).div_ceil(GRAIN) - 1;
    (layout.size() <= MAX_SMALL && layout.align() <= class_align(c)).then_some(c)
}

#[inline]
fn class_size(c: usize) -> usize {
    (c + 1) * GRAIN
}

/// The alignment every block of class `c` has: a line for blocks of a line or more.
#[inline]
fn class_align(c: usize) -> usize {
    if class_size(c) >= LINE { LINE } else { GRAIN }
}

impl Local {
    /// A block of class `c`, or null when the system is out of memory.
    #[inline]
    unsafe fn alloc(&self, c: usize) -> *mut u8 {
        let head = self.free[c].get();
        if !head.is_null() {
            // SAFETY: a free block holds the next free block's address in its first word.
            let next = unsafe { head.cast::<*mut u8>().read() };
            self.free[c].set(next);
            // Freed blocks are usually cold: start loading the next one's link now, so that
            // the next allocation of this class does not wait for it.
            #[cfg(target_arch = "x86_64")]
            // SAFETY: prefetching has no effect on memory, even for a null address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    next.cast::<i8>(),
                );
            }
            return head;
        }
        let size = class_size(c);
        let mut next = self.next.get();
        if class_align(c) == LINE {
            // A block of a cache line or more starts on a line, so that its first 64 bytes
            // (where `Worker` and `Container` keep what every walk reads, and `Arc` its counts)
            // are one line. At most 48 bytes are skipped, and since the chunk's end is on a
            // line, never past it.
            let addr = next as usize;
            next = next.wrapping_add(addr.next_multiple_of(LINE) - addr);
        }
        if (self.end.get() as usize).wrapping_sub(next as usize) < size || next.is_null() {
            // SAFETY: CHUNK is non-zero and a power of two.
            let chunk = unsafe { System.alloc(Layout::from_size_align_unchecked(CHUNK, CHUNK)) };
            if chunk.is_null() {
                return chunk;
            }
            advise_huge(chunk);
            next = chunk;
            // SAFETY: one past the end of the chunk just allocated.
            self.end.set(unsafe { chunk.add(CHUNK) });
        }
        // SAFETY: `size` bytes remain in the chunk (checked above).
        self.next.set(unsafe { next.add(size) });
        next
    }

    #[inline]
    unsafe fn free(&self, p: *mut u8, c: usize) {
        // SAFETY: the block is at least 16 bytes and 16-aligned, so it can hold a pointer.
        unsafe { p.cast::<*mut u8>().write(self.free[c].get()) };
        self.free[c].set(p);
    }
}

/// Advises the kernel to back `chunk` (CHUNK bytes, CHUNK-aligned) with a huge page. Only
/// advice: the memory is usable whatever the answer.
fn advise_huge(chunk: *mut u8) {
    #[cfg(target_os = "linux")]
    // SAFETY: `chunk` is a live, page-aligned allocation of CHUNK bytes; the advice changes
    // how the kernel backs it, never its contents.
    unsafe {
        libc::madvise(chunk.cast(), CHUNK, libc::MADV_HUGEPAGE);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = chunk;
}

// SAFETY: small blocks are at least as large and as aligned as their layouts require and are
// handed out once until freed; everything else is the system allocator's.
unsafe impl GlobalAlloc for FastAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class(layout) {
            Some(c) => LOCAL
                .try_with(|l| unsafe { l.alloc(c) })
                // Thread-local storage gone (thread teardown): a system block of the full
                // class size, which may later join a free list safely.
                .unwrap_or_else(|_| unsafe {
                    System.alloc(Layout::from_size_align_unchecked(
                        class_size(c),
                        class_align(c),
                    ))
                }),
            None => unsafe { System.alloc(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match class(layout) {
            // Without thread-local storage the block is leaked rather than risked.
            Some(c) => {
                let _ = LOCAL.try_with(|l| unsafe { l.free(p, c) });
            }
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class(layout) {
            Some(_) => {
                let p = unsafe { self.alloc(layout) };
                if !p.is_null() {
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    #[inline]
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` is valid with this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new_layout)) {
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            (Some(a), Some(b)) if a == b => p,
            _ => {
                let q = unsafe { self.alloc(new_layout) };
                if !q.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_distinct_and_reused() {
        let a = FastAlloc;
        unsafe {
            let l = Layout::from_size_align(27, 8).unwrap();
            let p = a.alloc(l);
            let q = a.alloc(l);
            assert!(!p.is_null() && !q.is_null() && p != q);
            assert_eq!(p as usize % GRAIN, 0);
            ptr::write_bytes(p, 0xab, 27);
            ptr::write_bytes(q, 0xcd, 27);
            assert_eq!(*p.add(26), 0xab);
            a.dealloc(p, l);
            let r = a.alloc(Layout::from_size_align(32, 16).unwrap());
            assert_eq!(r, p, "a freed block is reused for its class");
            ptr::write_bytes(r, 0xab, 32);
            let r2 = a.realloc(
                r,
                Layout::from_size_align(32, 16).unwrap(),
                MAX_SMALL + 1000,
            );
            assert!(
                (0..32).all(|i| *r2.add(i) == 0xab),
                "realloc keeps the contents"
            );
            a.dealloc(r2, Layout::from_size_align(MAX_SMALL + 1000, 16).unwrap());
            let z = a.alloc_zeroed(Layout::from_size_align(100, 4).unwrap());
            assert!((0..100).all(|i| *z.add(i) == 0));
            a.dealloc(z, Layout::from_size_align(100, 4).unwrap());
            a.dealloc(q, l);
            let wide = Layout::from_size_align(192, 64).unwrap();
            assert!(
                class(wide).is_some(),
                "a line-aligned layout is a small one"
            );
            let w = a.alloc(wide);
            assert_eq!(w as usize % LINE, 0);
            a.dealloc(w, wide);
            assert_eq!(a.alloc(wide), w, "and reused for its class");
            a.dealloc(w, wide);
        }
    }

    #[test]
    fn many_sizes_round_trip() {
        let a = FastAlloc;
        let mut blocks = Vec::new();
        for size in (1..MAX_SMALL + 3000).step_by(7) {
            let l = Layout::from_size_align(size, 8).unwrap();
            let p = unsafe { a.alloc(l) };
            assert!(!p.is_null());
            if (LINE..=MAX_SMALL).contains(&size) {
                assert_eq!(p as usize % LINE, 0, "a {size}-byte block starts on a line");
            }
            unsafe { ptr::write_bytes(p, (size % 251) as u8, size) };
            blocks.push((p, l));
        }
        for &(p, l) in &blocks {
            let want = (l.size() % 251) as u8;
            assert!((0..l.size()).all(|i| unsafe { *p.add(i) } == want));
        }
        for (p, l) in blocks {
            unsafe { a.dealloc(p, l) };
        }
    }
}
