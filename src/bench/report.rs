//! Writing a bench's results: `bench.json` (every figure and the raw histograms),
//! `report.md` (the tables) and the SVG charts, into one directory.

use std::{fmt::Write as _, path::Path, path::PathBuf};

use super::{
    BenchError, BenchReport, TargetReport, charts,
    client::FailureKind,
    stats::{Percentiles, PhaseResult},
};

/// Write every output file into `dir` (created if needed); returns the paths written.
pub fn write_all(report: &BenchReport, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let write_error = |path: &Path, message: String| BenchError::Write {
        path: path.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| write_error(dir, e.to_string()))?;
    let mut written = Vec::new();
    let json_path = dir.join("bench.json");
    let json = serde_json::to_string_pretty(report).map_err(|e| write_error(&json_path, e.to_string()))?;
    std::fs::write(&json_path, json).map_err(|e| write_error(&json_path, e.to_string()))?;
    written.push(json_path);
    for (name, draw) in [
        (
            "latency.svg",
            charts::latency_chart as fn(&BenchReport, &Path) -> Result<(), String>,
        ),
        ("throughput.svg", charts::throughput_chart),
        ("cost.svg", charts::cost_chart),
    ] {
        let path = dir.join(name);
        draw(report, &path).map_err(|e| write_error(&path, e))?;
        written.push(path);
    }
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, markdown(report)).map_err(|e| write_error(&md_path, e.to_string()))?;
    written.push(md_path);
    Ok(written)
}

fn ms(value: f64) -> String {
    format!("{value:.1}")
}

fn usd(value: f64) -> String {
    if value.is_finite() {
        format!("${value:.2}")
    } else {
        "never".into()
    }
}

fn optional(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "–".into(), format)
}

fn percent(value: f64) -> String {
    format!("{:.1} %", value * 100.0)
}

/// The Markdown report: run facts, then one table per question.
pub fn markdown(report: &BenchReport) -> String {
    let mut md = String::new();
    // `write!` into a String cannot fail.
    let _ = writeln!(md, "# lifeboat bench\n");
    if !report.complete {
        let _ = writeln!(
            md,
            "> **Partial report**: the run was interrupted; figures cover what had finished.\n"
        );
    }
    write_run(&mut md, report);
    write_stability(&mut md, report);
    write_streaming(&mut md, report);
    write_load(&mut md, report);
    write_cost(&mut md, report);
    let _ = writeln!(md, "## Charts\n");
    let _ = writeln!(md, "- Latency percentiles per target: ![latency](latency.svg)");
    let _ = writeln!(md, "- Throughput vs concurrency: ![throughput](throughput.svg)");
    let _ = writeln!(
        md,
        "- $/MTok vs utilisation with the break-even point: ![cost](cost.svg)"
    );
    md
}

