//! The table, the plot and the README table of a run.
//!
//! Everything here is a pure function of a [`Results`]: the benchmark
//! driver measures, [`summarize`] condenses each variant's samples, and the
//! renderers below turn the condensed numbers into what a reader sees:
//!
//! - [`table`]: plain text for the terminal, with the run's context;
//! - [`markdown`]: one GitHub table for the README;
//! - [`svg`]: a self-contained bar chart for the README.
//!
//! Ratios are always taken against the first variant (the baseline), because
//! the absolute times come from a nested VM under TCG and only the ratios
//! carry over to real hardware.

use crate::results::{access_description, AccessResult, Results, VariantResult, ACCESSES};

/// What every rendering says about how to read the numbers.
const NOTE: &str =
    "ratios are the result; absolute times are nested-KVM-under-TCG times, not hardware times";

/// The `p`-th percentile (`p` in 0..=100) of `sorted`, which must be sorted
/// ascending.
///
/// Interpolates linearly between the two closest ranks, so the 50th
/// percentile of an even-length slice is the mean of the middle two. `p`
/// outside 0..=100 is clamped. An empty slice (or a NaN `p`) gives NaN rather
/// than a panic: a variant with no samples must still render.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() || p.is_nan() {
        return f64::NAN;
    }
    let rank = p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let lower = rank.floor() as usize;
    let upper = rank.ceil() as usize;
    if lower == upper {
        // Exact rank: return the sample itself, which also keeps infinities
        // from turning into NaN through `inf - inf`.
        return sorted[lower];
    }
    let fraction = rank - lower as f64;
    sorted[lower] + (sorted[upper] - sorted[lower]) * fraction
}

/// Condenses one variant's samples for `access` into an [`AccessResult`].
///
/// `rounds[i]` holds round `i`'s samples in microseconds. The median, p10,
/// p90 and `n` are taken over all rounds pooled; `round_medians_us` keeps one
/// median per round so drift between rounds stays visible. Rounds without
/// samples are skipped there rather than recorded as NaN.
pub fn summarize(access: &str, rounds: &[Vec<f64>]) -> AccessResult {
    let pooled = sorted(rounds.iter().flatten().copied());
    let round_medians_us = rounds
        .iter()
        .filter(|round| !round.is_empty())
        .map(|round| percentile(&sorted(round.iter().copied()), 50.0))
        .collect();
    AccessResult {
        access: access.to_string(),
        n: pooled.len(),
        median_us: percentile(&pooled, 50.0),
        p10_us: percentile(&pooled, 10.0),
        p90_us: percentile(&pooled, 90.0),
        round_medians_us,
    }
}

/// Collects and sorts samples; `total_cmp` gives NaN a defined place (the
/// end) instead of making the sort's result unspecified.
pub(crate) fn sorted(samples: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut samples: Vec<f64> = samples.collect();
    samples.sort_by(f64::total_cmp);
    samples
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// The access types at least one variant measured, in `ACCESSES` order.
fn measured_accesses(results: &Results) -> Vec<&'static str> {
    ACCESSES
        .iter()
        .copied()
        .filter(|access| results.variants.iter().any(|v| v.access(access).is_some()))
        .collect()
}

/// `median / baseline median` for `access`, when both are usable numbers.
fn ratio(results: &Results, access: &str, median: f64) -> Option<f64> {
    let baseline = results.baseline_median(access)?;
    let usable = baseline.is_finite() && baseline > 0.0 && median.is_finite();
    usable.then(|| median / baseline)
}

/// Microseconds with one decimal; sub-microsecond values get two so they do
/// not all collapse to `0.0`.
pub(crate) fn fmt_us(value: f64) -> String {
    if !value.is_finite() {
        "-".to_string()
    } else if value.abs() < 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.1}")
    }
}

/// The QEMU version line usually starts with "QEMU emulator version"; only
/// add the product name when it is missing, so labels never read "QEMU QEMU".
fn qemu_label(qemu: &str) -> String {
    if qemu.starts_with("QEMU") {
        qemu.to_string()
    } else {
        format!("QEMU {qemu}")
    }
}

/// "5 rounds × 1000 samples (+ 100 warm-up)".
fn rounds_label(results: &Results) -> String {
    let c = &results.config;
    format!(
        "{} rounds × {} samples (+ {} warm-up)",
        c.rounds, c.samples, c.warmup
    )
}

fn baseline_name(results: &Results) -> &str {
    results.variants.first().map_or("-", |v| v.name.as_str())
}

// ---------------------------------------------------------------------------
// Terminal table
// ---------------------------------------------------------------------------

/// Renders `results` as an aligned plain-text report for the terminal.
///
/// It starts with the run's context (date, kernel, QEMU, CPUs, TSC rate,
/// rounds × samples), then has one block per measured access type in
/// `ACCESSES` order with a row per variant (median, p10, p90 in µs and the
/// ratio to the baseline, `-` when the baseline lacks that type), then the
/// user-device counters, a legend of the variants and a note on how to read
/// the numbers.
pub fn table(results: &Results) -> String {
    let mut lines = table_header(results);
    lines.push(String::new());
    lines.extend(access_blocks(results));
    lines.extend(floor_section(results));
    lines.extend(counter_section(results));
    lines.extend(idle_section(results));
    lines.extend(crate::two_vcpus::text_section(results));
    lines.extend(legend_section(results));
    lines.push(format!("note: {NOTE}"));
    lines.join("\n") + "\n"
}

