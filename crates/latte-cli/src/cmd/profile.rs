//! `latte profile`: runs a few steps of the plan `latte plan` chooses — optimizer steps of
//! `latte train` on the built-in videos, or guided steps of `latte sample` — on random
//! weights, records the memory timeline (phases `head`, `forward`, `recompute X`,
//! `backward X`, `loss`, `update`, …) and writes it as JSON with a plot (SVG and PNG):
//! live bytes over time, the phases shaded, the budget, and the predicted against the
//! measured peak of the whole step.
//!
//! Memory is shown above what was live before the run (the command itself): the weights,
//! optimizer state and EMA the run makes are part of the step, as the plan counts them.

use crate::cmd::plan::{make_plan, PlanOutcome, PlanRequest, RequestWorkload};
use crate::cmd::video_out::png_bytes;
use crate::options::GlobalOptions;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use clap::Args as ClapArgs;
use latte::costs::Mode;
use latte::data::ClipShape;
use latte::guide::Smooth;
use latte::io::write_atomically;
use latte::plan::measured::random_model;
use latte::plan::{Candidate, Task, Workload};
use latte::random::{randn, rng_for};
use latte::sampling::{initial_noise, sample, Guidance, SampleOptions};
use latte::train::{DataSource, MemoryPlan, ModelSource, TrainConfig, Trainer};
use plotters::coord::Shift;
use plotters::prelude::*;
use remat::meter::{format_bytes, MemoryReport, Recorder};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// DejaVu Sans reduced to ASCII (and ± · × – — → − ≈ ≤ ≥), for text in PNG plots; its licence is
/// `assets/DejaVuSans-LICENSE.txt`.
static PLOT_FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-ascii.ttf");

/// Size of the plots in pixels.
const PLOT_SIZE: (u32, u32) = (1200, 640);

/// Arguments of `latte profile`: the workload flags of `latte plan`, and what to run.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    request: PlanRequest,
    /// Steps (forward and backward) to run and record.
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Directory for timeline.json, profile.json, profile.svg and profile.png.
    #[arg(long, value_name = "DIR", default_value = "profile")]
    out: PathBuf,
}

/// What `profile.json` records.
#[derive(Debug, Serialize)]
struct Summary<'a> {
    plan: &'a PlanOutcome,
    chosen: &'a Candidate,
    steps: usize,
    /// Bytes live before the run (the command itself), not part of the step.
    origin_bytes: u64,
    /// The measured peak of the whole step (weights, optimizer state, EMA, batch, chain,
    /// update), above `origin_bytes`.
    measured_peak_bytes: u64,
    /// The plan's predicted peak of the whole step.
    predicted_peak_bytes: u64,
}

