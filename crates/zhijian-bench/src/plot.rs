//! The comparison's plots, as PNG and SVG: test accuracy against trainable
//! parameters and against train time, and in- against out-of-distribution
//! accuracy. One point per strategy (mean over seeds, ±1 standard deviation
//! bars when there are several).
//!
//! Text is drawn with DejaVu Sans compiled into the binary, so plots need no
//! system fonts (a fresh machine or a container often has none).

use std::path::{Path, PathBuf};
use std::sync::Once;

use image::ImageEncoder;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use zhijian_core::weights::write_atomic;
use zhijian_core::{Error, Result};

use crate::plot_text::GlyphText;
use crate::record::Record;
use crate::table::{human_count, mean_std};

/// Pixel size of every plot.
pub const SIZE: (u32, u32) = (960, 640);

const FONT: &str = "sans-serif";

/// Tableau's twenty colours: the ten strong ones, then their light
/// partners, so a study of up to twenty strategies gives each its own.
const PALETTE: [RGBColor; 20] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(174, 199, 232),
    RGBColor(255, 187, 120),
    RGBColor(152, 223, 138),
    RGBColor(255, 152, 150),
    RGBColor(197, 176, 213),
    RGBColor(196, 156, 148),
    RGBColor(247, 182, 210),
    RGBColor(199, 199, 199),
    RGBColor(219, 219, 141),
    RGBColor(158, 218, 229),
];

/// One strategy's runs, summarised.
struct Point {
    name: String,
    colour: RGBColor,
    trainable: f64,
    /// Test top-1 (%), mean and standard deviation over seeds.
    top1: (f64, f64),
    /// Train time (s) including cached features, mean and standard deviation.
    seconds: (f64, f64),
    /// Top-1 (%) on each shifted split, mean and standard deviation.
    ood: Vec<(String, (f64, f64))>,
}

/// Finished runs only: a failed run has no accuracy to plot.
fn points(records: &[Record]) -> Vec<Point> {
    let records: Vec<&Record> = records.iter().filter(|r| r.finished()).collect();
    let mut order: Vec<&str> = Vec::new();
    for r in &records {
        if !order.contains(&r.strategy.as_str()) {
            order.push(&r.strategy);
        }
    }
    order
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let runs: Vec<&Record> = records.iter().copied().filter(|r| r.strategy == *name).collect();
            let col = |f: &dyn Fn(&Record) -> f64| mean_std(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let mut splits: Vec<&str> = Vec::new();
            for s in runs.iter().flat_map(|r| &r.ood) {
                if !splits.contains(&s.split.as_str()) {
                    splits.push(&s.split);
                }
            }
            let ood = splits
                .iter()
                .map(|s| {
                    let xs: Vec<f64> = runs.iter().filter_map(|r| r.ood.iter().find(|o| o.split == *s)).map(|o| 100.0 * o.top1).collect();
                    (s.to_string(), mean_std(&xs))
                })
                .collect();
            Point {
                name: name.to_string(),
                colour: PALETTE[i % PALETTE.len()],
                trainable: runs[0].trainable_params.max(1) as f64,
                top1: col(&|r| 100.0 * r.test_top1),
                seconds: col(&|r| (r.feature_seconds + r.train_seconds).max(1e-3)),
                ood,
            }
        })
        .collect()
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err() {
            unreachable!("DejaVu Sans, compiled in, parses");
        }
    });
}