fn table_header(results: &Results) -> Vec<String> {
    let s = &results.system;
    let fields = [
        ("date", results.date.clone()),
        ("kernel", s.kernel.clone()),
        ("QEMU", s.qemu.clone()),
        ("VM CPU", s.vm_cpu.clone()),
        ("host CPU", s.host_cpu.clone()),
        ("TSC kHz", s.tsc_khz.to_string()),
        ("run", rounds_label(results)),
    ];
    let mut lines = vec!["MMIO latency in the nested VM".to_string()];
    lines.extend(label_value_lines(&fields, ""));
    lines.push(format!(
        "times in µs; ratio = median / median of the baseline ({})",
        baseline_name(results)
    ));
    lines
}

/// `label  value` lines with the values lined up.
fn label_value_lines(fields: &[(&str, String)], indent: &str) -> Vec<String> {
    let width = fields
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    fields
        .iter()
        .map(|(label, value)| format!("{indent}{}  {value}", pad_right(label, width)))
        .collect()
}

/// One block per measured access type. All blocks share column widths so
/// the numbers line up down the whole report, not just within a block.
fn access_blocks(results: &Results) -> Vec<String> {
    let header: Vec<String> = ["variant", "median", "p10", "p90", "ratio"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let blocks: Vec<(&str, Vec<Vec<String>>)> = measured_accesses(results)
        .into_iter()
        .map(|access| (access, access_rows(results, access)))
        .collect();
    let widths =
        column_widths(std::iter::once(&header).chain(blocks.iter().flat_map(|(_, rows)| rows)));
    // The variant name reads best left-aligned, the numbers right-aligned.
    let right = [false, true, true, true, true];
    let mut lines = Vec::new();
    for (access, rows) in &blocks {
        lines.push(format!("{access} — {}", access_description(access)));
        lines.push(format!("  {}", render_row(&header, &widths, &right)));
        for row in rows {
            lines.push(format!("  {}", render_row(row, &widths, &right)));
        }
        lines.push(String::new());
    }
    lines
}

fn access_rows(results: &Results, access: &str) -> Vec<Vec<String>> {
    results
        .variants
        .iter()
        .filter_map(|variant| Some((variant, variant.access(access)?)))
        .map(|(variant, a)| {
            let ratio = ratio(results, access, a.median_us)
                .map_or_else(|| "-".to_string(), |r| format!("{r:.2}x"));
            vec![
                variant.name.clone(),
                fmt_us(a.median_us),
                fmt_us(a.p10_us),
                fmt_us(a.p90_us),
                ratio,
            ]
        })
        .collect()
}

/// The widest cell of each column, in characters (not bytes: `µ` and the
/// like must not widen a column).
fn column_widths<'a>(rows: impl Iterator<Item = &'a Vec<String>>) -> Vec<usize> {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let len = cell.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(len),
                None => widths.push(len),
            }
        }
    }
    widths
}

fn render_row(row: &[String], widths: &[usize], right_aligned: &[bool]) -> String {
    let cells: Vec<String> = row
        .iter()
        .enumerate()
        .map(|(i, cell)| {
            let width = widths.get(i).copied().unwrap_or(0);
            if right_aligned.get(i).copied().unwrap_or(false) {
                pad_left(cell, width)
            } else {
                pad_right(cell, width)
            }
        })
        .collect();
    cells.join("  ").trim_end().to_string()
}

fn pad_right(s: &str, width: usize) -> String {
    let fill = width.saturating_sub(s.chars().count());
    format!("{s}{}", " ".repeat(fill))
}

fn pad_left(s: &str, width: usize) -> String {
    let fill = width.saturating_sub(s.chars().count());
    format!("{}{s}", " ".repeat(fill))
}

/// The floor the targets are stated against.
const FLOOR: &str = "ioeventfd-store";

/// Each access type's cost over [`FLOOR`] within one variant: per round, the
/// access's median over the floor's median in that same run, then the median
/// of those ratios. Both come from one VMM process, so a machine that is
/// faster or slower from run to run cancels out. Empty without a floor.
pub fn floor_ratios(variant: &VariantResult) -> Vec<(&'static str, f64)> {
    let Some(floor) = variant.access(FLOOR) else {
        return Vec::new();
    };
    ACCESSES
        .iter()
        .filter(|a| !["cpuid", FLOOR].contains(a))
        .filter_map(|&access| {
            let a = variant.access(access)?;
            let per_round = a.round_medians_us.iter().zip(&floor.round_medians_us);
            let ratios = sorted(per_round.map(|(x, f)| x / f).filter(|r| r.is_finite()));
            (!ratios.is_empty()).then(|| (access, percentile(&ratios, 50.0)))
        })
        .collect()
}

/// Accesses with a floor ratio in some variant, and one row per variant that
/// has the floor: name, then each ratio (`-` where that variant lacks it).
fn floor_rows(results: &Results) -> (Vec<&'static str>, Vec<(String, Vec<String>)>) {
    let per_variant: Vec<_> = results
        .variants
        .iter()
        .map(|v| (v, floor_ratios(v)))
        .filter(|(_, r)| !r.is_empty())
        .collect();
    let accesses: Vec<&'static str> = ACCESSES
        .iter()
        .copied()
        .filter(|a| {
            per_variant
                .iter()
                .any(|(_, r)| r.iter().any(|(x, _)| x == a))
        })
        .collect();
    let rows = per_variant
        .iter()
        .map(|(v, r)| {
            let cells = accesses
                .iter()
                .map(|a| {
                    r.iter()
                        .find(|(x, _)| x == a)
                        .map_or_else(|| "-".to_string(), |(_, q)| format!("{q:.2}x"))
                })
                .collect();
            (v.name.clone(), cells)
        })
        .collect();
    (accesses, rows)
}

