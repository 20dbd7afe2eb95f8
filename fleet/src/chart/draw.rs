//! Drawing a laid-out chart with plotters' SVG backend, in pixel coordinates: every
//! position comes from [`Layout`].

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::layout::{
    bold_px, fit, header_text, note_text, row_label, swatch_width, text_width, tick_label,
    verdict_word, Layout, Line, Swatch, HEADER_PX, TEXT_PX, TITLE_PX,
};
use super::{Bar, BarKind, Basis, ChartError, Row, Timeline, Verdict};
use crate::units::fmt_secs;

/// Okabe-Ito colours where they matter, told apart by most colour-blind readers.
const WAITING: RGBColor = RGBColor(0xBB, 0xBB, 0xBB);
const SETUP: RGBColor = RGBColor(0xE6, 0x9F, 0x00);
const FLOW: RGBColor = RGBColor(0x00, 0x72, 0xB2);
const MARGIN: RGBColor = RGBColor(0x9C, 0xCB, 0xEB);
const STALLED: RGBColor = RGBColor(0xCC, 0x79, 0xA7);
const DEADLINE: RGBColor = RGBColor(0xD6, 0x27, 0x28);
const NOW: RGBColor = RGBColor(0x44, 0x44, 0x44);
const MISS_TEXT: RGBColor = RGBColor(0xC0, 0x1B, 0x1B);
const MISS_BG: RGBColor = RGBColor(0xFD, 0xE4, 0xE1);
const RISK_TEXT: RGBColor = RGBColor(0xA6, 0x5E, 0x00);
const RISK_BG: RGBColor = RGBColor(0xFF, 0xF1, 0xCC);
const STRIPE: RGBColor = RGBColor(0xF4, 0xF4, 0xF4);
const GRID: RGBColor = RGBColor(0xDD, 0xDD, 0xDD);
const TEXT: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x77, 0x77, 0x77);
const FONT: &str = "sans-serif";

/// A bar's colour.
fn kind_colour(k: BarKind) -> RGBColor {
    match k {
        BarKind::Waiting => WAITING,
        BarKind::Setup => SETUP,
        BarKind::Flow => FLOW,
        BarKind::Margin => MARGIN,
        BarKind::Stalled => STALLED,
    }
}

/// A label's colour for a verdict.
fn verdict_colour(v: Verdict) -> RGBColor {
    match v {
        Verdict::Misses | Verdict::Failed => MISS_TEXT,
        Verdict::AtRisk => RISK_TEXT,
        Verdict::Skipped => MUTED,
        Verdict::Saved | Verdict::Pending => TEXT,
    }
}

/// Text as SVG may hold it: control characters (which XML forbids) replaced.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

/// A time for a person: seconds, or minutes from two minutes on.
fn when(t: f64) -> String {
    if t.abs() >= 120.0 {
        format!("{:.1} min", t / 60.0)
    } else {
        fmt_secs(t)
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Thin wrappers over plotters, in pixels, with errors turned into [`ChartError`].
struct Painter<'a> {
    area: Area<'a>,
}

fn drawing<E: std::fmt::Display>(e: E) -> ChartError {
    ChartError::Draw(e.to_string())
}

impl Painter<'_> {
    fn rect(
        &self,
        a: (i32, i32),
        b: (i32, i32),
        c: RGBColor,
        filled: bool,
    ) -> Result<(), ChartError> {
        let style = ShapeStyle {
            color: c.to_rgba(),
            filled,
            stroke_width: 1,
        };
        self.area
            .draw(&Rectangle::new([a, b], style))
            .map_err(drawing)
    }

    fn line(&self, points: Vec<(i32, i32)>, c: RGBColor, width: u32) -> Result<(), ChartError> {
        let style = ShapeStyle {
            color: c.to_rgba(),
            filled: false,
            stroke_width: width,
        };
        self.area
            .draw(&PathElement::new(points, style))
            .map_err(drawing)
    }

    fn triangle(&self, points: Vec<(i32, i32)>, c: RGBColor) -> Result<(), ChartError> {
        self.area
            .draw(&Polygon::new(points, c.filled()))
            .map_err(drawing)
    }

    #[allow(clippy::too_many_arguments)]
    fn text(
        &self,
        s: &str,
        at: (i32, i32),
        px: i32,
        c: RGBColor,
        bold: bool,
        h: HPos,
        v: VPos,
    ) -> Result<(), ChartError> {
        if s.is_empty() {
            return Ok(());
        }
        // plotters writes font-size = size / 1.24.
        let mut font = (FONT, f64::from(px) * 1.24).into_font();
        if bold {
            font = font.style(FontStyle::Bold);
        }
        let style = TextStyle::from(font).color(&c).pos(Pos::new(h, v));
        self.area
            .draw(&Text::new(clean(s), at, style))
            .map_err(drawing)
    }
}

