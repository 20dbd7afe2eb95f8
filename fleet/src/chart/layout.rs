//! The chart's geometry, apart from drawing: which rows are drawn, where each goes, how
//! times map to pixels, the axis' ticks. Pure arithmetic, tested exactly.

use std::collections::HashMap;

use super::{BarKind, Basis, ChartOptions, Row, Timeline, Verdict};

/// Without a horizon, the axis ends at most this many deadlines from 0.
pub(crate) const CLIP_FACTOR: f64 = 1.5;
/// Rows share about this many pixels, each within [`MIN_ROW_PX`, `MAX_ROW_PX`].
const ROWS_TARGET_PX: i32 = 720;
/// The thinnest row.
pub(crate) const MIN_ROW_PX: i32 = 8;
/// The tallest row.
pub(crate) const MAX_ROW_PX: i32 = 24;
/// Ticks on the time axis at most (plus the ends).
pub(crate) const MAX_TICKS: usize = 10;
/// Times beyond ± this (about 30 million years) are drawn at it.
const LIMIT_S: f64 = 1e15;
/// From this many rows on, the time axis is drawn below the rows too.
pub(crate) const AXIS_BELOW_FROM: usize = 26;
/// Average glyph width of a sans-serif font, per pixel of font size (an estimate: SVG
/// viewers pick the font).
const CHAR_W: f64 = 0.6;

pub(crate) const TITLE_PX: i32 = 18;
pub(crate) const TEXT_PX: i32 = 12;
pub(crate) const HEADER_PX: i32 = 12;
const LEGEND_LINE_PX: i32 = 20;
const SWATCH_PX: i32 = 22;

/// Maps times to x pixels: `t0` to `x0`, `t1` to `x1`, linearly, rounded to the nearest
/// pixel, clamped to the range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct TimeScale {
    pub t0: f64,
    pub t1: f64,
    pub x0: i32,
    pub x1: i32,
}

impl TimeScale {
    /// The x pixel of `t`: monotone, `x(t0) == x0`, `x(t1) == x1`, anything outside the
    /// range at its end.
    pub fn x(&self, t: f64) -> i32 {
        let span = self.t1 - self.t0;
        let f = if span > 0.0 && span.is_finite() {
            (t - self.t0) / span
        } else {
            0.0
        };
        // NaN (not reachable after validation) lands at x0.
        let f = if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) };
        self.x0 + (f * f64::from(self.x1 - self.x0)).round() as i32
    }
}

/// The time axis: its ends are ticks, `step` apart.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Axis {
    pub step: f64,
    pub ticks: Vec<f64>,
}

/// The range of times to show: from the earliest time (0 at the latest) to the last
/// bar's end, or `now_s` if later, and at least the deadline; but at most
/// [`CLIP_FACTOR`] × the deadline for the bars (a VM that would finish a day late must
/// not squash the rest). `horizon_s` overrides the end.
pub(crate) fn time_range(t: &Timeline, horizon_s: Option<f64>) -> (f64, f64) {
    let mut lo = 0.0f64;
    let mut data_hi = 0.0f64;
    for b in t.rows.iter().flat_map(|r| &r.bars) {
        lo = lo.min(b.start_s);
        data_hi = data_hi.max(b.end_s);
    }
    let mut hi = match t.deadline_s {
        Some(d) => {
            lo = lo.min(d);
            if d > 0.0 && data_hi > CLIP_FACTOR * d {
                CLIP_FACTOR * d
            } else {
                data_hi.max(d)
            }
        }
        None => data_hi,
    };
    if let Some(n) = t.now_s {
        lo = lo.min(n);
        hi = hi.max(n);
    }
    if let Some(h) = horizon_s {
        hi = h;
    }
    let lo = lo.clamp(-LIMIT_S, LIMIT_S);
    let mut hi = hi.clamp(-LIMIT_S, LIMIT_S);
    if hi <= lo {
        hi = lo + 1.0;
    }
    (lo, hi)
}