/// Writes the plots of `records` into `dir`, PNG and SVG each, atomically:
/// `{stem}-accuracy-vs-params`, `{stem}-accuracy-vs-time` and, where runs were
/// tested out of distribution, `{stem}-id-vs-ood`. Returns the files written
/// (none when no run finished).
pub fn write_plots(records: &[Record], dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    if records.is_empty() {
        return Err(Error::Config("no records to plot".into()));
    }
    let pts = points(records);
    if pts.is_empty() {
        // Every run failed: nothing to draw, and the table says why.
        return Ok(Vec::new());
    }
    register_font();
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let seeds = records.iter().map(|r| r.seed).collect::<std::collections::BTreeSet<_>>().len();
    let title = |what: &str| format!("{}: {what} ({seeds} seed{})", records[0].experiment, if seeds == 1 { "" } else { "s" });
    let mut plots: Vec<(&str, String, Chart)> = vec![
        ("accuracy-vs-params", title("test top-1 vs trainable parameters"), Chart::Params),
        ("accuracy-vs-time", title("test top-1 vs train time"), Chart::Time),
    ];
    if pts.iter().any(|p| !p.ood.is_empty()) {
        plots.push(("id-vs-ood", title("in- vs out-of-distribution top-1"), Chart::Shift));
    }
    let mut written = Vec::new();
    for (name, title, chart) in plots {
        let mut svg = String::new();
        draw(SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(), &pts, &title, chart)?;
        let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        draw(GlyphText::new(BitMapBackend::with_buffer(&mut rgb, SIZE)).into_drawing_area(), &pts, &title, chart)?;
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&rgb, SIZE.0, SIZE.1, image::ExtendedColorType::Rgb8)
            .map_err(|e| Error::Config(format!("encoding the {name} plot: {e}")))?;
        for (ext, bytes) in [("svg", svg.into_bytes()), ("png", png)] {
            let path = dir.join(format!("{stem}-{name}.{ext}"));
            write_atomic(&path, &bytes)?;
            written.push(path);
        }
    }
    Ok(written)
}

#[derive(Clone, Copy)]
enum Chart {
    Params,
    Time,
    Shift,
}

/// `lo..hi` of `values` widened by `pad` of the span (at least `min_pad`), clamped to `[0, 100]`.
fn percent_range(values: impl Iterator<Item = f64>, min_pad: f64) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.12).max(min_pad);
    (lo - pad).max(0.0)..(hi + pad).min(100.0)
}

/// A log-scale range around `values`, a factor `pad` wider on each side.
fn log_range(values: impl Iterator<Item = f64>, pad: f64) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    lo / pad..hi * pad
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, pts: &[Point], title: &str, chart: Chart) -> Result<()> {
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| Error::Config(format!("drawing a plot: {e}"));
    root.fill(&WHITE).map_err(fail)?;
    let label_font = (FONT, 16).into_font();
    match chart {
        Chart::Params | Chart::Time => {
            let x_of = |p: &Point| if matches!(chart, Chart::Params) { p.trainable } else { p.seconds.0 };
            let y_range = percent_range(pts.iter().flat_map(|p| [p.top1.0 - p.top1.1, p.top1.0 + p.top1.1]), 2.0);
            let x_range = log_range(pts.iter().map(x_of), 4.0);
            let mut c = ChartBuilder::on(&root)
                .caption(title, (FONT, 22))
                .margin(24)
                .x_label_area_size(56)
                .y_label_area_size(72)
                .build_cartesian_2d(x_range.log_scale(), y_range)
                .map_err(fail)?;
            let params = matches!(chart, Chart::Params);
            let x_desc = if params { "trainable parameters (log scale)" } else { "train time, s (log scale; cached features included)" };
            let formatter = |v: &f64| if params { log_tick(*v, |n| human_count(n).replace(".0", "")) } else { log_tick(*v, |n| n.to_string()) };
            c.configure_mesh()
                .x_desc(x_desc)
                .y_desc("test top-1 (%)")
                .x_label_formatter(&formatter)
                .y_label_formatter(&|v| format!("{v:.0}"))
                .axis_desc_style((FONT, 17))
                .label_style((FONT, 14))
                .light_line_style(RGBColor(244, 244, 244))
                .draw()
                .map_err(fail)?;
            for p in pts {
                let (x, (y, sd)) = (x_of(p), p.top1);
                if sd > 0.0 {
                    c.draw_series(std::iter::once(ErrorBar::new_vertical(x, y - sd, y, y + sd, p.colour.stroke_width(2), 12))).map_err(fail)?;
                }
                c.draw_series(std::iter::once(Circle::new((x, y), 7, p.colour.filled()))).map_err(fail)?;
            }
            // Labels beside their points, moved apart vertically where they would overlap.
            let anchors: Vec<(i32, i32)> = pts.iter().map(|p| c.backend_coord(&(x_of(p), p.top1.0))).collect();
            let plot_right = c.plotting_area().get_pixel_range().0.end;
            for (p, (x, y)) in pts.iter().zip(separate(&anchors, 18)) {
                let width = root.estimate_text_size(&p.name, &TextStyle::from(label_font.clone())).map_or(0, |(w, _)| w as i32);
                // Left of the point when the label would leave the plot on the right.
                let lx = if x + 12 + width > plot_right { x - 12 - width } else { x + 12 };
                root.draw(&Text::new(p.name.clone(), (lx, y - 8), label_font.clone().color(&p.colour))).map_err(fail)?;
            }
        }
        Chart::Shift => {
            let all: Vec<f64> = pts.iter().flat_map(|p| std::iter::once(p.top1.0).chain(p.ood.iter().map(|(_, (m, _))| *m))).collect();
            let range = percent_range(all.iter().copied(), 3.0);
            let mut c = ChartBuilder::on(&root)
                .caption(title, (FONT, 22))
                .margin(24)
                .x_label_area_size(56)
                .y_label_area_size(72)
                .build_cartesian_2d(range.clone(), range.clone())
                .map_err(fail)?;
            c.configure_mesh()
                .x_desc("in-distribution test top-1 (%)")
                .y_desc("out-of-distribution top-1 (%)")
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.0}"))
                .axis_desc_style((FONT, 17))
                .label_style((FONT, 14))
                .light_line_style(RGBColor(244, 244, 244))
                .draw()
                .map_err(fail)?;
            let grey = RGBColor(150, 150, 150);
            c.draw_series(LineSeries::new([(range.start, range.start), (range.end, range.end)], grey.stroke_width(1)))
                .map_err(fail)?
                .label("no drop (y = x)")
                .legend(move |(x, y)| PathElement::new([(x - 10, y), (x + 10, y)], grey));
            let mut splits: Vec<&str> = Vec::new();
            for (s, _) in pts.iter().flat_map(|p| &p.ood) {
                if !splits.contains(&s.as_str()) {
                    splits.push(s);
                }
            }
            for p in pts {
                let colour = p.colour;
                c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(fail)?
                    .label(p.name.clone())
                    .legend(move |(x, y)| Circle::new((x, y), 6, colour.filled()));
                for (split, (m, sd)) in &p.ood {
                    let shape = splits.iter().position(|s| s == split).unwrap_or(0);
                    if *sd > 0.0 {
                        c.draw_series(std::iter::once(ErrorBar::new_vertical(p.top1.0, m - sd, *m, m + sd, colour.stroke_width(2), 10))).map_err(fail)?;
                    }
                    c.draw_series(std::iter::once(EmptyElement::at((p.top1.0, *m)) + Polygon::new(marker_outline(shape), colour.filled()))).map_err(fail)?;
                }
            }
            for (shape, split) in splits.iter().enumerate() {
                c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(fail)?
                    .label(split.to_string())
                    .legend(move |(x, y)| EmptyElement::at((x, y)) + Polygon::new(marker_outline(shape), RGBColor(60, 60, 60).filled()));
            }
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.9))
                .border_style(RGBColor(200, 200, 200))
                .label_font((FONT, 15))
                .draw()
                .map_err(fail)?;
        }
    }
    root.present().map_err(fail)?;
    Ok(())
}