fn floor_section(results: &Results) -> Vec<String> {
    let (accesses, rows) = floor_rows(results);
    if rows.is_empty() {
        return Vec::new();
    }
    let mut table: Vec<Vec<String>> = vec![std::iter::once("variant".to_string())
        .chain(accesses.iter().map(|a| a.to_string()))
        .collect()];
    table.extend(
        rows.into_iter()
            .map(|(name, cells)| std::iter::once(name).chain(cells).collect()),
    );
    let widths = column_widths(table.iter());
    let right: Vec<bool> = (0..widths.len()).map(|i| i > 0).collect();
    let mut lines = vec![format!(
        "over the floor — each access ÷ the {FLOOR} of the same run (median over rounds)"
    )];
    lines.extend(
        table
            .iter()
            .map(|row| format!("  {}", render_row(row, &widths, &right))),
    );
    lines.push(String::new());
    lines
}

/// Counters of the variants that have them, one aligned row per counter
/// with the variant's name on its first row only. Empty when no variant has
/// counters, so runs without kvm-userdev variants show no empty heading.
fn counter_section(results: &Results) -> Vec<String> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for variant in &results.variants {
        let Some(counters) = &variant.counters else {
            continue;
        };
        for (i, (name, value)) in counters.iter().enumerate() {
            let owner = if i == 0 {
                variant.name.clone()
            } else {
                String::new()
            };
            rows.push(vec![owner, name.clone(), value.to_string()]);
        }
    }
    if rows.is_empty() {
        return Vec::new();
    }
    let widths = column_widths(rows.iter());
    let right = [false, false, true];
    let mut lines = vec!["counters".to_string()];
    lines.extend(
        rows.iter()
            .map(|row| format!("  {}", render_row(row, &widths, &right))),
    );
    lines.push(String::new());
    lines
}

/// What each variant of our VMM cost the host while the guest was idle.
fn idle_section(results: &Results) -> Vec<String> {
    let rows: Vec<Vec<String>> = results
        .variants
        .iter()
        .filter_map(|v| {
            let c = v.idle.as_ref()?;
            Some(vec![
                v.name.clone(),
                format!("{:.2}%", c.total_percent()),
                format!("{:.2}%", c.vmm_percent),
                format!("{:.2}%", c.emulator_percent),
            ])
        })
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    let header = vec![
        "variant".to_string(),
        "CPU".to_string(),
        "VMM".to_string(),
        "emulator".to_string(),
    ];
    titled_table(
        format!(
            "idle guest — percent of one CPU while it halts for {} s (the VMM with its vCPU threads, and the emulator)",
            results.config.idle_seconds
        ),
        &header,
        &rows,
        &[false, true, true, true],
    )
}

/// A title, then `header` and `rows` in aligned columns (`right`: which
/// are right-aligned), indented, then an empty line.
pub(crate) fn titled_table(
    title: String,
    header: &[String],
    rows: &[Vec<String>],
    right: &[bool],
) -> Vec<String> {
    let header = header.to_vec();
    let widths = column_widths(std::iter::once(&header).chain(rows.iter()));
    let mut lines = vec![title];
    lines.extend(
        std::iter::once(&header)
            .chain(rows.iter())
            .map(|row| format!("  {}", render_row(row, &widths, right))),
    );
    lines.push(String::new());
    lines
}

