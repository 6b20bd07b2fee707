//! The report's PNG plots, drawn with `plotters` (bitmap backend) and text through `ab_glyph`
//! with DejaVu Sans embedded from the `dejavu` crate, so they look the same on a machine
//! without system fonts: validation loss against tokens, the trade-off (KV-cache bytes per
//! token against final validation loss), and decode speed against context.

use super::decode::DecodePath;
use super::summary::RunSummary;
use anyhow::anyhow;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const SIZE: (u32, u32) = (960, 600);
const FONT: &str = "sans-serif";

fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded DejaVu Sans font does not load"))
    }
}

fn color(i: usize) -> RGBColor {
    // Tableau 10: distinct on white and for the common colour-vision deficiencies.
    const C: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

fn human(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.1}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// What drawing returns inside this module: plotters' errors (and ours) boxed, given the
/// PNG's name once by [`named`].
type Drawn = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn named(path: &Path, drawn: Drawn) -> anyhow::Result<()> {
    drawn.map_err(|e| anyhow!("{}: drawing: {e}", path.display()))
}

/// Pad [lo, hi] by `frac` of its span (at least a little when lo == hi).
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    let span = (hi - lo).abs().max(hi.abs() * 0.02).max(1e-9);
    (lo - span * frac, hi + span * frac)
}

/// Validation loss against tokens, one line per run. The y range covers the validations from
/// a fifth of training on, so that the differences at the end are visible.
pub fn val_loss(path: &Path, runs: &[RunSummary]) -> anyhow::Result<()> {
    ensure_font()?;
    named(path, draw_val_loss(path, runs))
}

fn draw_val_loss(path: &Path, runs: &[RunSummary]) -> Drawn {
    let max_tokens = runs
        .iter()
        .flat_map(|r| r.val_curve.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let late: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.val_curve.iter())
        .filter(|p| p.0 as f64 >= 0.2 * max_tokens)
        .map(|p| p.1)
        .collect();
    let all: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.val_curve.iter().map(|p| p.1))
        .collect();
    let pool = if late.is_empty() { &all } else { &late };
    let lo = pool.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = pool.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = padded(lo, hi, 0.08);

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Validation loss (from a fifth of training on)", (FONT, 24))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_tokens * 1.02, lo..hi)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("training tokens")
        .y_desc("val loss (nats)")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_label_formatter(&|x| human(*x))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    for (i, r) in runs.iter().enumerate() {
        let c = color(i);
        // Points above the frame (the first validations) are left out, not clamped to its edge.
        let pts: Vec<(f64, f64)> = r
            .val_curve
            .iter()
            .map(|&(t, l)| (t as f64, l))
            .filter(|p| p.1 <= hi)
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))?
            .label(format!("{} — {}", r.name, r.attention))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The trade-off: KV-cache bytes per token (bf16, log scale) against final validation loss,
/// one labelled point per run; the label carries the training speed.
pub fn tradeoff(path: &Path, runs: &[RunSummary]) -> anyhow::Result<()> {
    ensure_font()?;
    named(path, draw_tradeoff(path, runs))
}

fn draw_tradeoff(path: &Path, runs: &[RunSummary]) -> Drawn {
    let xs: Vec<f64> = runs
        .iter()
        .map(|r| r.kv_cache_bytes_per_token_bf16.max(1) as f64)
        .collect();
    let ys: Vec<f64> = runs.iter().map(|r| r.final_val_loss).collect();
    let (xlo, xhi) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min) / 1.6,
        xs.iter().copied().fold(0.0, f64::max) * 2.2,
    );
    let (ylo, yhi) = padded(
        ys.iter().copied().fold(f64::INFINITY, f64::min),
        ys.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        0.15,
    );
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Trade-off: KV cache per token vs final validation loss",
            (FONT, 24),
        )
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((xlo..xhi).log_scale(), ylo..yhi)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("KV cache bytes per token, bf16 (log scale) — lower is better")
        .y_desc("final val loss (nats) — lower is better")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_label_formatter(&|x| human(*x))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()?;
    for (i, r) in runs.iter().enumerate() {
        let c = color(i);
        let label = format!("{} ({:.0} tok/s)", r.name, r.train_tokens_per_sec);
        chart.draw_series(std::iter::once(
            EmptyElement::at((xs[i], ys[i]))
                + Circle::new((0, 0), 8, c.filled())
                + Text::new(label, (11, -8), (FONT, 15).into_font()),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// Decode tokens/s against context: each run's cached path (absorbed for MLA) as a solid
/// line, MLA's naive path dashed-looking (lighter, triangles).
pub fn decode_speed(path: &Path, runs: &[RunSummary]) -> anyhow::Result<()> {
    ensure_font()?;
    named(path, draw_decode_speed(path, runs))
}

fn draw_decode_speed(path: &Path, runs: &[RunSummary]) -> Drawn {
    let all: Vec<(f64, f64)> = runs
        .iter()
        .flat_map(|r| r.decode.iter())
        .filter(|d| d.path != DecodePath::None)
        .map(|d| (d.context as f64, d.decode_tokens_per_sec))
        .collect();
    if all.is_empty() {
        return Err("no decode figures to plot".into());
    }
    let xmax = all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.05;
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.12;
    let batch = runs
        .iter()
        .flat_map(|r| r.decode.first())
        .map(|d| d.batch)
        .next()
        .unwrap_or(1);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Decode speed vs context (batch {batch})"),
            (FONT, 24),
        )
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("context (prompt tokens)")
        .y_desc("decode tokens/s")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| human(*y))
        .draw()?;
    for (i, r) in runs.iter().enumerate() {
        let c = color(i);
        let mut paths = vec![(r.cached_path(), c.stroke_width(3), "")];
        if r.is_mla() {
            paths.push((DecodePath::Naive, c.mix(0.45).stroke_width(2), " naive"));
        }
        for (p, style, suffix) in paths {
            let mut pts: Vec<(f64, f64)> = r
                .decode
                .iter()
                .filter(|d| d.path == p)
                .map(|d| (d.context as f64, d.decode_tokens_per_sec))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let label = match (r.is_mla(), suffix) {
                (true, "") => format!("{} absorbed", r.name),
                _ => format!("{}{suffix}", r.name),
            };
            chart
                .draw_series(LineSeries::new(pts.clone(), style))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            let marker = style.color;
            if suffix.is_empty() {
                chart.draw_series(pts.iter().map(|&q| Circle::new(q, 4, marker.filled())))?;
            } else {
                chart.draw_series(
                    pts.iter()
                        .map(|&q| TriangleMarker::new(q, 6, marker.filled())),
                )?;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    root.present()?;
    Ok(())
}