/// A log axis's tick label: only at 1, 2 and 5 times a power of ten (the
/// others would crowd the decade's end), printed by `show`; blank elsewhere.
fn log_tick(v: f64, show: impl Fn(i64) -> String) -> String {
    let decade = 10f64.powf(v.log10().floor());
    let mantissa = (v / decade).round();
    let on_tick = (v / decade - mantissa).abs() < 1e-6 * mantissa;
    if on_tick && [1.0, 2.0, 5.0].contains(&mantissa) { show((mantissa * decade).round() as i64) } else { String::new() }
}

/// The outline of marker `shape` around (0, 0), one per shifted split:
/// circle, triangle, square, diamond, plus (a polygon each, so every marker
/// is the same kind of element).
fn marker_outline(shape: usize) -> Vec<(i32, i32)> {
    let s = 7;
    match shape % 5 {
        0 => (0..16)
            .map(|k| {
                let a = k as f64 * std::f64::consts::TAU / 16.0;
                ((a.cos() * s as f64).round() as i32, (a.sin() * s as f64).round() as i32)
            })
            .collect(),
        1 => vec![(0, -s - 1), (s + 1, s), (-s - 1, s)],
        2 => vec![(-s + 1, -s + 1), (s - 1, -s + 1), (s - 1, s - 1), (-s + 1, s - 1)],
        3 => vec![(0, -s - 2), (s + 1, 0), (0, s + 2), (-s - 1, 0)],
        _ => {
            let (a, b) = (2, s);
            vec![(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        }
    }
}

/// Label positions at `anchors`, moved down just enough that labels whose
/// anchors are close horizontally stay at least `gap` pixels apart.
fn separate(anchors: &[(i32, i32)], gap: i32) -> Vec<(i32, i32)> {
    let mut order: Vec<usize> = (0..anchors.len()).collect();
    order.sort_by_key(|&i| (anchors[i].1, anchors[i].0));
    let mut placed: Vec<(i32, i32)> = anchors.to_vec();
    for (k, &i) in order.iter().enumerate() {
        for &j in &order[..k] {
            let (a, b) = (placed[i], placed[j]);
            if (a.0 - b.0).abs() < 160 && (a.1 - b.1).abs() < gap {
                placed[i].1 = b.1 + gap;
            }
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{SplitScore, sample};

    fn runs(with_shift: bool) -> Vec<Record> {
        let shift = |top1: f64| if with_shift { vec![SplitScore { split: "noise:3".into(), top1, top5: None, n: 10 }] } else { Vec::new() };
        let mut out = Vec::new();
        for seed in 0..2 {
            let s = seed as f64 * 0.02;
            out.push(Record { trainable_params: 770, ood: shift(0.5 + s), ..sample("linear-probe", seed, 0.72 + s) });
            out.push(Record { trainable_params: 22_600_000, train_seconds: 290.0, ood: shift(0.4), ..sample("full-finetune", seed, 0.80 + s) });
        }
        out
    }

    /// Up to twenty strategies each get a colour no other has (the robust study has fourteen).
    #[test]
    fn each_of_twenty_strategies_has_its_own_colour() {
        let records: Vec<Record> = (0..20).map(|i| sample(&format!("s{i}"), 0, 0.5)).collect();
        let colours: Vec<RGBColor> = points(&records).iter().map(|p| p.colour).collect();
        for (i, c) in colours.iter().enumerate() {
            assert!(!colours[..i].contains(c), "strategy {i} repeats colour {c:?}");
        }
    }

    #[test]
    fn plots_are_written_as_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_plots(&runs(true), dir.path(), "demo").unwrap();
        let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            [
                "demo-accuracy-vs-params.svg",
                "demo-accuracy-vs-params.png",
                "demo-accuracy-vs-time.svg",
                "demo-accuracy-vs-time.png",
                "demo-id-vs-ood.svg",
                "demo-id-vs-ood.png"
            ]
        );
        // Nothing else (no temporary file) is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 6);
        for f in &files {
            if f.extension().unwrap() == "svg" {
                let svg = std::fs::read_to_string(f).unwrap();
                assert!(svg.starts_with("<svg") && svg.contains("linear-probe") && svg.contains("full-finetune"), "{}", f.display());
                assert!(svg.contains("2 seeds"));
            } else {
                let img = image::open(f).unwrap().to_rgb8();
                assert_eq!(img.dimensions(), SIZE);
                // White background, dark text and axes, and each strategy's colour.
                let count = |want: &dyn Fn(&image::Rgb<u8>) -> bool| img.pixels().filter(|p| want(p)).count();
                assert!(count(&|p| p.0 == [255, 255, 255]) > img.len() / 6);
                assert!(count(&|p| p.0.iter().all(|&c| c < 80)) > 500, "{}: no text", f.display());
                for colour in &PALETTE[..2] {
                    assert!(count(&|p| p.0 == [colour.0, colour.1, colour.2]) > 50, "{}: {colour:?} missing", f.display());
                }
            }
        }
    }

    #[test]
    fn no_shifted_splits_no_shift_plot() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_plots(&runs(false), dir.path(), "x").unwrap();
        assert_eq!(files.len(), 4);
        assert!(files.iter().all(|f| !f.to_string_lossy().contains("id-vs-ood")));
        assert!(write_plots(&[], dir.path(), "x").is_err());
    }

    #[test]
    fn log_ticks_label_one_two_five() {
        let ticks: Vec<String> = [100.0, 200.0, 300.0, 500.0, 900.0, 1000.0, 20_000.0].iter().map(|&v| log_tick(v, |n| n.to_string())).collect();
        assert_eq!(ticks, ["100", "200", "", "500", "", "1000", "20000"]);
    }

    #[test]
    fn close_labels_are_moved_apart() {
        let placed = separate(&[(100, 200), (110, 205), (500, 204), (105, 300)], 18);
        assert_eq!(placed, [(100, 200), (110, 218), (500, 204), (105, 300)]);
    }
}