/// Steps a time axis may take, in seconds, ascending: 1-2-5 up to 50 s, then whole
/// minutes, hours and days.
fn nice_steps() -> impl Iterator<Item = f64> {
    let sub_minute = (-3..=1).flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)));
    let clock = [
        60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0,
        43200.0, 86400.0,
    ];
    let days = (0..16).flat_map(|e| [2.0, 5.0, 10.0].map(|m| m * 86400.0 * 10f64.powi(e)));
    sub_minute.chain(clock).chain(days)
}

/// The smallest nice step that cuts `span_s` into at most `max_ticks` parts.
pub(crate) fn tick_step(span_s: f64, max_ticks: usize) -> f64 {
    let want = span_s / max_ticks.max(1) as f64;
    nice_steps()
        .find(|&s| s >= want)
        .unwrap_or_else(|| want.max(1.0))
}

/// The axis over `[lo, hi]`: its ends rounded out to whole steps.
pub(crate) fn axis(lo: f64, hi: f64) -> Axis {
    let step = tick_step(hi - lo, MAX_TICKS);
    let t0 = (lo / step).floor() * step;
    let mut n = ((hi - t0) / step).ceil().max(1.0) as usize;
    // Rounding may leave the last tick just short of `hi`.
    if t0 + n as f64 * step < hi {
        n += 1;
    }
    let ticks = (0..=n).map(|i| t0 + i as f64 * step + 0.0).collect();
    Axis { step, ticks }
}

/// A tick's label: seconds below a one-minute step, then minutes, hours, days.
pub(crate) fn tick_label(t: f64, step: f64) -> String {
    let t = t + 0.0; // no "-0"
    if step < 60.0 {
        let decimals = (-step.log10() - 1e-9).ceil().max(0.0) as usize;
        format!("{t:.decimals$} s")
    } else if step < 3600.0 {
        format!("{:.0} min", t / 60.0 + 0.0)
    } else if step < 86400.0 {
        format!("{:.0} h", t / 3600.0 + 0.0)
    } else {
        format!("{:.0} d", t / 86400.0 + 0.0)
    }
}

/// A row's height for `rows` rows drawn: tall for a few, thinner for many.
pub(crate) fn row_height(rows: usize) -> i32 {
    let n = i32::try_from(rows.max(1)).unwrap_or(i32::MAX);
    (ROWS_TARGET_PX / n).clamp(MIN_ROW_PX, MAX_ROW_PX)
}

/// The font size of a row's label, for a row `row_h` pixels tall.
pub(crate) fn label_px(row_h: i32) -> i32 {
    (row_h - 4).clamp(7, TEXT_PX)
}

/// Estimated width of `text` in a font of `px` pixels.
pub(crate) fn text_width(text: &str, px: i32) -> i32 {
    (text.chars().count() as f64 * f64::from(px) * CHAR_W).ceil() as i32
}

/// The font size whose regular glyphs are as wide as bold ones of `px` (for estimates).
pub(crate) fn bold_px(px: i32) -> i32 {
    px + px / 6 + 1
}

/// `text` cut to at most `max_px` wide in a font of `px` pixels, with "…" if cut.
pub(crate) fn fit(text: &str, px: i32, max_px: i32) -> String {
    let per = f64::from(px) * CHAR_W;
    let max_chars = (f64::from(max_px.max(0)) / per).floor() as usize;
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// A row's label: the VM's name, and its priority when it is not 1.
pub(crate) fn row_label(r: &Row) -> String {
    if r.priority == 1.0 {
        r.vm.clone()
    } else {
        format!("{} · prio {}", r.vm, r.priority)
    }
}

/// What the note column says for a row: the verdict when it is not good news, then the
/// row's note.
pub(crate) fn note_text(r: &Row) -> String {
    match (verdict_word(r.verdict), r.note.as_deref()) {
        ("", Some(n)) => n.to_string(),
        (w, Some(n)) if !n.is_empty() => format!("{w} {n}"),
        (w, _) => w.to_string(),
    }
}

/// The word for a verdict in the note column; none for good news or none yet.
pub(crate) fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Misses => "MISSES",
        Verdict::AtRisk => "AT RISK",
        Verdict::Failed => "FAILED",
        Verdict::Skipped => "skipped",
        Verdict::Saved | Verdict::Pending => "",
    }
}