fn write_run(md: &mut String, report: &BenchReport) {
    let m = &report.machine;
    let s = &report.settings;
    let _ = writeln!(md, "## Run\n");
    let _ = writeln!(
        md,
        "- Started {}, finished {}",
        report.started_at, report.finished_at
    );
    let _ = writeln!(md, "- Command: `{}`", report.command_line.join(" "));
    let _ = writeln!(md, "- lifeboat {}", m.lifeboat_version);
    let memory = m
        .memory_gib
        .map_or_else(|| "unknown".into(), |g| format!("{g:.1} GiB"));
    let _ = writeln!(
        md,
        "- Machine: {} ({} cores), {memory} memory, {}",
        m.cpu, m.cores, m.os
    );
    let gpus = if m.gpus.is_empty() {
        "none".to_string()
    } else {
        m.gpus.join("; ")
    };
    let _ = writeln!(md, "- GPU: {gpus}");
    let _ = writeln!(
        md,
        "- Prompts: {} ({} prompts, in order), default max_tokens {}, temperature 0, streamed with usage",
        s.prompt_source, s.prompts, s.max_tokens
    );
    let _ = writeln!(
        md,
        "- Defaults (a target may override them, see below): stability {} sequential requests after {} warm-up; load: concurrency {:?}, at most {} requests or {:.0} s per level; request timeout {:.0} s",
        s.stability_requests,
        s.warmup,
        s.concurrency,
        s.load_requests,
        s.load_duration_seconds,
        s.timeout_seconds
    );
    let _ = writeln!(
        md,
        "- Workload costed: {} M input + {} M output tokens per month\n",
        s.workload.input_mtok_per_month, s.workload.output_mtok_per_month
    );
    let _ = writeln!(
        md,
        "| target | kind | URL | model | requests | concurrency | load requests/level | max_tokens | model file | size | sha256 |"
    );
    let _ = writeln!(md, "|---|---|---|---|---:|---|---:|---:|---|---|---|");
    for t in &report.targets {
        let (file, size, sha) =
            t.model_file
                .as_ref()
                .map_or(("–".into(), "–".into(), "–".into()), |f| {
                    (
                        f.path.clone(),
                        format!("{:.1} MiB", f.bytes as f64 / 1048576.0),
                        f.sha256.clone(),
                    )
                });
        let levels: Vec<String> = t.settings.concurrency.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            md,
            "| {} | {:?} | {} | {} | {} | {} | {} | {} | {file} | {size} | {sha} |",
            t.name,
            t.kind,
            if t.in_process {
                format!("{} (served in-process)", t.url)
            } else {
                t.url.clone()
            },
            t.model,
            t.settings.stability_requests,
            levels.join(", "),
            t.settings.load_requests,
            t.settings.max_tokens
        );
    }
    md.push('\n');
}

fn write_stability(md: &mut String, report: &BenchReport) {
    let _ = writeln!(
        md,
        "## Stability (sequential requests, end-to-end latency in ms)\n"
    );
    let _ = writeln!(
        md,
        "| target | requests | success rate | mean | median | min | max | stdev |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for t in &report.targets {
        let Some(p) = &t.stability else { continue };
        let l = &p.latency_ms;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            t.name,
            p.requests,
            percent(p.success_rate),
            ms(l.mean),
            ms(l.median),
            ms(l.min),
            ms(l.max),
            ms(l.stdev)
        );
    }
    md.push('\n');
}

fn percentile_row(md: &mut String, target: &str, metric: &str, p: &Percentiles) {
    let _ = writeln!(
        md,
        "| {target} | {metric} | {} | {} | {} | {} | {} | {} |",
        p.count,
        ms(p.p50_ms),
        ms(p.p90_ms),
        ms(p.p95_ms),
        ms(p.p99_ms),
        ms(p.max_ms)
    );
}

fn write_streaming(md: &mut String, report: &BenchReport) {
    let _ = writeln!(md, "## Streaming (stability run, ms)\n");
    let _ = writeln!(md, "| target | metric | samples | p50 | p90 | p95 | p99 | max |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    for t in &report.targets {
        let Some(p) = &t.stability else { continue };
        percentile_row(md, &t.name, "TTFT", &p.ttft);
        percentile_row(md, &t.name, "inter-token", &p.inter_token);
        percentile_row(md, &t.name, "end-to-end", &p.end_to_end);
    }
    let _ = writeln!(
        md,
        "\n| target | output tokens per request (mean) | tokens/s per stream: mean | median | min | max |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for t in &report.targets {
        let Some(p) = &t.stability else { continue };
        let per_request = if p.successes > 0 {
            p.completion_tokens as f64 / p.successes as f64
        } else {
            0.0
        };
        let r = &p.stream_tokens_per_sec;
        let _ = writeln!(
            md,
            "| {} | {per_request:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            t.name, r.mean, r.median, r.min, r.max
        );
    }
    md.push('\n');
}

fn write_load(md: &mut String, report: &BenchReport) {
    let _ = writeln!(md, "## Load (concurrency sweep)\n");
    let kinds: Vec<&str> = FailureKind::ALL.iter().map(|k| k.label()).collect();
    let _ = writeln!(
        md,
        "| target | concurrency | requests | success rate | req/s | output tok/s | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | e2e p95 ms | {} |",
        kinds.join(" | ")
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|{}",
        "---:|".repeat(kinds.len())
    );
    for t in &report.targets {
        for p in &t.load {
            load_row(md, t, p);
        }
    }
    md.push('\n');
}

