//! Dollars per million tokens on each side, from measured throughput and configured
//! prices: remote by its token price table, local by GPU-hours over measured tokens per
//! hour, the monthly cost of a stated workload on each side, and the break-even volume
//! and utilisation at which the local GPU becomes cheaper.

use serde::Serialize;

use super::{
    stats::PhaseResult,
    target::{GpuCost, HOURS_PER_MONTH, TokenPrice},
};

/// A monthly token volume to cost, e.g. 100 M input + 50 M output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Workload {
    pub input_mtok_per_month: f64,
    pub output_mtok_per_month: f64,
}

impl Workload {
    /// Input tokens per output token, which prices the input a remote bills alongside
    /// each output token.
    pub fn input_per_output(&self) -> f64 {
        if self.output_mtok_per_month > 0.0 {
            self.input_mtok_per_month / self.output_mtok_per_month
        } else {
            0.0
        }
    }
}

/// Cost figures of a target priced per token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemoteCost {
    pub price: TokenPrice,
    /// USD per million tokens over the input/output mix the bench actually measured.
    pub measured_mix_usd_per_mtok: Option<f64>,
    /// USD per million output tokens including the workload's input per output token.
    pub workload_usd_per_output_mtok: f64,
    pub workload_monthly_usd: f64,
}

/// Throughput-based cost at one concurrency level, with the GPU busy all the time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalCostAt {
    pub concurrency: usize,
    pub output_tokens_per_hour: f64,
    /// GPU $/hour ÷ output tokens/hour × 1e6.
    pub usd_per_output_mtok: Option<f64>,
    /// GPU $/hour ÷ (input + output) tokens/hour × 1e6.
    pub usd_per_total_mtok: Option<f64>,
}

/// Cost figures of a target costed by GPU-hours.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalCost {
    pub gpu: GpuCost,
    pub gpu_usd_per_hour: f64,
    pub by_concurrency: Vec<LocalCostAt>,
    /// The best measured output throughput (tokens/s) and the concurrency it was seen at.
    pub best_output_tokens_per_sec: f64,
    pub best_concurrency: usize,
    /// Output tokens one GPU can produce in a month at the best measured throughput.
    pub capacity_output_mtok_per_month: f64,
    /// Share of the month the GPU is busy with the workload (may exceed 1).
    pub workload_utilisation: Option<f64>,
    /// GPUs needed for the workload (whole GPUs, at least 1).
    pub workload_gpus: Option<u64>,
    /// The GPUs' cost for a month, busy or idle.
    pub workload_monthly_usd: Option<f64>,
}

/// Where local and remote cost the same, for one pair of targets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakEven {
    pub local: String,
    pub remote: String,
    /// The GPU's monthly cost ÷ the remote's price per output MTok (workload mix).
    pub output_mtok_per_month: f64,
    pub input_mtok_per_month: f64,
    /// Share of the GPU's capacity that volume takes; above 1 means one GPU at the
    /// measured throughput never pays off.
    pub utilisation: Option<f64>,
    /// The workload's monthly cost: local minus remote (negative when local is cheaper).
    pub workload_monthly_saving_usd: Option<f64>,
}

/// Remote cost from a price table.
pub fn remote_cost(price: TokenPrice, phases: &[&PhaseResult], workload: Workload) -> RemoteCost {
    let (input, output) = phases.iter().fold((0u64, 0u64), |(i, o), p| {
        (i + p.prompt_tokens, o + p.completion_tokens)
    });
    let measured_mix_usd_per_mtok = (input + output > 0).then(|| {
        (input as f64 * price.input_usd_per_mtok + output as f64 * price.output_usd_per_mtok)
            / (input + output) as f64
    });
    RemoteCost {
        price,
        measured_mix_usd_per_mtok,
        workload_usd_per_output_mtok: price.output_usd_per_mtok
            + workload.input_per_output() * price.input_usd_per_mtok,
        workload_monthly_usd: workload.input_mtok_per_month * price.input_usd_per_mtok
            + workload.output_mtok_per_month * price.output_usd_per_mtok,
    }
}

