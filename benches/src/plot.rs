//! A line plot of memory over time, one line per mode, written as a standalone SVG.
//!
//! When one mode runs much longer than the others (kernel KSM at its defaults), a second panel
//! shows the first seconds, where the others converge.
//!
//! ```
//! use vmm_benches::plot::{Series, svg};
//!
//! let fast = Series { name: "fast".into(), points: vec![(0.0, 2e9), (1.0, 1e9), (2.0, 1e9)] };
//! let text = svg("memory", &[fast], None);
//! assert!(text.starts_with("<svg") && text.contains("<polyline"));
//! ```

use std::fmt::Write as _;

/// One line of the plot: `(seconds, bytes)` points in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

/// Line colours, in series order (repeating).
const COLOURS: [&str; 8] = [
    "#7f7f7f", "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
];
const MIB: f64 = (1u64 << 20) as f64;
const PANEL_H: f64 = 380.0;
const TOP: f64 = 50.0;
const LEFT: f64 = 70.0;
const GAP: f64 = 80.0;

/// A tick step of 1, 2 or 5 times a power of ten giving at most `ticks` steps over `span`.
pub fn nice_step(span: f64, ticks: usize) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / ticks.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * power)
}

/// The zoom panel's width in seconds: when the longest series lasts more than three times the
/// second longest, the second longest's end rounded up to a tick; else `None`.
pub fn zoom_for(series: &[Series]) -> Option<f64> {
    let mut ends: Vec<f64> = series
        .iter()
        .filter_map(|s| s.points.last().map(|p| p.0))
        .collect();
    ends.sort_by(f64::total_cmp);
    let (&longest, rest) = ends.split_last()?;
    let &second = rest.last()?;
    if second <= 0.0 || longest <= 3.0 * second {
        return None;
    }
    let step = nice_step(second, 6);
    Some((second / step).ceil() * step)
}

/// `text` safe inside SVG text and attributes.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Draws one panel at `x0` of width `w`: axes, ticks, and the series clipped to `x_max`.
fn panel(out: &mut String, id: usize, x0: f64, w: f64, x_max: f64, y_max: f64, s: &[Series]) {
    let sx = |t: f64| x0 + t / x_max * w;
    let sy = |b: f64| TOP + PANEL_H - b / y_max * PANEL_H;
    let _ = writeln!(
        out,
        r##"<clipPath id="clip{id}"><rect x="{x0}" y="{TOP}" width="{w}" height="{PANEL_H}"/></clipPath>"##
    );
    let _ = writeln!(
        out,
        r##"<rect x="{x0}" y="{TOP}" width="{w}" height="{PANEL_H}" fill="none" stroke="#333"/>"##
    );
    let y_step = nice_step(y_max / MIB, 6) * MIB;
    let mut y = 0.0;
    while y <= y_max + 1.0 {
        let py = sy(y);
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}</text>"##,
            x0 + w,
            x0 - 6.0,
            py + 4.0,
            y / MIB
        );
        y += y_step;
    }
    let x_step = nice_step(x_max, 8);
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let px = sx(x);
        let _ = writeln!(
            out,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{x}</text>"##,
            TOP + PANEL_H,
            TOP + PANEL_H + 18.0
        );
        x += x_step;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the guests were ready</text>"##,
        x0 + w / 2.0,
        TOP + PANEL_H + 38.0
    );
    for (i, series) in s.iter().enumerate() {
        let mut points = String::new();
        for &(t, b) in &series.points {
            let _ = write!(points, "{:.1},{:.1} ", sx(t), sy(b));
            if t > x_max {
                break;
            }
        }
        let _ = writeln!(
            out,
            r##"<polyline clip-path="url(#clip{id})" fill="none" stroke="{}" stroke-width="2" points="{}"/>"##,
            COLOURS[i % COLOURS.len()],
            points.trim_end()
        );
    }
}