fn legend_section(results: &Results) -> Vec<String> {
    if results.variants.is_empty() {
        return Vec::new();
    }
    let width = results
        .variants
        .iter()
        .map(|v| v.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut lines = vec!["variants".to_string()];
    lines.extend(results.variants.iter().map(|v| {
        format!(
            "  {} — {} ({})",
            pad_right(&v.name, width),
            v.description,
            v.device
        )
    }));
    lines.push(String::new());
    lines
}

// ---------------------------------------------------------------------------
// README markdown
// ---------------------------------------------------------------------------

/// Renders `results` as one GitHub markdown table for the README.
///
/// Rows are the measured access types in `ACCESSES` order, columns the
/// variants (by name); each cell reads `median (ratio×)`, e.g.
/// `152.3 (1.00×)`, or `—` where the variant did not measure that type. A
/// line with the run's context (date, kernel, QEMU, CPU, rounds × samples)
/// follows the table.
pub fn markdown(results: &Results) -> String {
    let mut lines = Vec::new();
    let names = results.variants.iter().map(|v| md_escape(&v.name));
    let header: Vec<String> = std::iter::once("access (median µs, ratio)".to_string())
        .chain(names)
        .collect();
    lines.push(md_row(&header));
    let align: Vec<String> = std::iter::once("---".to_string())
        .chain(results.variants.iter().map(|_| "---:".to_string()))
        .collect();
    lines.push(md_row(&align));
    for access in measured_accesses(results) {
        let cells: Vec<String> = std::iter::once(format!("`{access}`"))
            .chain(results.variants.iter().map(|v| md_cell(results, v, access)))
            .collect();
        lines.push(md_row(&cells));
    }
    lines.push(String::new());
    lines.push(md_context(results));
    lines.extend(md_floor(results));
    lines.extend(md_idle(results));
    lines.extend(crate::two_vcpus::markdown(results));
    lines.join("\n") + "\n"
}

/// The idle costs as a third table, variants of our VMM as rows.
fn md_idle(results: &Results) -> Vec<String> {
    let rows: Vec<_> = results
        .variants
        .iter()
        .filter_map(|v| Some((v, v.idle.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    let mut lines = vec![String::new()];
    lines.push(md_row(&[
        format!("idle {} s, % of one CPU", results.config.idle_seconds),
        "all".to_string(),
        "VMM and vCPUs".to_string(),
        "emulator".to_string(),
    ]));
    lines.push(md_row(&[
        "---".to_string(),
        "---:".to_string(),
        "---:".to_string(),
        "---:".to_string(),
    ]));
    for (v, c) in rows {
        lines.push(md_row(&[
            md_escape(&v.name),
            format!("{:.2}", c.total_percent()),
            format!("{:.2}", c.vmm_percent),
            format!("{:.2}", c.emulator_percent),
        ]));
    }
    lines
}

/// The floor ratios as a second table, variants as rows.
fn md_floor(results: &Results) -> Vec<String> {
    let (accesses, rows) = floor_rows(results);
    if rows.is_empty() {
        return Vec::new();
    }
    let mut lines = vec![String::new()];
    lines.push(md_row(
        &std::iter::once(format!("÷ `{FLOOR}`, same run"))
            .chain(accesses.iter().map(|a| format!("`{a}`")))
            .collect::<Vec<_>>(),
    ));
    lines.push(md_row(
        &std::iter::once("---".to_string())
            .chain(accesses.iter().map(|_| "---:".to_string()))
            .collect::<Vec<_>>(),
    ));
    for (name, cells) in rows {
        let cells = cells.into_iter().map(|c| match c.strip_suffix('x') {
            Some(ratio) => format!("{ratio}×"),
            None => "—".to_string(),
        });
        lines.push(md_row(
            &std::iter::once(md_escape(&name))
                .chain(cells)
                .collect::<Vec<_>>(),
        ));
    }
    lines
}

pub(crate) fn md_row(cells: &[String]) -> String {
    format!("| {} |", cells.join(" | "))
}

fn md_cell(results: &Results, variant: &VariantResult, access: &str) -> String {
    let Some(a) = variant.access(access) else {
        return "—".to_string();
    };
    match ratio(results, access, a.median_us) {
        Some(r) => format!("{} ({r:.2}×)", fmt_us(a.median_us)),
        // No baseline to compare with: the time alone is still worth showing.
        None => fmt_us(a.median_us),
    }
}

/// The line under the README table: when, on what, and how much was run.
fn md_context(results: &Results) -> String {
    let s = &results.system;
    let cpu = if s.vm_cpu.is_empty() || s.vm_cpu == s.host_cpu {
        s.host_cpu.clone()
    } else {
        format!("{} (VM sees {})", s.host_cpu, s.vm_cpu)
    };
    md_escape(&format!(
        "Ratios against {}. {}, kernel {}, {}, CPU {}, {}. Absolute times are nested-KVM-under-TCG times, not hardware times.",
        baseline_name(results),
        results.date,
        s.kernel,
        qemu_label(&s.qemu),
        cpu,
        rounds_label(results),
    ))
}

/// Keeps free text from breaking the table: `|` ends a cell and a newline
/// ends the row.
pub(crate) fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

// ---------------------------------------------------------------------------
// SVG chart
// ---------------------------------------------------------------------------

/// Okabe-Ito: distinguishable with the common colour-vision deficiencies.
/// Yellow and black come last: yellow is faint on white and black hides the
/// whiskers.
pub(crate) const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
];

const WIDTH: f64 = 1000.0;
/// Variant names sit left of this, right-aligned against the bars.
const PLOT_LEFT: f64 = 170.0;
/// Room right of the axis for the value labels at the bar ends.
const PLOT_RIGHT: f64 = WIDTH - 140.0;
const PLOT_TOP: f64 = 96.0;
const GROUP_HEADING: f64 = 22.0;
const BAR_SLOT: f64 = 20.0;
const BAR_HEIGHT: f64 = 14.0;
const GROUP_GAP: f64 = 10.0;
const LEGEND_LINE: f64 = 18.0;

/// Renders `results` as a self-contained SVG: a horizontal grouped bar
/// chart of medians on a log10 axis.
///
/// One group per measured access type (in `ACCESSES` order), one bar per
/// variant in a fixed colour-blind-friendly colour, a p10–p90 whisker over
/// each bar, the median and ratio at the bar's end, and a legend. Bars whose
/// median is not a positive finite number are left out (marked `n/a`) rather
/// than drawn with broken coordinates. All text is XML-escaped and uses
/// `font-family="sans-serif"`, so the file needs nothing external.
pub fn svg(results: &Results) -> String {
    let axis = LogAxis::for_values(chart_values(results));
    let mut body = Vec::new();
    body.push(svg_titles(results));

    let groups = measured_accesses(results);
    let plot_bottom = plot_bottom(results, &groups);
    body.extend(svg_grid(&axis, plot_bottom));

    let mut y = PLOT_TOP;
    for access in &groups {
        body.push(svg_group_heading(access, y));
        y += GROUP_HEADING;
        for (index, variant) in results.variants.iter().enumerate() {
            if let Some(a) = variant.access(access) {
                body.push(svg_bar(results, &axis, index, &variant.name, a, y));
                y += BAR_SLOT;
            }
        }
        y += GROUP_GAP;
    }
    if groups.is_empty() {
        body.push(text(PLOT_LEFT, PLOT_TOP + 20.0, "", "no measurements"));
    }

    let (legend, height) = svg_legend(results, plot_bottom + 52.0);
    body.push(legend);

    let title = xml_escape(CHART_TITLE);
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <title>{title}</title>\n\
         <rect class=\"background\" width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n\
         {}\n</svg>",
        body.join("\n")
    )
}

const CHART_TITLE: &str = "MMIO latency in the nested VM (median, p10–p90)";

/// Where the bars end: the same walk as the drawing loop, without drawing.
fn plot_bottom(results: &Results, groups: &[&str]) -> f64 {
    let bars: usize = groups
        .iter()
        .map(|access| {
            results
                .variants
                .iter()
                .filter(|v| v.access(access).is_some())
                .count()
        })
        .sum();
    let groups = groups.len().max(1) as f64;
    PLOT_TOP + groups * (GROUP_HEADING + GROUP_GAP) + bars as f64 * BAR_SLOT
}

/// Every value the axis must cover: medians and whisker ends.
fn chart_values(results: &Results) -> Vec<f64> {
    results
        .variants
        .iter()
        .flat_map(|v| &v.accesses)
        .flat_map(|a| [a.median_us, a.p10_us, a.p90_us])
        .filter(|v| is_plottable(*v))
        .collect()
}

/// A log axis can only place positive finite numbers.
fn is_plottable(value: f64) -> bool {
    value.is_finite() && value > 0.0
}

fn svg_titles(results: &Results) -> String {
    let s = &results.system;
    let subtitle = format!(
        "{} · kernel {} · {} · {}",
        results.date,
        s.kernel,
        qemu_label(&s.qemu),
        rounds_label(results)
    );
    [
        text(
            20.0,
            28.0,
            "font-size=\"18\" font-weight=\"bold\"",
            CHART_TITLE,
        ),
        text(20.0, 48.0, "fill=\"#444444\"", &subtitle),
        text(
            20.0,
            66.0,
            "fill=\"#666666\" font-size=\"11\"",
            &format!(
                "{NOTE}; ratio = median / median of {}",
                baseline_name(results)
            ),
        ),
    ]
    .join("\n")
}

/// Vertical gridlines with tick labels above and below the bars, so the
/// scale can be read at either end of a tall chart.
fn svg_grid(axis: &LogAxis, plot_bottom: f64) -> Vec<String> {
    let mut out = Vec::new();
    for &tick in &axis.ticks {
        let x = axis.x(tick);
        out.push(format!(
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{PLOT_TOP:.1}\" x2=\"{x:.1}\" y2=\"{plot_bottom:.1}\" \
             stroke=\"#dddddd\" stroke-width=\"1\"/>"
        ));
        let label = tick_label(tick);
        let attrs = "text-anchor=\"middle\" fill=\"#555555\" font-size=\"11\"";
        out.push(text(x, PLOT_TOP - 6.0, attrs, &label));
        out.push(text(x, plot_bottom + 14.0, attrs, &label));
    }
    out.push(text(
        (PLOT_LEFT + PLOT_RIGHT) / 2.0,
        plot_bottom + 32.0,
        "text-anchor=\"middle\" fill=\"#333333\"",
        "median latency, µs (log scale)",
    ));
    out
}

/// The access name in bold and its description in grey. The gap between
/// them is a `dx` offset, not a space: renderers (librsvg among them) drop
/// leading spaces in a `<tspan>`, gluing name and dash together.
fn svg_group_heading(access: &str, y: f64) -> String {
    format!(
        "<text x=\"20\" y=\"{:.1}\"><tspan font-weight=\"bold\">{}</tspan>\
         <tspan fill=\"#555555\" dx=\"5\">— {}</tspan></text>",
        y + 15.0,
        xml_escape(access),
        xml_escape(access_description(access))
    )
}

/// One bar with its whisker and labels; `y` is the top of its slot.
fn svg_bar(
    results: &Results,
    axis: &LogAxis,
    index: usize,
    name: &str,
    a: &AccessResult,
    y: f64,
) -> String {
    let center = y + BAR_SLOT / 2.0;
    let baseline = center + 4.0; // vertically centres 12 px text on the bar
    let mut out = vec![text(PLOT_LEFT - 8.0, baseline, "text-anchor=\"end\"", name)];
    if !is_plottable(a.median_us) {
        out.push(text(PLOT_LEFT + 4.0, baseline, "fill=\"#666666\"", "n/a"));
        return out.join("\n");
    }
    let end = axis.x(a.median_us);
    out.push(format!(
        "<rect class=\"bar\" x=\"{PLOT_LEFT:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{BAR_HEIGHT:.1}\" \
         fill=\"{}\"><title>{}</title></rect>",
        center - BAR_HEIGHT / 2.0,
        (end - PLOT_LEFT).max(1.0),
        PALETTE[index % PALETTE.len()],
        xml_escape(&format!(
            "{name}, {}: median {} µs, p10 {} µs, p90 {} µs, n = {}",
            a.access,
            fmt_us(a.median_us),
            fmt_us(a.p10_us),
            fmt_us(a.p90_us),
            a.n
        )),
    ));
    let mut label_x = end;
    if is_plottable(a.p10_us) && is_plottable(a.p90_us) {
        let (lo, hi) = (axis.x(a.p10_us), axis.x(a.p90_us));
        out.push(whisker(lo, hi, center));
        // Start the label past the whisker so the two never overlap.
        label_x = label_x.max(hi);
    }
    let label = match ratio(results, &a.access, a.median_us) {
        Some(r) => format!("{} µs · {r:.2}×", fmt_us(a.median_us)),
        None => format!("{} µs", fmt_us(a.median_us)),
    };
    out.push(text(label_x + 6.0, baseline, "fill=\"#222222\"", &label));
    out.join("\n")
}

/// A thin horizontal line with end caps, drawn over the bar.
fn whisker(lo: f64, hi: f64, center: f64) -> String {
    let (top, bottom) = (center - 4.0, center + 4.0);
    format!(
        "<path class=\"whisker\" d=\"M{lo:.1} {center:.1}H{hi:.1}M{lo:.1} {top:.1}V{bottom:.1}\
         M{hi:.1} {top:.1}V{bottom:.1}\" stroke=\"#222222\" stroke-width=\"1.2\" fill=\"none\"/>"
    )
}

/// The colour legend starting at `top`; returns it and the chart's total
/// height, which it determines because it comes last.
fn svg_legend(results: &Results, top: f64) -> (String, f64) {
    let mut out = Vec::new();
    let mut y = top;
    for (index, v) in results.variants.iter().enumerate() {
        out.push(format!(
            "<rect class=\"swatch\" x=\"20\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/>",
            y - 10.0,
            PALETTE[index % PALETTE.len()]
        ));
        out.push(format!(
            "<text x=\"38\" y=\"{y:.1}\"><tspan font-weight=\"bold\">{}</tspan> — {} ({})</text>",
            xml_escape(&v.name),
            xml_escape(&v.description),
            xml_escape(&v.device)
        ));
        y += LEGEND_LINE;
    }
    (out.join("\n"), y.ceil())
}

/// A `<text>` element; `attrs` is trusted markup, `content` is escaped.
fn text(x: f64, y: f64, attrs: &str, content: &str) -> String {
    format!(
        "<text x=\"{x:.1}\" y=\"{y:.1}\" {attrs}>{}</text>",
        xml_escape(content)
    )
}

pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

fn tick_label(value: f64) -> String {
    if value >= 1.0 {
        format!("{value:.0}")
    } else {
        // Round away binary noise (0.2 stored as 0.20000000000000001).
        format!("{}", (value * 1e6).round() / 1e6)
    }
}

/// A log10 axis over nice 1-2-5 bounds, mapped onto the plot's x range.
struct LogAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl LogAxis {
    /// Above this many decades 1-2-5 ticks crowd; use powers of ten only.
    const MAX_DECADES_FOR_125: f64 = 4.0;

    /// Bounds a little outside the data so the shortest bar still has a
    /// visible length and the longest whisker stays inside the plot.
    fn for_values(values: Vec<f64>) -> LogAxis {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !(min.is_finite() && max.is_finite()) {
            // Nothing to plot: a plausible empty scale keeps the SVG valid.
            return LogAxis::for_values(vec![1.5, 900.0]);
        }
        let (mut lo, mut hi) = (nice_floor(min / 1.15), nice_ceil(max * 1.05));
        if (hi / lo).log10() > Self::MAX_DECADES_FOR_125 {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil());
            let ticks = nice_values(lo, hi)
                .into_iter()
                .filter(|v| is_decade(*v))
                .collect();
            return LogAxis { lo, hi, ticks };
        }
        LogAxis {
            lo,
            hi,
            ticks: nice_values(lo, hi),
        }
    }

    /// Pixel position of `value`, clamped to the plot.
    fn x(&self, value: f64) -> f64 {
        let span = self.hi.log10() - self.lo.log10();
        let t = ((value.log10() - self.lo.log10()) / span).clamp(0.0, 1.0);
        PLOT_LEFT + t * (PLOT_RIGHT - PLOT_LEFT)
    }
}

/// Relative slack for comparing computed 1-2-5 values with bounds.
const EPS: f64 = 1e-9;

/// The 1-2-5 mantissa and decade of `value`, as `(mantissa, 10^k)` with the
/// mantissa in [1, 10).
fn decompose(value: f64) -> (f64, f64) {
    let decade = 10f64.powf(value.log10().floor());
    (value / decade, decade)
}

/// The largest 1-2-5 number not above `value`.
fn nice_floor(value: f64) -> f64 {
    let (m, decade) = decompose(value);
    let step = [5.0, 2.0, 1.0]
        .into_iter()
        .find(|s| *s <= m * (1.0 + EPS))
        .unwrap_or(1.0);
    step * decade
}

/// The smallest 1-2-5 number not below `value`.
fn nice_ceil(value: f64) -> f64 {
    let (m, decade) = decompose(value);
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|s| *s >= m * (1.0 - EPS))
        .unwrap_or(10.0);
    step * decade
}