/// Runs `latte profile`.
pub fn run(args: Args, global: &GlobalOptions) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let (request_workload, outcome) = make_plan(&args.request, global)?;
    let request_workload = &request_workload;
    let Some(chosen) = outcome.chosen() else {
        bail!(
            "no configuration fits the budget {}: the smallest feasible budget is {}",
            format_bytes(outcome.plan.budget_bytes),
            format_bytes(outcome.plan.smallest_feasible_bytes)
        );
    };
    let device = global.device()?;
    let meter = remat::meter::meter_for(&device)?;
    let workload = &request_workload.workload;
    println!(
        "{}\n{}\nrunning {} step(s) of policy {} in {} at batch {} ({} costs predicted a peak of {})",
        outcome.model,
        outcome.workload,
        args.steps,
        chosen.policy,
        chosen.precision.name(),
        chosen.effective_batch,
        chosen.costs,
        format_bytes(chosen.total_peak_bytes)
    );

    // Everything live before the run is not part of the step: the recording is shown and
    // compared above it.
    let before = meter.live_bytes();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let report = match workload.task {
        Task::Train { ranks, .. } if ranks > 1 => {
            bail!("latte profile runs one process: plan several ranks with `latte plan --ranks`")
        }
        Task::Train { grad_accum, .. } => {
            record_training(workload, chosen, grad_accum, args.steps, global, &args.out)?
        }
        Task::Guide { cfg } => record_guidance(workload, chosen, cfg, args.steps, global)?,
    };
    let report = report.context("no step was recorded")?;
    let origin_bytes = before.min(report.baseline_bytes);

    let timeline = args.out.join("timeline.json");
    report.write_json(&timeline)?;
    let measured_peak_bytes = report.baseline_bytes - origin_bytes + report.peak_bytes;
    let summary = Summary {
        plan: &outcome,
        chosen,
        steps: args.steps,
        origin_bytes,
        measured_peak_bytes,
        predicted_peak_bytes: chosen.total_peak_bytes,
    };
    let summary_path = args.out.join("profile.json");
    write_atomically(
        &summary_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )
    .with_context(|| format!("cannot write {}", summary_path.display()))?;

    let plot = PlotData::new(request_workload, &outcome, chosen, &report, origin_bytes);
    let svg = args.out.join("profile.svg");
    let png = args.out.join("profile.png");
    write_svg(&plot, &svg)?;
    write_png(&plot, &png)?;
    let error = error_pct(measured_peak_bytes, chosen.total_peak_bytes);
    println!(
        "measured peak of the whole step {} (above the {} live before the run), predicted {} \
         ({error:+.1} %)",
        format_bytes(measured_peak_bytes),
        format_bytes(origin_bytes),
        format_bytes(chosen.total_peak_bytes),
    );
    println!(
        "wrote {}, {}, {} and {}",
        timeline.display(),
        summary_path.display(),
        svg.display(),
        png.display()
    );
    Ok(())
}

/// Runs `steps` optimizer steps of `latte train` on the built-in videos with the chosen
/// precision, batch and policy, and returns their timeline.
fn record_training(
    workload: &Workload,
    chosen: &Candidate,
    grad_accum: usize,
    steps: usize,
    global: &GlobalOptions,
    out: &Path,
) -> Result<Option<MemoryReport>> {
    let config = &workload.config;
    let g = workload.geometry;
    let data = DataSource::Synthetic(ClipShape {
        channels: config.in_channels,
        frames: g.frames,
        height: g.height,
        width: g.width,
        caption_tokens: g.caption_tokens,
        caption_channels: config.caption_channels,
    });
    let settings = TrainConfig {
        steps: steps as u64,
        batch_size: chosen.batch,
        grad_accum,
        precision: chosen.precision,
        memory: MemoryPlan::Checkpoint(chosen.policy.parse()?),
        save_every: 0,
        seed: global.seed,
        temporal: workload.temporal,
        lora: workload.lora.clone(),
        ..TrainConfig::default()
    };
    let run_dir = out.join("train-run");
    let mut trainer = Trainer::new(
        ModelSource::Fresh {
            config: config.clone(),
            seed: global.seed,
        },
        data,
        settings,
        &run_dir,
        &global.device()?,
    )?;
    if trainer.plan().schedule != chosen.schedule {
        bail!(
            "the trainer planned another schedule than {}",
            chosen.policy
        );
    }
    let mut runs = Vec::with_capacity(steps);
    for step in 1..=steps {
        let (_, report) = trainer.train_step_recorded()?;
        runs.push((format!("step {step}"), report));
    }
    drop(trainer);
    std::fs::remove_dir_all(&run_dir)
        .with_context(|| format!("cannot remove {}", run_dir.display()))?;
    Ok(MemoryReport::concatenated(&runs))
}