fn load_row(md: &mut String, t: &TargetReport, p: &PhaseResult) {
    let failures: Vec<String> = FailureKind::ALL
        .iter()
        .map(|k| p.failures.get(*k).to_string())
        .collect();
    let _ = writeln!(
        md,
        "| {} | {} | {} | {} | {:.2} | {:.1} | {} | {} | {} | {} | {} |",
        t.name,
        p.concurrency,
        p.requests,
        percent(p.success_rate),
        p.requests_per_sec,
        p.output_tokens_per_sec,
        ms(p.ttft.p50_ms),
        ms(p.ttft.p95_ms),
        ms(p.end_to_end.p50_ms),
        ms(p.end_to_end.p95_ms),
        failures.join(" | ")
    );
}

fn write_cost(md: &mut String, report: &BenchReport) {
    let _ = writeln!(md, "## Cost\n");
    let w = report.settings.workload;
    let remotes: Vec<&TargetReport> = report
        .targets
        .iter()
        .filter(|t| t.remote_cost.is_some())
        .collect();
    if !remotes.is_empty() {
        let _ = writeln!(md, "Priced per token (price table):\n");
        let _ = writeln!(
            md,
            "| target | $/MTok input | $/MTok output | $/MTok, measured mix | $/MTok output incl. workload input | workload $/month |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        for t in &remotes {
            let Some(c) = &t.remote_cost else { continue };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                t.name,
                usd(c.price.input_usd_per_mtok),
                usd(c.price.output_usd_per_mtok),
                optional(c.measured_mix_usd_per_mtok, usd),
                usd(c.workload_usd_per_output_mtok),
                usd(c.workload_monthly_usd)
            );
        }
        md.push('\n');
    }
    let locals: Vec<&TargetReport> = report.targets.iter().filter(|t| t.local_cost.is_some()).collect();
    if !locals.is_empty() {
        let _ = writeln!(
            md,
            "Priced by GPU-hour (GPU busy all the time at each concurrency):\n"
        );
        let _ = writeln!(
            md,
            "| target | GPU $/hour | concurrency | output tok/hour | $/MTok output | $/MTok input+output |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        for t in &locals {
            let Some(c) = &t.local_cost else { continue };
            for level in &c.by_concurrency {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.0} | {} | {} |",
                    t.name,
                    usd(c.gpu_usd_per_hour),
                    level.concurrency,
                    level.output_tokens_per_hour,
                    optional(level.usd_per_output_mtok, usd),
                    optional(level.usd_per_total_mtok, usd)
                );
            }
        }
        let _ = writeln!(
            md,
            "\nWorkload of {} M input + {} M output tokens per month on the local side:\n",
            w.input_mtok_per_month, w.output_mtok_per_month
        );
        let _ = writeln!(
            md,
            "| target | best output tok/s (concurrency) | capacity MTok output/month | utilisation | GPUs | $/month |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        for t in &locals {
            let Some(c) = &t.local_cost else { continue };
            let _ = writeln!(
                md,
                "| {} | {:.1} (×{}) | {:.2} | {} | {} | {} |",
                t.name,
                c.best_output_tokens_per_sec,
                c.best_concurrency,
                c.capacity_output_mtok_per_month,
                optional(c.workload_utilisation, percent),
                c.workload_gpus.map_or_else(|| "–".into(), |n| n.to_string()),
                optional(c.workload_monthly_usd, usd)
            );
        }
        md.push('\n');
    }
    if !report.break_even.is_empty() {
        let _ = writeln!(
            md,
            "Break-even (local GPU's monthly cost = remote bill, at the workload's input/output mix):\n"
        );
        let _ = writeln!(
            md,
            "| local | remote | output MTok/month | input MTok/month | utilisation of one GPU | workload: local − remote $/month |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
        for b in &report.break_even {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {} | {} |",
                b.local,
                b.remote,
                b.output_mtok_per_month,
                b.input_mtok_per_month,
                optional(b.utilisation, percent),
                optional(b.workload_monthly_saving_usd, usd)
            );
        }
        md.push('\n');
    }
}
