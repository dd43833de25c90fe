//! An output buffer that the workers of candle's CPU thread pool fill together, each item
//! writing only its own elements (the kernels' columns, attention's head runs).

use std::{
    marker::PhantomData,
    sync::atomic::{AtomicU32, Ordering},
};

// The cast in `SharedOut::new` needs f32 and AtomicU32 laid out alike.
const _: () = assert!(
    std::mem::size_of::<f32>() == std::mem::size_of::<AtomicU32>()
        && std::mem::align_of::<f32>() == std::mem::align_of::<AtomicU32>()
);

/// A mutable `f32` buffer shared with `candle_core::utils::barrier_pool`'s workers, for as
/// long as the buffer is borrowed (`'a`). Writes are bounds-checked relaxed atomic stores:
/// safe even if two items wrote one element (the last store wins), and as cheap as a
/// plain store on x86-64 and AArch64. Callers give each work item disjoint elements.
#[derive(Debug)]
pub(crate) struct SharedOut<'a> {
    cells: &'a [AtomicU32],
    /// The buffer stays mutably borrowed: nobody reads it while workers write.
    _borrow: PhantomData<&'a mut [f32]>,
}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(out: &'a mut [f32]) -> SharedOut<'a> {
        // SAFETY: `AtomicU32` has the size and alignment of `f32` (asserted above) and
        // every bit pattern is valid for both; `out` is borrowed mutably for `'a`, so these
        // atomics are the only access to the memory until the borrow ends.
        #[allow(unsafe_code)]
        let cells = unsafe { &*(std::ptr::from_mut::<[f32]>(out) as *const [AtomicU32]) };
        SharedOut {
            cells,
            _borrow: PhantomData,
        }
    }

    /// Write `value` at `index`.
    pub(crate) fn write(&self, index: usize, value: f32) {
        self.write_run(index, std::slice::from_ref(&value));
    }

    /// Write `values` at `index..index + values.len()`.
    pub(crate) fn write_run(&self, index: usize, values: &[f32]) {
        let Some(cells) = index
            .checked_add(values.len())
            .and_then(|end| self.cells.get(index..end))
        else {
            panic!(
                "shared output: run {index}+{} of {}",
                values.len(),
                self.cells.len()
            );
        };
        for (cell, value) in cells.iter().zip(values) {
            cell.store(value.to_bits(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_fill_disjoint_runs() {
        let mut out = vec![0f32; 64];
        {
            let shared = SharedOut::new(&mut out);
            std::thread::scope(|scope| {
                for worker in 0..4 {
                    let shared = &shared;
                    scope.spawn(move || {
                        let run: Vec<f32> = (0..16).map(|i| (worker * 16 + i) as f32).collect();
                        shared.write_run(worker * 16, &run);
                    });
                }
            });
        }
        assert!(out.iter().enumerate().all(|(i, v)| *v == i as f32));
    }
}