/// The plot of `series` (bytes over seconds) titled `title`; with `zoom`, a second panel
/// showing the first `zoom` seconds.
pub fn svg(title: &str, series: &[Series], zoom: Option<f64>) -> String {
    let x_max = series
        .iter()
        .filter_map(|s| s.points.last().map(|p| p.0))
        .fold(1.0, f64::max);
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(MIB, f64::max);
    let y_step = nice_step(top * 1.05 / MIB, 6) * MIB;
    let y_max = (top * 1.05 / y_step).ceil() * y_step;
    let panel_w = if zoom.is_some() { 420.0 } else { 880.0 };
    let panels = if zoom.is_some() { 2.0 } else { 1.0 };
    let width = LEFT + panels * panel_w + (panels - 1.0) * GAP + 30.0;
    let legend_y = TOP + PANEL_H + 62.0;
    let height = legend_y + 20.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{:.1}" y="24" text-anchor="middle" font-size="15">{}</text>"##,
        width / 2.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">host memory (MiB)</text>"##,
        TOP + PANEL_H / 2.0
    );
    match zoom {
        Some(z) => {
            panel(&mut out, 0, LEFT, panel_w, z, y_max, series);
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">first {z} s</text>"##,
                LEFT + panel_w / 2.0,
                TOP - 8.0
            );
            let x1 = LEFT + panel_w + GAP;
            panel(&mut out, 1, x1, panel_w, x_max, y_max, series);
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">whole run</text>"##,
                x1 + panel_w / 2.0,
                TOP - 8.0
            );
        }
        None => panel(&mut out, 0, LEFT, panel_w, x_max, y_max, series),
    }
    let mut x = LEFT;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{legend_y:.1}">{}</text>"##,
            legend_y - 4.0,
            x + 24.0,
            legend_y - 4.0,
            x + 30.0,
            escape(&s.name)
        );
        x += 40.0 + 8.0 * s.name.len() as f64;
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, end: f64) -> Series {
        Series {
            name: name.into(),
            points: vec![(0.0, 2e9), (end / 2.0, 1.5e9), (end, 1e9)],
        }
    }

    #[test]
    fn ticks_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(10.0, 5), 2.0);
        assert_eq!(nice_step(300.0, 8), 50.0);
        assert_eq!(nice_step(1800.0, 6), 500.0);
        assert_eq!(nice_step(0.7, 7), 0.1);
        assert_eq!(nice_step(0.0, 5), 1.0);
    }

    #[test]
    fn zoom_only_when_one_run_is_much_longer() {
        let short = [series("a", 10.0), series("b", 20.0), series("c", 25.0)];
        assert_eq!(zoom_for(&short), None);
        let long = [series("a", 8.0), series("slow", 300.0), series("b", 23.0)];
        assert_eq!(zoom_for(&long), Some(25.0));
        assert_eq!(zoom_for(&[series("a", 8.0)]), None);
        assert_eq!(zoom_for(&[]), None);
    }

    #[test]
    fn one_polyline_per_series_and_panel_with_legend() {
        let s = [
            series("none", 5.0),
            series("ksm-default", 300.0),
            series("a&b", 9.0),
        ];
        let one = svg("t", &s, None);
        assert_eq!(one.matches("<polyline").count(), 3);
        assert!(one.contains(">a&amp;b</text>"));
        assert!(one.ends_with("</svg>\n"));
        let two = svg("t", &s, zoom_for(&s));
        assert_eq!(two.matches("<polyline").count(), 6);
        assert!(two.contains("first 10 s"));
        // The zoomed panel stops each line at the first point past its edge.
        let zoomed = two.split("first 10 s").next().unwrap_or_default();
        let long_line = zoomed
            .lines()
            .filter(|l| l.starts_with("<polyline"))
            .nth(1)
            .unwrap_or_default();
        assert_eq!(long_line.matches(',').count(), 2);
    }

    #[test]
    fn points_map_into_the_panel() {
        let s = [Series {
            name: "x".into(),
            points: vec![(0.0, 0.0), (10.0, 1000.0 * MIB)],
        }];
        let text = svg("t", &s, None);
        // y axis to 1050 MiB rounded up to a 200 MiB tick: 1200; x axis to 10 s.
        let bottom = TOP + PANEL_H;
        let y_top = bottom - 1000.0 / 1200.0 * PANEL_H;
        let expected = format!(
            "points=\"{LEFT:.1},{bottom:.1} {:.1},{y_top:.1}\"",
            LEFT + 880.0
        );
        assert!(text.contains(&expected), "{text}");
    }
}