/// Runs `steps` guided DDIM steps of `latte sample` (random weights, the smoothness
/// objective) under the chosen schedule, and returns their timeline.
fn record_guidance(
    workload: &Workload,
    chosen: &Candidate,
    cfg: bool,
    steps: usize,
    global: &GlobalOptions,
) -> Result<Option<MemoryReport>> {
    if chosen.batch != 1 || chosen.precision != latte::train::Precision::F32 {
        bail!(
            "guided sampling runs one video at a time in f32: profile it with --batch 1 \
             --precision f32"
        );
    }
    let device = global.device()?;
    let config = &workload.config;
    let g = workload.geometry;
    let model = random_model(config, Mode::Guide, None, DType::F32, &device, global.seed)?;
    let noise = initial_noise(
        global.seed,
        (1, config.in_channels, g.frames, g.height, g.width),
        &device,
    )?;
    let positive = randn(
        &mut rng_for(global.seed, "profile/captions"),
        (1, g.caption_tokens, config.caption_channels),
        &device,
    )?;
    let negative = positive.zeros_like()?;
    let options = SampleOptions {
        steps,
        guidance_scale: if cfg { 7.5 } else { 1.0 },
        temporal: workload.temporal,
        ..SampleOptions::default()
    };
    let guidance = Guidance {
        objective: &Smooth,
        scale: 1.0,
        steps: 0..steps,
        schedule: &chosen.schedule,
    };
    let mut recorder = Recorder::start(remat::meter::meter_for(&device)?);
    sample(
        &model,
        &noise,
        &negative,
        &positive,
        &options,
        Some(&guidance),
        &mut recorder,
        &mut |_| {},
    )?;
    Ok(Some(recorder.finish()))
}

/// How far the measured peak is from the predicted one, in percent of the prediction.
fn error_pct(measured: u64, predicted: u64) -> f64 {
    100.0 * (measured as f64 - predicted as f64) / predicted.max(1) as f64
}

/// What a phase of the executor is doing, for its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Head,
    Forward,
    Recompute,
    Backward,
    /// Outside the chain: the loss, the guidance tensors, the optimizer update, the
    /// sampler's step.
    Other,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Head,
        Kind::Forward,
        Kind::Recompute,
        Kind::Backward,
        Kind::Other,
    ];

    /// The kind of a phase named `step N/<executor phase>`.
    fn of(name: &str) -> Option<Kind> {
        let phase = name.rsplit('/').next().unwrap_or(name);
        if phase == "head" || phase == "backward head" {
            Some(Kind::Head)
        } else if phase == "forward" {
            Some(Kind::Forward)
        } else if phase.starts_with("recompute") {
            Some(Kind::Recompute)
        } else if phase.starts_with("backward") {
            Some(Kind::Backward)
        } else if phase.is_empty() || phase.starts_with('(') {
            None
        } else {
            Some(Kind::Other)
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Head => "head (and its backward)",
            Kind::Forward => "forward",
            Kind::Recompute => "recompute",
            Kind::Backward => "backward",
            Kind::Other => "loss, update, sampler",
        }
    }

    fn colour(self) -> RGBColor {
        match self {
            Kind::Head => RGBColor(190, 190, 190),
            Kind::Forward => RGBColor(120, 170, 230),
            Kind::Recompute => RGBColor(245, 175, 90),
            Kind::Backward => RGBColor(130, 200, 130),
            Kind::Other => RGBColor(200, 150, 210),
        }
    }
}

/// Everything the plot shows, in seconds and bytes of the whole process.
struct PlotData {
    title: String,
    subtitle: String,
    /// (start_s, end_s, kind) of every phase.
    bands: Vec<(f64, f64, Kind)>,
    /// (start_s, end_s, start_bytes, peak_bytes, end_bytes) of every phase.
    phases: Vec<(f64, f64, u64, u64, u64)>,
    /// (time_s, label) where each step starts.
    steps: Vec<(f64, String)>,
    budget_bytes: u64,
    predicted_bytes: u64,
    measured_bytes: u64,
    duration_s: f64,
}