/// One link's rows.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Group {
    pub link: String,
    /// Indices into the timeline's rows, in drawing order.
    pub rows: Vec<usize>,
    /// The link's rows, drawn or not.
    pub total: usize,
    /// Of the rows not drawn, how many miss, failed or are at risk.
    pub hidden_notable: usize,
}

/// Which rows are drawn.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Selection {
    pub groups: Vec<Group>,
    pub shown: usize,
    /// Rows left out.
    pub hidden: usize,
    /// Of those, how many miss, failed or are at risk.
    pub hidden_notable: usize,
}

/// Shares `budget` rows among groups of `sizes` rows, max-min fairly: a group smaller
/// than its share gets all its rows, the others share the rest equally (the earlier
/// groups take the remainder).
pub(crate) fn quotas(sizes: &[usize], budget: usize) -> Vec<usize> {
    let mut quota = vec![0; sizes.len()];
    let mut open: Vec<usize> = (0..sizes.len()).filter(|&g| sizes[g] > 0).collect();
    let mut left = budget;
    while left > 0 && !open.is_empty() {
        let share = (left / open.len()).max(1);
        let mut next = Vec::with_capacity(open.len());
        for &g in &open {
            let take = share.min(sizes[g] - quota[g]).min(left);
            quota[g] += take;
            left -= take;
            if quota[g] < sizes[g] {
                next.push(g);
            }
        }
        open = next;
    }
    quota
}

/// Groups rows by link (links in the order they first appear, rows in their order) and
/// keeps at most `max_rows`, shared fairly among the links ([`quotas`]); within a link,
/// first every notable row ([`Verdict::is_notable`]), then the others, each in drawing
/// order.
pub(crate) fn select(rows: &[Row], max_rows: usize) -> Selection {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut members: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let g = *index.entry(r.link.as_str()).or_insert_with(|| {
            members.push((r.link.as_str(), Vec::new()));
            members.len() - 1
        });
        members[g].1.push(i);
    }
    let sizes: Vec<usize> = members.iter().map(|(_, m)| m.len()).collect();
    let quota = quotas(&sizes, max_rows);
    let mut keep = vec![false; rows.len()];
    for ((_, m), q) in members.iter().zip(quota) {
        let mut budget = q;
        for notable in [true, false] {
            for &i in m {
                if budget > 0 && !keep[i] && rows[i].verdict.is_notable() == notable {
                    keep[i] = true;
                    budget -= 1;
                }
            }
        }
    }
    let hidden_notable = |m: &[usize]| {
        m.iter()
            .filter(|&&i| !keep[i] && rows[i].verdict.is_notable())
            .count()
    };
    let groups: Vec<Group> = members
        .iter()
        .map(|(link, m)| Group {
            link: link.to_string(),
            total: m.len(),
            rows: m.iter().copied().filter(|&i| keep[i]).collect(),
            hidden_notable: hidden_notable(m),
        })
        .collect();
    let shown = groups.iter().map(|g| g.rows.len()).sum();
    Selection {
        hidden: rows.len() - shown,
        hidden_notable: groups.iter().map(|g| g.hidden_notable).sum(),
        groups,
        shown,
    }
}

/// A horizontal band of the rows area.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Line {
    /// A link's header.
    Header { group: usize, y: i32, h: i32 },
    /// A VM's row; `stripe` every other row, for the eye.
    Row {
        row: usize,
        y: i32,
        h: i32,
        stripe: bool,
    },
    /// Nothing to draw.
    Empty { y: i32, h: i32 },
}

/// What a legend entry shows beside its text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Swatch {
    Bar(BarKind, Basis),
    Deadline,
    Now,
    Label(Verdict),
}

/// A legend entry, placed: the swatch at `x`, the text after it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LegendItem {
    pub swatch: Swatch,
    pub text: String,
    pub x: i32,
    /// The middle of its line.
    pub y: i32,
}

