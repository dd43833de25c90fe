//! The SVG charts of a bench (plotters, SVG backend only): latency percentiles per target,
//! throughput against concurrency, and local $/MTok against utilisation with each
//! remote's price and the break-even point.

use std::path::Path;

use plotters::prelude::*;

use super::{BenchReport, TargetReport, cost, stats::PhaseResult};

const SIZE: (u32, u32) = (960, 540);
const PERCENTILES: [f64; 4] = [50.0, 90.0, 95.0, 99.0];

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The stability run's phase, or the first load level when there was none.
fn streaming_phase(target: &TargetReport) -> Option<&PhaseResult> {
    target.stability.as_ref().or_else(|| target.load.first())
}

/// TTFT and end-to-end latency at p50/p90/p95/p99, one colour per target.
pub fn latency_chart(report: &BenchReport, path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let series: Vec<(&str, [f64; 4], [f64; 4])> = report
        .targets
        .iter()
        .filter_map(|t| {
            let p = streaming_phase(t)?;
            (p.successes > 0).then_some((
                t.name.as_str(),
                [p.ttft.p50_ms, p.ttft.p90_ms, p.ttft.p95_ms, p.ttft.p99_ms],
                [
                    p.end_to_end.p50_ms,
                    p.end_to_end.p90_ms,
                    p.end_to_end.p95_ms,
                    p.end_to_end.p99_ms,
                ],
            ))
        })
        .collect();
    let top = series
        .iter()
        .flat_map(|(_, a, b)| a.iter().chain(b.iter()))
        .fold(1.0f64, |m, v| m.max(*v))
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency percentiles (solid: end-to-end, thin: TTFT)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(45.0f64..100.0, 0.0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("milliseconds")
        .draw()
        .map_err(err)?;
    for (i, (name, ttft, e2e)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let points = |values: &[f64; 4]| {
            PERCENTILES
                .iter()
                .copied()
                .zip(values.iter().copied())
                .collect::<Vec<_>>()
        };
        chart
            .draw_series(LineSeries::new(points(e2e), colour.stroke_width(3)))
            .map_err(err)?
            .label(format!("{name} end-to-end"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
        chart
            .draw_series(LineSeries::new(points(ttft), colour.stroke_width(1)))
            .map_err(err)?
            .label(format!("{name} TTFT"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(1)));
        chart
            .draw_series(
                points(ttft)
                    .into_iter()
                    .chain(points(e2e))
                    .map(|p| Circle::new(p, 3, colour.filled())),
            )
            .map_err(err)?;
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperLeft)
}

/// Output tokens/s against concurrency, one line per target.
pub fn throughput_chart(report: &BenchReport, path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let series: Vec<(&str, Vec<(f64, f64)>)> = report
        .targets
        .iter()
        .filter(|t| !t.load.is_empty())
        .map(|t| {
            let points = t
                .load
                .iter()
                .map(|p| (p.concurrency as f64, p.output_tokens_per_sec))
                .collect();
            (t.name.as_str(), points)
        })
        .collect();
    let right = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(c, _)| *c))
        .fold(1.0f64, f64::max)
        * 1.05;
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, t)| *t))
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Throughput vs concurrency", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0f64..right, 0.0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("concurrent streams")
        .y_desc("output tokens / s")
        .draw()
        .map_err(err)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, colour.filled())))
            .map_err(err)?;
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperLeft)
}

/// Local $/MTok output against utilisation (log scale), each remote's price per output
/// MTok (with the workload's input) as a flat line, and the break-even points.
pub fn cost_chart(report: &BenchReport, path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let utilisations: Vec<f64> = (1..=100).map(|pct| f64::from(pct) / 100.0).collect();
    let curves: Vec<(&str, Vec<(f64, f64)>)> = report
        .targets
        .iter()
        .filter_map(|t| {
            let local = t.local_cost.as_ref()?;
            let points: Vec<(f64, f64)> = utilisations
                .iter()
                .filter_map(|u| Some((u * 100.0, cost::local_usd_per_mtok_at(local, *u)?)))
                .collect();
            (!points.is_empty()).then_some((t.name.as_str(), points))
        })
        .collect();
    let remote_prices: Vec<(&str, f64)> = report
        .targets
        .iter()
        .filter_map(|t| {
            Some((
                t.name.as_str(),
                t.remote_cost.as_ref()?.workload_usd_per_output_mtok,
            ))
        })
        .filter(|(_, price)| *price > 0.0)
        .collect();
    // Remotes at the same price (a gateway direct and through lifeboat) share one line.
    let mut flats: Vec<(String, f64)> = Vec::new();
    for (name, price) in &remote_prices {
        match flats.iter_mut().find(|(_, p)| p == price) {
            Some((names, _)) => {
                names.push_str(", ");
                names.push_str(name);
            }
            None => flats.push(((*name).to_string(), *price)),
        }
    }
    let values = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .chain(flats.iter().map(|(_, y)| *y));
    let (low, high) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low, high) = if low.is_finite() && high > 0.0 {
        (low / 2.0, high * 2.0)
    } else {
        (0.01, 100.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "$ per million output tokens vs GPU utilisation",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0f64..100.0, (low..high).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("utilisation of the local GPU (%)")
        .y_desc("USD / MTok output (log)")
        .draw()
        .map_err(err)?;
    let mut colour_index = 0;
    for (name, points) in &curves {
        let colour = Palette99::pick(colour_index).to_rgba();
        colour_index += 1;
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(err)?
            .label(format!("{name} (local, best measured throughput)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    for (name, price) in &flats {
        let colour = Palette99::pick(colour_index).to_rgba();
        colour_index += 1;
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, *price), (100.0, *price)],
                colour.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("{name} (remote, workload mix)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    let remote_price = |name: &str| remote_prices.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);
    let mut marked: Vec<(&str, f64, f64)> = Vec::new();
    for even in &report.break_even {
        let (Some(u), Some(price)) = (even.utilisation, remote_price(&even.remote)) else {
            continue;
        };
        if u > 1.0 || marked.contains(&(even.local.as_str(), u, price)) {
            continue;
        }
        marked.push((even.local.as_str(), u, price));
        let point = (u * 100.0, price);
        chart
            .draw_series([Circle::new(point, 6, BLACK.filled())])
            .map_err(err)?;
        chart
            .draw_series([Text::new(
                format!("break-even {}: {:.1} %", even.local, u * 100.0),
                (point.0 + 1.0, price * 1.15),
                ("sans-serif", 15),
            )])
            .map_err(err)?;
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperRight)
}

/// Draw the legend at `position` and write the file: the last step of every chart.
fn finish<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}
