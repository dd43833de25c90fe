//! The KV cache of one sequence in one block: `[1, kv_heads, capacity, head_dim]` buffers
//! that double when full (instead of concatenating every step), written by whole prompt
//! chunks through tensor ops or one decode position in place (`decode_attention`).

use candle_core::Tensor;

use super::decode_attention;

/// Keys and values of one block, in a buffer that doubles when full.
#[derive(Debug, Default)]
pub(super) struct KvCache {
    pub(super) k: Option<Tensor>,
    pub(super) v: Option<Tensor>,
    pub(super) len: usize,
}

impl KvCache {
    /// Positions the buffers hold.
    pub(super) fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Room for `needed` positions in `[1, kv_heads, capacity, head_dim]` buffers.
    pub(super) fn reserve(
        &mut self,
        needed: usize,
        max: usize,
        like: &Tensor,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<()> {
        if needed > max {
            candle_core::bail!("the sequence needs {needed} positions, the model has {max}");
        }
        if needed > self.capacity() {
            let new_capacity = needed.next_power_of_two().clamp(64, max.max(needed));
            let grow = |old: &Option<Tensor>| -> candle_core::Result<Tensor> {
                let buffer =
                    Tensor::zeros((1, kv_heads, new_capacity, head_dim), like.dtype(), like.device())?;
                if let Some(old) = old
                    && self.len > 0
                {
                    buffer.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        Ok(())
    }

    /// Append `[1, kv_heads, t, head_dim]` keys and values; returns all of them so far.
    pub(super) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        max: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, kv_heads, added, head_dim) = k.dims4()?;
        let needed = self.len + added;
        self.reserve(needed, max, k, kv_heads, head_dim)?;
        let (Some(k_all), Some(v_all)) = (&self.k, &self.v) else {
            candle_core::bail!("KV cache buffers missing");
        };
        k_all.slice_set(&k.contiguous()?, 2, self.len)?;
        v_all.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((k_all.narrow(2, 0, needed)?, v_all.narrow(2, 0, needed)?))
    }

    /// Append one position's keys and values (`kv_heads × head_dim` each, CPU f32) in place.
    pub(super) fn append_position(
        &mut self,
        k: &[f32],
        v: &[f32],
        max: usize,
        like: &Tensor,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<()> {
        self.reserve(self.len + 1, max, like, kv_heads, head_dim)?;
        let capacity = self.capacity();
        let (Some(k_all), Some(v_all)) = (&self.k, &self.v) else {
            candle_core::bail!("KV cache buffers missing");
        };
        decode_attention::write_position(k_all, k, self.len, capacity, head_dim)?;
        decode_attention::write_position(v_all, v, self.len, capacity, head_dim)?;
        self.len += 1;
        Ok(())
    }

    pub(super) fn clear(&mut self) {
        self.len = 0;
    }

    /// Forget the keys and give the buffers' memory back.
    pub(super) fn release(&mut self) {
        *self = KvCache::default();
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn kv_cache_grows_and_keeps_what_it_had() {
        let mut cache = KvCache::default();
        let device = Device::Cpu;
        let step = |n: usize, start: f32| {
            let values: Vec<f32> = (0..n * 2).map(|i| start + i as f32).collect();
            Tensor::from_vec(values, (1, 1, n, 2), &device).expect("tensor")
        };
        let (k, _) = cache.append(&step(3, 0.0), &step(3, 0.0), 1000).expect("append");
        assert_eq!(k.dims(), &[1, 1, 3, 2]);
        for i in 0..70 {
            cache
                .append(&step(1, 100.0 + i as f32), &step(1, 0.0), 1000)
                .expect("append");
        }
        let (k, _) = cache
            .append(&step(1, 500.0), &step(1, 0.0), 1000)
            .expect("append");
        assert_eq!(k.dims(), &[1, 1, 74, 2]);
        let first: Vec<f32> = k
            .narrow(2, 0, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values");
        assert_eq!(first, [0.0, 1.0], "the prompt's keys survive growing");
        let err = cache
            .append(&step(1000, 0.0), &step(1000, 0.0), 1000)
            .expect_err("over the context");
        assert!(err.to_string().contains("the model has 1000"), "{err}");
        cache.clear();
        let (k, _) = cache.append(&step(2, 0.0), &step(2, 0.0), 1000).expect("append");
        assert_eq!(k.dim(2).expect("dim"), 2);
    }
}