/// The SVG document.
pub(crate) fn svg(t: &Timeline, l: &Layout) -> Result<String, ChartError> {
    let mut buf = String::new();
    {
        let size = (l.width.max(1) as u32, l.height.max(1) as u32);
        let area = SVGBackend::with_string(&mut buf, size).into_drawing_area();
        area.fill(&WHITE).map_err(drawing)?;
        let p = Painter { area };
        header(&p, t, l)?;
        backgrounds(&p, t, l)?;
        grid(&p, l)?;
        rows(&p, t, l)?;
        markers(&p, t, l)?;
        p.area.present().map_err(drawing)?;
    }
    Ok(buf)
}

/// Title, summary, the note on rows left out, the legend.
fn header(p: &Painter, t: &Timeline, l: &Layout) -> Result<(), ChartError> {
    let max_w = l.width - 2 * l.label_x;
    p.text(
        &fit(&t.title, TITLE_PX, max_w),
        (l.label_x, l.title_y),
        TITLE_PX,
        TEXT,
        true,
        HPos::Left,
        VPos::Top,
    )?;
    p.text(
        &fit(&summary(t), TEXT_PX, max_w),
        (l.label_x, l.summary_y),
        TEXT_PX,
        TEXT,
        false,
        HPos::Left,
        VPos::Top,
    )?;
    if let Some(y) = l.truncated_y {
        let s = &l.selection;
        let which = if s.hidden_notable == 0 {
            "every VM that misses, failed or is at risk is drawn".to_string()
        } else {
            format!(
                "{} of them miss, failed or are at risk: too many to draw",
                s.hidden_notable
            )
        };
        let text = format!(
            "showing {} of {} VMs: {} left out ({which}); each link's header says how many",
            s.shown,
            s.shown + s.hidden,
            s.hidden
        );
        p.text(
            &fit(&text, bold_px(TEXT_PX), max_w),
            (l.label_x, y),
            TEXT_PX,
            MISS_TEXT,
            true,
            HPos::Left,
            VPos::Top,
        )?;
    }
    for item in &l.legend {
        let (x, y) = (item.x, item.y);
        let w = swatch_width(item.swatch);
        match item.swatch {
            Swatch::Bar(kind, basis) => {
                let half = if kind == BarKind::Waiting { 2 } else { 5 };
                let filled = !(basis == Basis::Planned && l.mixed);
                p.rect((x, y - half), (x + w, y + half), kind_colour(kind), filled)?;
            }
            Swatch::Deadline => {
                p.line(vec![(x + w / 2, y - 8), (x + w / 2, y + 8)], DEADLINE, 2)?
            }
            Swatch::Now => p.line(vec![(x + w / 2, y - 8), (x + w / 2, y + 8)], NOW, 1)?,
            Swatch::Label(v) => p.text(
                verdict_word(v),
                (x, y),
                TEXT_PX,
                verdict_colour(v),
                true,
                HPos::Left,
                VPos::Center,
            )?,
        }
        p.text(
            &item.text,
            (x + w + 6, y),
            TEXT_PX,
            TEXT,
            false,
            HPos::Left,
            VPos::Center,
        )?;
    }
    // Axis labels above the rows.
    let first = l
        .axis
        .ticks
        .first()
        .map_or(0, |&t| text_width(&tick_label(t, l.axis.step), TEXT_PX - 1));
    p.text(
        "time since the start",
        (l.scale.x0 - first / 2 - 8, l.axis_top_y),
        TEXT_PX - 1,
        MUTED,
        false,
        HPos::Right,
        VPos::Center,
    )?;
    p.text(
        "ends",
        (l.note_x, l.marker_y),
        TEXT_PX - 1,
        MUTED,
        false,
        HPos::Left,
        VPos::Center,
    )?;
    axis_labels(p, l, l.axis_top_y)?;
    if let Some(y) = l.axis_bottom_y {
        axis_labels(p, l, y)?;
    }
    Ok(())
}

