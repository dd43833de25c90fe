//! An output buffer that the workers of candle's CPU thread pool fill together, each item
//! writing only its own elements (the kernels' columns, attention's head runs).

/// A mutable `f32` buffer shared with `candle_core::utils::barrier_pool`'s workers. Writes
/// are bounds-checked; the caller gives each work item disjoint elements.
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: see `write_run`: workers write disjoint elements, and the buffer (borrowed mutably
// for the wrapper's lifetime) outlives the pool's `execute_chunked`, which returns only when
// every worker is done.
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(out: &mut [f32]) -> SharedOut {
        SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// Write `value` at `index`.
    pub(crate) fn write(&self, index: usize, value: f32) {
        self.write_run(index, std::slice::from_ref(&value));
    }

    /// Write `values` at `index..index + values.len()`.
    #[allow(unsafe_code)]
    pub(crate) fn write_run(&self, index: usize, values: &[f32]) {
        assert!(
            index + values.len() <= self.len,
            "shared output: run {index}+{} of {}",
            values.len(),
            self.len
        );
        // SAFETY: in bounds (checked above) of the buffer `new` borrowed mutably; each work
        // item owns the elements it writes, so no two workers touch one element.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(index), values.len()) }
    }
}