/// Local cost from the GPU's hourly cost and the throughput of each load level.
pub fn local_cost(gpu: GpuCost, load: &[&PhaseResult], workload: Workload) -> LocalCost {
    let usd_per_hour = gpu.usd_per_hour();
    let per_mtok =
        |tokens_per_sec: f64| (tokens_per_sec > 0.0).then(|| usd_per_hour / (tokens_per_sec * 3600.0) * 1e6);
    let by_concurrency = load
        .iter()
        .map(|p| LocalCostAt {
            concurrency: p.concurrency,
            output_tokens_per_hour: p.output_tokens_per_sec * 3600.0,
            usd_per_output_mtok: per_mtok(p.output_tokens_per_sec),
            usd_per_total_mtok: per_mtok(p.total_tokens_per_sec),
        })
        .collect();
    let (best_concurrency, best) = load
        .iter()
        .map(|p| (p.concurrency, p.output_tokens_per_sec))
        .fold(
            (0, 0.0),
            |best, level| if level.1 > best.1 { level } else { best },
        );
    let capacity = best * 3600.0 * HOURS_PER_MONTH / 1e6;
    let utilisation = (capacity > 0.0).then(|| workload.output_mtok_per_month / capacity);
    let gpus = utilisation.map(|u| (u.ceil() as u64).max(1));
    LocalCost {
        gpu,
        gpu_usd_per_hour: usd_per_hour,
        by_concurrency,
        best_output_tokens_per_sec: best,
        best_concurrency,
        capacity_output_mtok_per_month: capacity,
        workload_utilisation: utilisation,
        workload_gpus: gpus,
        workload_monthly_usd: gpus.map(|n| n as f64 * usd_per_hour * HOURS_PER_MONTH),
    }
}

/// Break-even between one local and one remote target.
pub fn break_even(
    local_name: &str,
    local: &LocalCost,
    remote_name: &str,
    remote: &RemoteCost,
    workload: Workload,
) -> BreakEven {
    let gpu_monthly = local.gpu_usd_per_hour * HOURS_PER_MONTH;
    let output = if remote.workload_usd_per_output_mtok > 0.0 {
        gpu_monthly / remote.workload_usd_per_output_mtok
    } else {
        f64::INFINITY
    };
    let capacity = local.capacity_output_mtok_per_month;
    BreakEven {
        local: local_name.to_string(),
        remote: remote_name.to_string(),
        output_mtok_per_month: output,
        input_mtok_per_month: output * workload.input_per_output(),
        utilisation: (capacity > 0.0).then(|| output / capacity),
        workload_monthly_saving_usd: local
            .workload_monthly_usd
            .map(|l| l - remote.workload_monthly_usd),
    }
}

/// Local USD per output MTok when the GPU is busy `utilisation` of the time at the best
/// measured throughput (the curve of the cost chart).
pub fn local_usd_per_mtok_at(local: &LocalCost, utilisation: f64) -> Option<f64> {
    let tokens_per_hour = local.best_output_tokens_per_sec * 3600.0 * utilisation;
    (tokens_per_hour > 0.0).then(|| local.gpu_usd_per_hour / tokens_per_hour * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKLOAD: Workload = Workload {
        input_mtok_per_month: 100.0,
        output_mtok_per_month: 50.0,
    };

    #[test]
    fn remote_workload_is_priced_per_side() {
        let price = TokenPrice {
            input_usd_per_mtok: 0.42,
            output_usd_per_mtok: 1.90,
        };
        let cost = remote_cost(price, &[], WORKLOAD);
        assert!((cost.workload_monthly_usd - (42.0 + 95.0)).abs() < 1e-9);
        assert!((cost.workload_usd_per_output_mtok - (1.90 + 2.0 * 0.42)).abs() < 1e-9);
        assert_eq!(cost.measured_mix_usd_per_mtok, None);
    }

    #[test]
    fn break_even_volume_and_utilisation() {
        let local = LocalCost {
            gpu: GpuCost::Rental { usd_per_hour: 2.74 },
            gpu_usd_per_hour: 2.74,
            by_concurrency: Vec::new(),
            best_output_tokens_per_sec: 1000.0,
            best_concurrency: 8,
            capacity_output_mtok_per_month: 1000.0 * 3600.0 * HOURS_PER_MONTH / 1e6,
            workload_utilisation: None,
            workload_gpus: Some(1),
            workload_monthly_usd: Some(2.74 * HOURS_PER_MONTH),
        };
        let price = TokenPrice {
            input_usd_per_mtok: 0.42,
            output_usd_per_mtok: 1.90,
        };
        let remote = remote_cost(price, &[], WORKLOAD);
        let even = break_even("l", &local, "r", &remote, WORKLOAD);
        let expected = 2.74 * HOURS_PER_MONTH / 2.74;
        assert!((even.output_mtok_per_month - expected).abs() < 1e-9);
        let at = local_usd_per_mtok_at(&local, even.utilisation.expect("capacity"));
        assert!((at.expect("busy") - 2.74).abs() < 1e-9);
    }
}