/// Where everything goes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Layout {
    pub width: i32,
    pub height: i32,
    /// Left edge of the labels.
    pub label_x: i32,
    /// The plot's time scale (its x0 and x1 are the plot's edges).
    pub scale: TimeScale,
    pub axis: Axis,
    /// Left edge of the notes.
    pub note_x: i32,
    pub note_w: i32,
    pub row_h: i32,
    pub label_px: i32,
    /// Top of the title.
    pub title_y: i32,
    /// Top of the summary line.
    pub summary_y: i32,
    /// Top of the line saying rows were left out, if they were.
    pub truncated_y: Option<i32>,
    pub legend: Vec<LegendItem>,
    /// Middle of the tick labels above the rows.
    pub axis_top_y: i32,
    /// Middle of the deadline's and now's labels and of the notes' heading.
    pub marker_y: i32,
    pub rows_top: i32,
    pub rows_bottom: i32,
    /// Middle of the tick labels below the rows, for many rows.
    pub axis_bottom_y: Option<i32>,
    pub lines: Vec<Line>,
    pub selection: Selection,
    /// Whether some row has both planned and measured bars (planned bars are then drawn
    /// outlined, above the measured ones).
    pub mixed: bool,
}

impl Layout {
    /// Lays `t` out (it was validated).
    pub fn new(t: &Timeline, o: &ChartOptions) -> Layout {
        let width = i32::try_from(o.width_px).unwrap_or(i32::MAX / 2);
        let selection = select(&t.rows, o.max_rows);
        let row_h = row_height(selection.shown);
        let label_px = label_px(row_h);
        let header_h = row_h.max(HEADER_PX + 6);
        let mixed = t.rows.iter().any(|r| {
            r.bars.iter().any(|b| b.basis == Basis::Planned)
                && r.bars.iter().any(|b| b.basis == Basis::Measured)
        });

        // Columns: labels, plot, notes.
        let shown_rows = || selection.groups.iter().flat_map(|g| &g.rows);
        let widest_label = shown_rows()
            .map(|&i| {
                let r = &t.rows[i];
                let px = if matches!(r.verdict, Verdict::Misses | Verdict::Failed) {
                    bold_px(label_px)
                } else {
                    label_px
                };
                text_width(&row_label(r), px)
            })
            .max()
            .unwrap_or(0);
        let label_x = 10;
        let label_w = (widest_label + 16).clamp(150, width / 4);
        let widest_note = shown_rows()
            .map(|&i| text_width(&note_text(&t.rows[i]), bold_px(label_px)))
            .max()
            .unwrap_or(0);
        let note_w = (widest_note + 12).clamp(90, width / 4);
        let x0 = label_x + label_w;
        let x1 = width - note_w - 10;
        let note_x = x1 + 8;

        let (lo, hi) = time_range(t, o.horizon_s);
        let axis = axis(lo, hi);
        let scale = TimeScale {
            t0: axis.ticks.first().copied().unwrap_or(lo),
            t1: axis.ticks.last().copied().unwrap_or(hi),
            x0,
            x1,
        };

        let mut y = 12;
        let title_y = y;
        y += TITLE_PX + 8;
        let summary_y = y;
        y += TEXT_PX + 8;
        let truncated_y = (selection.hidden > 0).then(|| {
            let at = y;
            y += TEXT_PX + 8;
            at
        });
        let (legend, legend_lines) = legend(t, mixed, label_x, width - 10, y);
        y += legend_lines * LEGEND_LINE_PX + 6;
        let axis_top_y = y + 8;
        y += 18;
        let marker_y = y + 7;
        y += 16;
        let rows_top = y;
        let mut lines = Vec::new();
        let mut stripe = false;
        for (gi, g) in selection.groups.iter().enumerate() {
            lines.push(Line::Header {
                group: gi,
                y,
                h: header_h,
            });
            y += header_h;
            for &row in &g.rows {
                lines.push(Line::Row {
                    row,
                    y,
                    h: row_h,
                    stripe,
                });
                stripe = !stripe;
                y += row_h;
            }
        }
        if lines.is_empty() {
            lines.push(Line::Empty { y, h: MAX_ROW_PX });
            y += MAX_ROW_PX;
        }
        let rows_bottom = y;
        let axis_bottom_y = (selection.shown >= AXIS_BELOW_FROM).then(|| {
            let at = y + 10;
            y += 20;
            at
        });
        let height = y + 12;
        Layout {
            width,
            height,
            label_x,
            scale,
            axis,
            note_x,
            note_w,
            row_h,
            label_px,
            title_y,
            summary_y,
            truncated_y,
            legend,
            axis_top_y,
            marker_y,
            rows_top,
            rows_bottom,
            axis_bottom_y,
            lines,
            selection,
            mixed,
        }
    }
}