impl PlotData {
    fn new(
        workload: &RequestWorkload,
        outcome: &PlanOutcome,
        chosen: &Candidate,
        report: &MemoryReport,
        origin_bytes: u64,
    ) -> Self {
        // Memory above what was live before the run.
        let base = report.baseline_bytes - origin_bytes;
        let mut bands = Vec::new();
        let mut phases = Vec::new();
        let mut steps: Vec<(f64, String)> = Vec::new();
        for phase in &report.timeline {
            let Some(kind) = Kind::of(&phase.name) else {
                continue;
            };
            bands.push((phase.start_s, phase.end_s, kind));
            phases.push((
                phase.start_s,
                phase.end_s,
                base + phase.start_bytes,
                base + phase.peak_bytes,
                base + phase.end_bytes,
            ));
            if let Some((step, _)) = phase.name.split_once('/') {
                if steps.last().is_none_or(|(_, s)| s != step) {
                    steps.push((phase.start_s, step.to_string()));
                }
            }
        }
        let measured = base + report.peak_bytes;
        let predicted = chosen.total_peak_bytes;
        let error = error_pct(measured, predicted);
        let model = outcome.model.split(" — ").next().unwrap_or(&outcome.model);
        Self {
            title: format!(
                "{model}: {} {} batch {}, {} — predicted peak {}, measured {} ({error:+.1} %)",
                workload.workload.task.mode(),
                chosen.precision.name(),
                chosen.effective_batch,
                chosen.policy,
                format_bytes(predicted),
                format_bytes(measured),
            ),
            subtitle: outcome.workload.clone(),
            bands,
            phases,
            steps,
            budget_bytes: outcome.plan.budget_bytes,
            predicted_bytes: predicted,
            measured_bytes: measured,
            duration_s: report.duration_s.max(1e-9),
        }
    }
}

/// Binary unit for the y axis: (divisor, name).
fn unit_for(bytes: u64) -> (f64, &'static str) {
    if bytes >= 4 << 30 {
        ((1u64 << 30) as f64, "GiB")
    } else if bytes >= 4 << 20 {
        ((1u64 << 20) as f64, "MiB")
    } else {
        (1024.0, "KiB")
    }
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e}")
}

/// Width of the legend panel right of the chart.
const LEGEND_WIDTH: i32 = 300;

/// Colours of the lines.
const LIVE: RGBColor = RGBColor(20, 60, 160);
const PHASE_PEAK: RGBColor = RGBColor(110, 150, 230);
const BUDGET: RGBColor = RGBColor(200, 30, 30);
const PREDICTED: RGBColor = RGBColor(130, 40, 170);
const MEASURED: RGBColor = RGBColor(40, 40, 40);

/// A legend entry: a filled swatch or a line.
enum Swatch {
    Fill(RGBColor),
    Line(RGBColor),
}