/// One line: "12 VMs on 2 links: 10 saved, 1 misses the deadline, 1 skipped; deadline ...".
fn summary(t: &Timeline) -> String {
    let mut links: Vec<&str> = t.rows.iter().map(|r| r.link.as_str()).collect();
    links.sort_unstable();
    links.dedup();
    let count = |v: Verdict| t.rows.iter().filter(|r| r.verdict == v).count();
    let misses = count(Verdict::Misses);
    let parts: Vec<String> = [
        (count(Verdict::Saved), "saved".to_string()),
        (count(Verdict::AtRisk), "at risk".into()),
        (
            misses,
            if misses == 1 {
                "misses the deadline".into()
            } else {
                "miss the deadline".into()
            },
        ),
        (count(Verdict::Failed), "failed".into()),
        (count(Verdict::Skipped), "skipped".into()),
        (count(Verdict::Pending), "under way or waiting".into()),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    let mut s = format!(
        "{} {} on {} {}",
        t.rows.len(),
        if t.rows.len() == 1 { "VM" } else { "VMs" },
        links.len(),
        if links.len() == 1 { "link" } else { "links" }
    );
    if !parts.is_empty() {
        s.push_str(": ");
        s.push_str(&parts.join(", "));
    }
    if let Some(d) = t.deadline_s {
        s.push_str(&format!("; deadline at {}", when(d)));
    }
    if let Some(n) = t.now_s {
        s.push_str(&format!("; drawn at {}", when(n)));
    }
    s
}

fn axis_labels(p: &Painter, l: &Layout, y: i32) -> Result<(), ChartError> {
    for &tick in &l.axis.ticks {
        p.text(
            &tick_label(tick, l.axis.step),
            (l.scale.x(tick), y),
            TEXT_PX - 1,
            MUTED,
            false,
            HPos::Center,
            VPos::Center,
        )?;
    }
    Ok(())
}

/// Row backgrounds: red for misses and failures, yellow for risks, stripes otherwise.
fn backgrounds(p: &Painter, t: &Timeline, l: &Layout) -> Result<(), ChartError> {
    let right = l.note_x + l.note_w;
    for line in &l.lines {
        if let Line::Row { row, y, h, stripe } = *line {
            let bg = match t.rows[row].verdict {
                Verdict::Misses | Verdict::Failed => Some(MISS_BG),
                Verdict::AtRisk => Some(RISK_BG),
                _ => stripe.then_some(STRIPE),
            };
            if let Some(c) = bg {
                p.rect((l.label_x, y), (right, y + h), c, true)?;
            }
        }
    }
    Ok(())
}

/// Vertical lines at the ticks, across the rows.
fn grid(p: &Painter, l: &Layout) -> Result<(), ChartError> {
    for &tick in &l.axis.ticks {
        let x = l.scale.x(tick);
        p.line(vec![(x, l.rows_top), (x, l.rows_bottom)], GRID, 1)?;
    }
    Ok(())
}

/// Headers, labels, bars, notes.
fn rows(p: &Painter, t: &Timeline, l: &Layout) -> Result<(), ChartError> {
    let right = l.note_x + l.note_w;
    let label_w = l.scale.x0 - l.label_x - 12;
    for line in &l.lines {
        match *line {
            Line::Header { group, y, h } => {
                let g = &l.selection.groups[group];
                p.line(vec![(l.label_x, y), (right, y)], GRID, 1)?;
                p.text(
                    &fit(&header_text(g), bold_px(HEADER_PX), l.scale.x1 - l.label_x),
                    (l.label_x, y + h / 2),
                    HEADER_PX,
                    TEXT,
                    true,
                    HPos::Left,
                    VPos::Center,
                )?;
            }
            Line::Row { row, y, h, .. } => {
                let r = &t.rows[row];
                let notable = matches!(r.verdict, Verdict::Misses | Verdict::Failed);
                let est_px = if notable {
                    bold_px(l.label_px)
                } else {
                    l.label_px
                };
                p.text(
                    &fit(&row_label(r), est_px, label_w),
                    (l.label_x + 8, y + h / 2),
                    l.label_px,
                    verdict_colour(r.verdict),
                    notable,
                    HPos::Left,
                    VPos::Center,
                )?;
                bars(p, r, l, y, h)?;
                p.text(
                    &fit(&note_text(r), est_px, l.note_w),
                    (l.note_x, y + h / 2),
                    l.label_px,
                    verdict_colour(r.verdict),
                    notable,
                    HPos::Left,
                    VPos::Center,
                )?;
            }
            Line::Empty { y, h } => {
                p.text(
                    "no VMs to show",
                    ((l.scale.x0 + l.scale.x1) / 2, y + h / 2),
                    TEXT_PX,
                    MUTED,
                    false,
                    HPos::Center,
                    VPos::Center,
                )?;
            }
        }
    }
    Ok(())
}

/// The vertical extent of a bar in a row at `y`, `h` tall.
pub(crate) fn bar_band(kind: BarKind, basis: Basis, mixed: bool, y: i32, h: i32) -> (i32, i32) {
    let pad = (h / 6).max(1);
    let (mut a, mut b) = (y + pad, y + h - pad);
    if mixed {
        let inner = b - a;
        if basis == Basis::Planned {
            b = a + (inner * 2 / 5).max(1);
        } else {
            a += inner / 2;
        }
    }
    if kind == BarKind::Waiting {
        let mid = (a + b) / 2;
        let half = ((b - a) / 6).max(1);
        (mid - half, mid + half)
    } else {
        (a, b)
    }
}

/// A row's bars: waiting first, then planned, then measured on top; an arrow where a bar
/// goes on past the axis; a cross where a measured evacuation failed.
fn bars(p: &Painter, r: &Row, l: &Layout, y: i32, h: i32) -> Result<(), ChartError> {
    let s = &l.scale;
    let mut sorted: Vec<&Bar> = r.bars.iter().collect();
    sorted.sort_by_key(|b| {
        (
            b.kind != BarKind::Waiting,
            b.basis == Basis::Measured,
            b.kind == BarKind::Stalled,
        )
    });
    for b in sorted {
        let (top, bottom) = bar_band(b.kind, b.basis, l.mixed, y, h);
        let c = kind_colour(b.kind);
        if b.start_s < s.t1 {
            let xa = s.x(b.start_s);
            let xb = s.x(b.end_s).max(xa + 1);
            let filled = !(b.basis == Basis::Planned && l.mixed);
            p.rect((xa, top), (xb, bottom), c, filled)?;
        }
        if b.end_s > s.t1 {
            let mid = (top + bottom) / 2;
            let half = ((bottom - top) / 2).max(3);
            p.triangle(
                vec![
                    (s.x1 + 1, mid - half),
                    (s.x1 + 7, mid),
                    (s.x1 + 1, mid + half),
                ],
                c,
            )?;
        }
    }
    if r.verdict == Verdict::Failed {
        let end = r
            .bars
            .iter()
            .filter(|b| b.basis == Basis::Measured)
            .map(|b| b.end_s)
            .fold(f64::NEG_INFINITY, f64::max);
        if end.is_finite() && end <= s.t1 {
            let x = s.x(end);
            let d = (h / 2 - 1).max(2);
            let m = y + h / 2;
            p.line(vec![(x - d, m - d), (x + d, m + d)], MISS_TEXT, 2)?;
            p.line(vec![(x - d, m + d), (x + d, m - d)], MISS_TEXT, 2)?;
        }
    }
    Ok(())
}

/// The deadline and now, as vertical lines over the rows with their labels above.
fn markers(p: &Painter, t: &Timeline, l: &Layout) -> Result<(), ChartError> {
    let label_y = l.marker_y;
    let s = &l.scale;
    let top = label_y - 7;
    if let Some(n) = t.now_s {
        let x = s.x(n);
        p.line(vec![(x, top), (x, l.rows_bottom)], NOW, 1)?;
        let text = format!("now {}", when(n));
        let (at, h) = if x - text_width(&text, TEXT_PX) - 4 >= s.x0 {
            (x - 4, HPos::Right)
        } else {
            (x + 4, HPos::Left)
        };
        p.text(&text, (at, label_y), TEXT_PX, NOW, false, h, VPos::Center)?;
    }
    if let Some(d) = t.deadline_s {
        let x = s.x(d);
        p.line(vec![(x, top), (x, l.rows_bottom)], DEADLINE, 2)?;
        let text = format!("deadline {}", when(d));
        let (at, h) = if x + 4 + text_width(&text, bold_px(TEXT_PX)) <= l.note_x - 8 {
            (x + 4, HPos::Left)
        } else {
            (x - 4, HPos::Right)
        };
        p.text(
            &text,
            (at, label_y),
            TEXT_PX,
            DEADLINE,
            true,
            h,
            VPos::Center,
        )?;
    }
    Ok(())
}
