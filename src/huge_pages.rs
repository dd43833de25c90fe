//! The binary's allocator: the system allocator, with large blocks (model weights, packed
//! kernels, KV caches) placed on transparent huge pages.
//!
//! Loading a model faults in gigabytes of fresh memory. With 4 KiB pages that is half a
//! million page faults, which took most of a small model's start-up (figures in
//! `docs/benchmarks.md`). Linux only hands out huge pages to regions that ask
//! (`transparent_hugepage=madvise` is the common default), so blocks of [`HUGE_BLOCK`] or
//! more are aligned to 2 MiB and advised.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations at least this large go on huge pages.
pub const HUGE_BLOCK: usize = 4 << 20;

/// The size of an x86-64 / aarch64 transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// `#[global_allocator]` of the `lifeboat` binary.
#[derive(Debug, Clone, Copy, Default)]
pub struct HugePageAlloc;

/// The layout a block of `layout.size()` bytes really has: large ones are aligned to a
/// huge page.
fn effective(layout: Layout) -> Layout {
    if layout.size() >= HUGE_BLOCK {
        layout.align_to(HUGE_PAGE).unwrap_or(layout)
    } else {
        layout
    }
}

#[cfg(target_os = "linux")]
fn advise(ptr: *mut u8, layout: Layout) {
    if !ptr.is_null() && layout.size() >= HUGE_BLOCK {
        // SAFETY: `ptr` starts a live allocation of `layout.size()` bytes; MADV_HUGEPAGE
        // only changes how the kernel backs those pages, never their contents. A refusal
        // (old kernel, THP off) leaves ordinary pages, which is fine.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(ptr.cast(), layout.size(), libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_ptr: *mut u8, _layout: Layout) {}

/// At most two malloc arenas (glibc): with one per thread (the runtime's, the engine's,
/// candle's pool), memory a thread frees stays in its arena, unusable by the others, and
/// the peak RSS grows with it; two arenas cost no speed, one slowed prompts a little
/// (figures in `docs/benchmarks.md`). Call before threads start.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes an allocator setting; glibc takes its own lock.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

/// Hand the memory malloc holds free back to the system (glibc `malloc_trim(0)`: the free
/// tops of the heaps and the free pages inside them). Freed memory otherwise stays with
/// the process: most of what tokenizing a large prompt took stayed resident
/// (`docs/benchmarks.md`).
/// Costs a walk over the arenas (milliseconds), so it is called after large prompts only.
/// This allocator is `System` underneath, so glibc owns every block it could return.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` only returns free memory; glibc takes each arena's lock.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::malloc_trim(0) };
    }
}

// SAFETY: every block is allocated and freed by `System` with the same effective layout
// (a pure function of the caller's layout), so `System`'s contract carries over.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let layout = effective(layout);
        // SAFETY: forwarded with a valid, non-zero-size layout (the caller's contract).
        let ptr = unsafe { System.alloc(layout) };
        advise(ptr, layout);
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let layout = effective(layout);
        // SAFETY: as in `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        advise(ptr, layout);
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` here with this effective layout.
        unsafe { System.dealloc(ptr, effective(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < HUGE_BLOCK && new_size < HUGE_BLOCK {
            // SAFETY: small blocks use the caller's layout unchanged on both sides.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a fresh block, then a copy of the bytes both blocks hold, then the old
        // block freed with the layout it was allocated with.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_huge_page_aligned_and_round_trip() {
        let small = Layout::from_size_align(1000, 8).expect("layout");
        assert_eq!(effective(small), small);
        let large = Layout::from_size_align(HUGE_BLOCK + 1, 8).expect("layout");
        assert_eq!(effective(large).align(), HUGE_PAGE);
        assert_eq!(effective(large).size(), large.size());
        #[allow(unsafe_code)]
        // SAFETY: allocations are used within their sizes and freed with their layouts.
        unsafe {
            let alloc = HugePageAlloc;
            let ptr = alloc.alloc(large);
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % HUGE_PAGE, 0);
            ptr.write_bytes(7, large.size());
            let grown = alloc.realloc(ptr, large, 2 * HUGE_BLOCK);
            assert!(!grown.is_null());
            assert_eq!(*grown.add(large.size() - 1), 7);
            let shrunk = alloc.realloc(
                grown,
                Layout::from_size_align(2 * HUGE_BLOCK, 8).expect("layout"),
                100,
            );
            assert_eq!(*shrunk.add(99), 7);
            alloc.dealloc(shrunk, Layout::from_size_align(100, 8).expect("layout"));
        }
    }
}