/// All 1-2-5 numbers in `lo..=hi`.
fn nice_values(lo: f64, hi: f64) -> Vec<f64> {
    let first = lo.log10().floor() as i32;
    let last = hi.log10().ceil() as i32;
    (first..=last)
        .flat_map(|k| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(k)))
        .filter(|v| *v >= lo * (1.0 - EPS) && *v <= hi * (1.0 + EPS))
        .collect()
}

fn is_decade(value: f64) -> bool {
    let (m, _) = decompose(value);
    (m - 1.0).abs() < 1e-6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{RunConfig, System};
    use std::collections::BTreeMap;

    fn access(name: &str, median: f64) -> AccessResult {
        AccessResult {
            access: name.to_string(),
            n: 100,
            median_us: median,
            p10_us: median * 0.9,
            p90_us: median * 1.2,
            round_medians_us: vec![median],
        }
    }

    /// Baseline: cpuid, store, load. Second variant: cpuid, store, irq (so
    /// irq has no baseline) and a description that needs escaping.
    fn fixture() -> Results {
        let counters: BTreeMap<String, u64> = [
            ("posted_stores".to_string(), 1234),
            ("shadow_loads".to_string(), 56),
            ("stalled_accesses".to_string(), 0),
        ]
        .into();
        Results {
            date: "2025-01-02 03:04".to_string(),
            system: System {
                kernel: "6.12.9-userdev".to_string(),
                qemu: "QEMU emulator version 9.2.0".to_string(),
                vm_cpu: "QEMU TCG CPU".to_string(),
                host_cpu: "Some CPU".to_string(),
                tsc_khz: 2_000_000,
            },
            config: RunConfig {
                rounds: 5,
                samples: 1000,
                warmup: 100,
                idle_seconds: 0,
                cpus: 1,
            },
            variants: vec![
                VariantResult {
                    name: "qemu".to_string(),
                    description: "plain QEMU device".to_string(),
                    device: "edu".to_string(),
                    accesses: vec![
                        access("cpuid", 10.0),
                        access("store", 100.0),
                        access("load", 50.0),
                    ],
                    counters: None,
                    idle: None,
                    two_vcpus: Vec::new(),
                },
                VariantResult {
                    name: "kvm-userdev".to_string(),
                    description: "posted & shadowed <fast>".to_string(),
                    device: "edu".to_string(),
                    accesses: vec![
                        access("cpuid", 20.0),
                        access("store", 342.0),
                        access("irq", 200.0),
                    ],
                    counters: Some(counters),
                    idle: None,
                    two_vcpus: vec![crate::two_vcpus::TwoVcpuResult {
                        access: "store".to_string(),
                        one_per_s: 2000.0,
                        two_per_s: 3000.0,
                        round_ratios: vec![1.5],
                        median_us: [400.0, 410.0],
                    }],
                },
            ],
            linux: None,
        }
    }

    #[test]
    fn floor_ratios_pair_rounds_of_one_run() {
        let rounds = |name: &str, r: Vec<f64>| AccessResult {
            round_medians_us: r,
            ..access(name, 0.0)
        };
        let v = VariantResult {
            name: "kvm-userdev".to_string(),
            description: String::new(),
            device: "edu".to_string(),
            accesses: vec![
                rounds("cpuid", vec![40.0, 80.0, 40.0]),
                rounds(FLOOR, vec![50.0, 100.0, 50.0]),
                // A slow round doubles both: the ratio stays.
                rounds("store", vec![65.0, 130.0, 70.0]),
                rounds("load", vec![50.0, 90.0, 55.0]),
            ],
            counters: None,
            idle: None,
            two_vcpus: Vec::new(),
        };
        let r = floor_ratios(&v);
        assert_eq!(
            r.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            ["store", "load"]
        );
        assert!((r[0].1 - 1.3).abs() < 1e-9 && (r[1].1 - 1.0).abs() < 1e-9);

        let mut results = fixture();
        assert!(floor_section(&results).is_empty(), "no floor, no section");
        results.variants.push(v);
        let text = floor_section(&results).join("\n");
        assert!(text.contains("kvm-userdev  1.30x  1.00x"), "{text}");
        assert!(markdown(&results).contains("| kvm-userdev | 1.30× | 1.00× |"));
    }

    #[test]
    fn percentile_interpolates_between_ranks() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 100.0), 4.0);
        assert_eq!(percentile(&s, 50.0), 2.5);
        // rank 0.1 * 3 = 0.3 → 1 + 0.3
        assert!((percentile(&s, 10.0) - 1.3).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 90.0), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), 2.0);
    }

    #[test]
    fn percentile_of_nothing_is_nan() {
        assert!(percentile(&[], 50.0).is_nan());
        assert!(percentile(&[1.0], f64::NAN).is_nan());
        // Out-of-range p is clamped rather than indexing out of bounds.
        assert_eq!(percentile(&[1.0, 2.0], 150.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0], -5.0), 1.0);
    }

    #[test]
    fn summarize_pools_rounds_and_keeps_round_medians() {
        let rounds = vec![vec![3.0, 1.0, 2.0], vec![], vec![10.0, 20.0]];
        let a = summarize("store", &rounds);
        assert_eq!(a.access, "store");
        assert_eq!(a.n, 5);
        // Pooled and sorted: 1 2 3 10 20.
        assert_eq!(a.median_us, 3.0);
        assert!((a.p10_us - 1.4).abs() < 1e-12);
        assert!((a.p90_us - 16.0).abs() < 1e-12);
        assert_eq!(a.round_medians_us, vec![2.0, 15.0]);
    }

    #[test]
    fn summarize_of_nothing_is_nan_not_panic() {
        let a = summarize("load", &[]);
        assert_eq!(a.n, 0);
        assert!(a.median_us.is_nan());
        assert!(a.round_medians_us.is_empty());
    }

    #[test]
    fn table_shows_ratios_against_the_baseline() {
        let t = table(&fixture());
        let row = |name: &str, access: &str| -> String {
            let block = t.split(&format!("\n{access} — ")).nth(1).unwrap();
            let line = block.lines().find(|l| l.trim_start().starts_with(name));
            line.unwrap().to_string()
        };
        assert!(row("qemu", "store").ends_with("1.00x"), "{t}");
        assert!(row("kvm-userdev", "store").ends_with("3.42x"), "{t}");
        assert!(row("kvm-userdev", "cpuid").ends_with("2.00x"), "{t}");
        // The baseline has no irq: no ratio to show.
        assert!(row("kvm-userdev", "irq").ends_with('-'), "{t}");
        assert!(t.contains("342.0"));
        assert!(t.contains("posted_stores"));
        assert!(t.contains("stalled_accesses"));
        assert!(t.contains("kvm-userdev — posted & shadowed <fast> (edu)"));
        assert!(t.contains(NOTE));
        assert!(t.contains("5 rounds × 1000 samples (+ 100 warm-up)"));
    }

    #[test]
    fn table_blocks_follow_accesses_order_and_align() {
        let t = table(&fixture());
        let pos = |a: &str| t.find(&format!("\n{a} — ")).unwrap();
        assert!(pos("cpuid") < pos("store"));
        assert!(pos("store") < pos("load"));
        assert!(pos("load") < pos("irq"));
        assert!(!t.contains("\nsync-load — "));
        // Every variant row ends its ratio column at the same place.
        let widths: Vec<usize> = t
            .lines()
            .filter(|l| l.ends_with('x') || l.ends_with("ratio"))
            .map(|l| l.chars().count())
            .collect();
        assert!(widths.len() > 4);
        assert!(widths.iter().all(|w| *w == widths[0]), "{t}");
    }

    #[test]
    fn markdown_has_one_row_per_measured_access() {
        let md = markdown(&fixture());
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(rows.len(), 4, "{md}");
        assert!(md
            .lines()
            .next()
            .unwrap()
            .contains("| qemu | kvm-userdev |"));
        assert!(
            md.contains("| `store` | 100.0 (1.00×) | 342.0 (3.42×) |"),
            "{md}"
        );
        assert!(md.contains("| `load` | 50.0 (1.00×) | — |"), "{md}");
        assert!(md.contains("| `irq` | — | 200.0 |"), "{md}");
        assert!(md.contains("2025-01-02 03:04"));
        assert!(md.contains("5 rounds × 1000 samples"));
    }

    #[test]
    fn svg_is_self_contained_and_escaped() {
        let s = svg(&fixture());
        assert!(s.starts_with("<svg"));
        assert!(s.ends_with("</svg>"));
        assert!(s.contains("posted &amp; shadowed &lt;fast&gt;"));
        assert!(!s.contains("posted & "));
        assert!(!s.contains("<fast>"));
        assert!(s.contains("font-family=\"sans-serif\""));
        assert!(s.contains("MMIO latency in the nested VM (median, p10–p90)"));
        // Six measured (variant, access) pairs, six bars, six whiskers.
        assert_eq!(s.matches("<rect class=\"bar\"").count(), 6);
        assert_eq!(s.matches("class=\"whisker\"").count(), 6);
        assert!(s.contains("342.0 µs · 3.42×"));
        // Balanced open and close tags for the elements that have bodies.
        for tag in ["text", "tspan", "title", "svg"] {
            let open =
                s.matches(&format!("<{tag} ")).count() + s.matches(&format!("<{tag}>")).count();
            assert_eq!(open, s.matches(&format!("</{tag}>")).count(), "<{tag}>");
        }
    }

    #[test]
    fn svg_skips_unplottable_bars() {
        let mut r = fixture();
        r.variants[1].accesses[0].median_us = f64::NAN;
        r.variants[1].accesses[1].median_us = 0.0;
        let s = svg(&r);
        assert_eq!(s.matches("<rect class=\"bar\"").count(), 4);
        assert!(!s.contains("NaN"));
        assert!(!s.contains("inf"));
    }

    #[test]
    fn svg_of_empty_results_is_still_valid() {
        let s = svg(&Results::default());
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(!s.contains("NaN"));
        assert_eq!(s.matches("<rect class=\"bar\"").count(), 0);
    }

    #[test]
    fn axis_ticks_cover_the_data_with_1_2_5_steps() {
        let axis = LogAxis::for_values(vec![9.0, 342.0 * 1.2]);
        assert_eq!(axis.lo, 5.0);
        assert_eq!(axis.hi, 500.0);
        let labels: Vec<String> = axis.ticks.iter().map(|t| tick_label(*t)).collect();
        assert_eq!(labels, ["5", "10", "20", "50", "100", "200", "500"]);
        // Many decades: powers of ten only.
        let wide = LogAxis::for_values(vec![0.5, 20_000.0]);
        let labels: Vec<String> = wide.ticks.iter().map(|t| tick_label(*t)).collect();
        assert_eq!(labels, ["0.1", "1", "10", "100", "1000", "10000", "100000"]);
    }
}