/// A link's header: its name, how many VMs, how many of them are not drawn.
pub(crate) fn header_text(g: &Group) -> String {
    let vms = if g.total == 1 { "VM" } else { "VMs" };
    let hidden = g.total - g.rows.len();
    if hidden > 0 && g.hidden_notable > 0 {
        format!(
            "{} · {} {vms} ({hidden} not drawn, {} of them miss, failed or are at risk)",
            g.link, g.total, g.hidden_notable
        )
    } else if hidden > 0 {
        format!("{} · {} {vms} ({hidden} not drawn)", g.link, g.total)
    } else {
        format!("{} · {} {vms}", g.link, g.total)
    }
}

/// The legend's entries, wrapped into lines from `x0` to `x1` starting at `y`; and how
/// many lines it takes.
fn legend(t: &Timeline, mixed: bool, x0: i32, x1: i32, y: i32) -> (Vec<LegendItem>, i32) {
    let has = |k: BarKind| t.rows.iter().flat_map(|r| &r.bars).any(|b| b.kind == k);
    let measured = t
        .rows
        .iter()
        .flat_map(|r| &r.bars)
        .any(|b| b.basis == Basis::Measured);
    let basis = if measured {
        Basis::Measured
    } else {
        Basis::Planned
    };
    let mut entries = vec![
        (
            Swatch::Bar(BarKind::Waiting, basis),
            "waiting for its turn (at the source)".to_string(),
        ),
        (
            Swatch::Bar(BarKind::Setup, basis),
            "setup: handshake, switchover (at the source)".into(),
        ),
        (
            Swatch::Bar(BarKind::Flow, basis),
            "stale pages crossing (at the destination, exposed)".into(),
        ),
    ];
    if has(BarKind::Stalled) {
        entries.push((
            Swatch::Bar(BarKind::Stalled, Basis::Measured),
            "stalled: not moving, its source alive (its place given to the others)".into(),
        ));
    }
    if has(BarKind::Margin) {
        entries.push((
            Swatch::Bar(BarKind::Margin, Basis::Planned),
            "extra time if the links deliver the margin less".into(),
        ));
    }
    if mixed {
        entries.push((
            Swatch::Bar(BarKind::Flow, Basis::Planned),
            "planned (outlined, above the run)".into(),
        ));
    }
    if t.deadline_s.is_some() {
        entries.push((Swatch::Deadline, "deadline".into()));
    }
    if t.now_s.is_some() {
        entries.push((Swatch::Now, "now".into()));
    }
    entries.push((
        Swatch::Label(Verdict::Misses),
        "misses the deadline (red row)".into(),
    ));
    if t.rows.iter().any(|r| r.verdict == Verdict::AtRisk) {
        entries.push((
            Swatch::Label(Verdict::AtRisk),
            "makes it only at the links' full rate".into(),
        ));
    }
    if t.rows.iter().any(|r| r.verdict == Verdict::Failed) {
        entries.push((
            Swatch::Label(Verdict::Failed),
            "its evacuation failed".into(),
        ));
    }
    let mut items = Vec::with_capacity(entries.len());
    let mut x = x0;
    let mut line = 0;
    for (swatch, text) in entries {
        let w = swatch_width(swatch) + 6 + text_width(&text, TEXT_PX) + 18;
        if x > x0 && x + w > x1 {
            line += 1;
            x = x0;
        }
        items.push(LegendItem {
            swatch,
            text,
            x,
            y: y + line * LEGEND_LINE_PX + LEGEND_LINE_PX / 2,
        });
        x += w;
    }
    (items, line + 1)
}

/// How wide a legend entry's swatch is.
pub(crate) fn swatch_width(s: Swatch) -> i32 {
    match s {
        Swatch::Label(v) => text_width(verdict_word(v), bold_px(TEXT_PX)),
        _ => SWATCH_PX,
    }
}