/// Draws the plot on any plotters backend.
fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, data: &PlotData) -> Result<()> {
    root.fill(&WHITE).map_err(plot_error)?;
    let top = data
        .budget_bytes
        .max(data.measured_bytes)
        .max(data.predicted_bytes);
    let (unit, unit_name) = unit_for(top);
    let y_max = top as f64 / unit * 1.08;
    let (title_area, body) = root.split_vertically(58);
    title_area
        .draw(&Text::new(
            data.title.clone(),
            (12, 8),
            ("sans-serif", 19).into_font(),
        ))
        .map_err(plot_error)?;
    title_area
        .draw(&Text::new(
            data.subtitle.clone(),
            (12, 33),
            ("sans-serif", 14).into_font().color(&RGBColor(90, 90, 90)),
        ))
        .map_err(plot_error)?;
    let width = body.dim_in_pixel().0 as i32;
    let (plot_area, legend_area) = body.split_horizontally(width - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot_area)
        .margin_left(12)
        .margin_right(16)
        .margin_bottom(8)
        .margin_top(6)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..data.duration_s, 0f64..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("time (s)")
        .y_desc(format!("live memory ({unit_name})"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(plot_error)?;

    for &(start, end, kind) in &data.bands {
        let style = kind.colour().mix(0.45).filled();
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(start, 0.0), (end, y_max)],
                style,
            )))
            .map_err(plot_error)?;
    }
    for (start, label) in &data.steps {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(*start, 0.0), (*start, y_max)],
                BLACK.stroke_width(1),
            )))
            .map_err(plot_error)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!(" {label}"),
                (*start, y_max * 0.995),
                ("sans-serif", 14).into_font(),
            )))
            .map_err(plot_error)?;
    }
    let scaled = |bytes: u64| bytes as f64 / unit;
    // Each phase's high-water mark as a step, and the live bytes at the phase boundaries.
    let peaks: Vec<(f64, f64)> = data
        .phases
        .iter()
        .flat_map(|&(start, end, _, peak, _)| [(start, scaled(peak)), (end, scaled(peak))])
        .collect();
    chart
        .draw_series(LineSeries::new(peaks, PHASE_PEAK.stroke_width(1)))
        .map_err(plot_error)?;
    let boundaries: Vec<(f64, f64)> = data
        .phases
        .iter()
        .flat_map(|&(start, end, first, _, last)| [(start, scaled(first)), (end, scaled(last))])
        .collect();
    chart
        .draw_series(LineSeries::new(boundaries, LIVE.stroke_width(2)))
        .map_err(plot_error)?;
    for (bytes, colour) in [
        (data.budget_bytes, BUDGET),
        (data.predicted_bytes, PREDICTED),
        (data.measured_bytes, MEASURED),
    ] {
        let line = vec![(0.0, scaled(bytes)), (data.duration_s, scaled(bytes))];
        chart
            .draw_series(DashedLineSeries::new(line, 9, 5, colour.stroke_width(2)))
            .map_err(plot_error)?;
    }

    let mut entries: Vec<(Swatch, String)> = Kind::ALL
        .iter()
        .map(|k| (Swatch::Fill(k.colour()), k.label().to_string()))
        .collect();
    entries.extend([
        (
            Swatch::Line(LIVE),
            "live bytes at phase boundaries".to_string(),
        ),
        (
            Swatch::Line(PHASE_PEAK),
            "high-water mark of each phase".to_string(),
        ),
        (
            Swatch::Line(BUDGET),
            format!("budget {}", format_bytes(data.budget_bytes)),
        ),
        (
            Swatch::Line(PREDICTED),
            format!("predicted peak {}", format_bytes(data.predicted_bytes)),
        ),
        (
            Swatch::Line(MEASURED),
            format!("measured peak {}", format_bytes(data.measured_bytes)),
        ),
    ]);
    for (i, (swatch, label)) in entries.iter().enumerate() {
        let y = 20 + 26 * i as i32;
        match swatch {
            Swatch::Fill(colour) => legend_area
                .draw(&Rectangle::new(
                    [(8, y - 7), (30, y + 7)],
                    colour.mix(0.45).filled(),
                ))
                .map_err(plot_error)?,
            Swatch::Line(colour) => legend_area
                .draw(&PathElement::new(
                    vec![(8, y), (30, y)],
                    colour.stroke_width(3),
                ))
                .map_err(plot_error)?,
        }
        legend_area
            .draw(&Text::new(
                label.clone(),
                (38, y - 8),
                ("sans-serif", 14).into_font(),
            ))
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Registers the shipped font for plotters (once per process).
fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, PLOT_FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("the plot font shipped with latte (assets/DejaVuSans-ascii.ttf) does not load")
    }
}

fn write_svg(data: &PlotData, path: &Path) -> Result<()> {
    register_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        draw(&root, data)?;
    }
    write_atomically(path, svg.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_png(data: &PlotData, path: &Path) -> Result<()> {
    register_font()?;
    let (w, h) = PLOT_SIZE;
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, PLOT_SIZE).into_drawing_area();
        draw(&root, data)?;
    }
    write_atomically(path, &png_bytes(&rgb, w, h)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_classified() {
        assert_eq!(Kind::of("step 1/head"), Some(Kind::Head));
        assert_eq!(Kind::of("step 2/backward head"), Some(Kind::Head));
        assert_eq!(Kind::of("step 1/forward"), Some(Kind::Forward));
        assert_eq!(
            Kind::of("step 1/recompute spatial.3"),
            Some(Kind::Recompute)
        );
        assert_eq!(Kind::of("step 1/backward tail"), Some(Kind::Backward));
        assert_eq!(Kind::of("step 1/update"), Some(Kind::Other));
        assert_eq!(Kind::of("step 1/(start)"), None);
        assert_eq!(Kind::of("(start)"), None);
    }

    #[test]
    fn the_shipped_font_loads() {
        register_font().unwrap();
    }
}
