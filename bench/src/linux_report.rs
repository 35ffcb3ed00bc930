//! The Linux part's table, markdown and plot: a pure function of
//! [`LinuxResults`], like [`crate::report`] for the MMIO part.
//!
//! Every figure is shown with its speed against QEMU's in the same run:
//! a throughput divided by QEMU's, QEMU's time divided by a time, so that
//! above 1 is faster than QEMU for every metric alike.

use crate::linux_bench::{Metric, METRICS};
use crate::report::{percentile, xml_escape, PALETTE};
use crate::results::{LinuxHostResult, LinuxResults};

/// The host the speeds are taken against.
const REFERENCE: &str = "qemu";

fn value(host: &LinuxHostResult, key: &str) -> Option<f64> {
    host.figures
        .iter()
        .find(|f| f.metric == key)
        .map(|f| f.value)
        .filter(|v| v.is_finite() && *v > 0.0)
}

/// `host`'s speed against the reference for `m`: above 1 is faster. The
/// median over the rounds of each round's speed, since the machine drifts
/// from round to round more than the hosts differ within one (as the MMIO
/// part's floor ratios); the ratio of the medians if the rounds do not pair.
pub fn speed(linux: &LinuxResults, host: &LinuxHostResult, m: &Metric) -> Option<f64> {
    let reference = linux.hosts.iter().find(|h| h.name == REFERENCE)?;
    let ratio = |v: f64, r: f64| if m.higher_is_better { v / r } else { r / v };
    let rounds = |h: &LinuxHostResult| {
        h.figures
            .iter()
            .find(|f| f.metric == m.key)
            .map(|f| f.rounds.clone())
            .unwrap_or_default()
    };
    let (hr, rr) = (rounds(host), rounds(reference));
    let mut paired: Vec<f64> = hr
        .iter()
        .zip(&rr)
        .map(|(&v, &r)| ratio(v, r))
        .filter(|s| s.is_finite() && *s > 0.0)
        .collect();
    if !hr.is_empty() && hr.len() == rr.len() && paired.len() == hr.len() {
        paired.sort_by(f64::total_cmp);
        return Some(percentile(&paired, 50.0));
    }
    Some(ratio(value(host, m.key)?, value(reference, m.key)?))
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `value unit (speed×)`, or `—`.
fn cell(linux: &LinuxResults, host: &LinuxHostResult, m: &Metric) -> String {
    match (value(host, m.key), speed(linux, host, m)) {
        (Some(v), Some(s)) => format!("{} {} ({s:.2}×)", fmt_value(v), m.unit),
        (Some(v), None) => format!("{} {}", fmt_value(v), m.unit),
        _ => "—".to_string(),
    }
}

fn heading(linux: &LinuxResults) -> String {
    format!(
        "Linux guest on {} vCPU(s), in a VM of {} vCPU(s), {}: median of {} boot(s) per host; \
         console output for {} s per path, {} edu round trips; (N×) is the speed against \
         {REFERENCE} (median over the rounds of each round's), above 1 faster",
        linux.guest_cpus,
        linux.vm_cpus,
        linux.date,
        linux.rounds,
        linux.console_seconds,
        linux.loops
    )
}

/// The non-zero counters of every host's devices, one line per device.
fn counter_lines(linux: &LinuxResults) -> Vec<String> {
    let mut lines = Vec::new();
    for host in &linux.hosts {
        for (device, counters) in &host.counters {
            let shown: Vec<String> = counters
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            // In-process and socket hosts print zeros: no user device.
            if !shown.is_empty() {
                lines.push(format!("{} {device}: {}", host.name, shown.join(" ")));
            }
        }
    }
    lines
}

/// Plain text for the terminal.
pub fn table(linux: &LinuxResults) -> String {
    let mut rows: Vec<Vec<String>> = vec![std::iter::once("metric".to_string())
        .chain(linux.hosts.iter().map(|h| h.name.clone()))
        .collect()];
    for m in &METRICS {
        rows.push(
            std::iter::once(m.key.to_string())
                .chain(linux.hosts.iter().map(|h| cell(linux, h, m)))
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = vec![heading(linux), String::new()];
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, &w))| {
                let pad = " ".repeat(w - c.chars().count());
                if i == 0 {
                    format!("{c}{pad}")
                } else {
                    format!("{pad}{c}")
                }
            })
            .collect();
        out.push(cells.join("  ").trim_end().to_string());
    }
    out.push(String::new());
    out.extend(
        METRICS
            .iter()
            .map(|m| format!("{}: {}", m.key, m.description)),
    );
    out.extend(
        linux
            .hosts
            .iter()
            .map(|h| format!("{}: {}", h.name, h.description)),
    );
    let counters = counter_lines(linux);
    if !counters.is_empty() {
        out.push("counters (summed over the boots):".to_string());
        out.extend(counters.iter().map(|l| format!("  {l}")));
    }
    out.join("\n") + "\n"
}

/// A GitHub table with the same cells, the legend and the counters.
pub fn markdown(linux: &LinuxResults) -> String {
    let row = |cells: Vec<String>| format!("| {} |", cells.join(" | "));
    let mut lines = vec![
        row(std::iter::once("Linux guest".to_string())
            .chain(linux.hosts.iter().map(|h| h.name.clone()))
            .collect()),
        row(std::iter::once("---".to_string())
            .chain(linux.hosts.iter().map(|_| "---:".to_string()))
            .collect()),
    ];
    for m in &METRICS {
        lines.push(row(std::iter::once(format!("`{}`", m.key))
            .chain(linux.hosts.iter().map(|h| cell(linux, h, m)))
            .collect()));
    }
    lines.push(String::new());
    lines.push(format!("{}.", heading(linux)));
    lines.push(String::new());
    for m in &METRICS {
        lines.push(format!("- `{}`: {}", m.key, m.description));
    }
    for h in &linux.hosts {
        lines.push(format!("- {}: {}", h.name, h.description));
    }
    let counters = counter_lines(linux);
    if !counters.is_empty() {
        lines.push(String::new());
        lines.push(format!(
            "Counters (summed over the boots): {}.",
            counters.join("; ")
        ));
    }
    lines.join("\n") + "\n"
}

/// Bars of every host's speed against QEMU, grouped by metric, on a linear
/// axis with QEMU's 1 marked.
pub fn svg(linux: &LinuxResults) -> String {
    const WIDTH: f64 = 900.0;
    const LEFT: f64 = 150.0;
    const RIGHT: f64 = WIDTH - 40.0;
    const TOP: f64 = 60.0;
    const BAR: f64 = 16.0;
    const GAP: f64 = 14.0;
    let speeds: Vec<Vec<Option<f64>>> = METRICS
        .iter()
        .map(|m| linux.hosts.iter().map(|h| speed(linux, h, m)).collect())
        .collect();
    let max = speeds
        .iter()
        .flatten()
        .flatten()
        .fold(1.0f64, |a, &b| a.max(b));
    let axis_max = (max * 1.1).ceil().max(2.0);
    let x = |v: f64| LEFT + (RIGHT - LEFT) * v / axis_max;
    let group = BAR * linux.hosts.len() as f64 + GAP;
    let bottom = TOP + group * METRICS.len() as f64;
    let height = bottom + 40.0 + 18.0 * linux.hosts.len() as f64;
    let mut out = vec![
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"##
        ),
        format!(r##"<rect width="{WIDTH}" height="{height}" fill="white"/>"##),
        format!(
            r##"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">Linux guest: speed against QEMU (same run; above 1 is faster)</text>"##
        ),
    ];
    let mut tick = 0.0;
    while tick <= axis_max + 1e-9 {
        let stroke = if tick == 1.0 { "#444" } else { "#ddd" };
        out.push(format!(
            r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{bottom}" stroke="{stroke}"/><text x="{0:.1}" y="{1}" text-anchor="middle" fill="#555">{tick}×</text>"##,
            x(tick),
            TOP - 8.0
        ));
        tick += if axis_max > 8.0 { 2.0 } else { 0.5 };
    }
    for (g, m) in METRICS.iter().enumerate() {
        let y0 = TOP + group * g as f64;
        out.push(format!(
            r##"<text x="{}" y="{:.1}" text-anchor="end">{} ({})</text>"##,
            LEFT - 8.0,
            y0 + BAR * linux.hosts.len() as f64 / 2.0 + 4.0,
            m.key,
            if m.higher_is_better {
                "throughput"
            } else {
                "time"
            }
        ));
        for (i, s) in speeds[g].iter().enumerate() {
            let Some(s) = s else { continue };
            let y = y0 + BAR * i as f64;
            out.push(format!(
                r##"<rect x="{LEFT}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{s:.2}</text>"##,
                x(*s) - LEFT,
                BAR - 3.0,
                PALETTE[i % PALETTE.len()],
                x(*s) + 4.0,
                y + BAR - 5.0
            ));
        }
    }
    for (i, h) in linux.hosts.iter().enumerate() {
        let y = bottom + 28.0 + 18.0 * i as f64;
        out.push(format!(
            r##"<rect x="{LEFT}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{y:.1}">{}: {}</text>"##,
            y - 10.0,
            PALETTE[i % PALETTE.len()],
            LEFT + 18.0,
            xml_escape(&h.name),
            xml_escape(&h.description)
        ));
    }
    out.push("</svg>".to_string());
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::LinuxFigure;

    fn host(name: &str, values: [f64; 5]) -> LinuxHostResult {
        LinuxHostResult {
            name: name.into(),
            description: format!("{name} runs it"),
            figures: METRICS
                .iter()
                .zip(values)
                .map(|(m, v)| LinuxFigure {
                    metric: m.key.into(),
                    value: v,
                    rounds: vec![v],
                })
                .collect(),
            counters: Default::default(),
        }
    }

    fn fixture() -> LinuxResults {
        let mut user = host("kvm-userdev", [10.0, 40.0, 6.0, 100.0, 300.0]);
        user.counters.insert(
            "uart16550a at 0x3f8".into(),
            [("posted_stores".into(), 12), ("timeouts".into(), 0)].into(),
        );
        LinuxResults {
            date: "2026-11-29 12:00".into(),
            vm_cpus: 1,
            guest_cpus: 1,
            rounds: 1,
            console_seconds: 3.0,
            loops: 300,
            hosts: vec![user, host("qemu", [20.0, 20.0, 3.0, 50.0, 600.0])],
        }
    }

    #[test]
    fn speeds_are_above_one_when_faster() {
        let r = fixture();
        let [boot, tty, printk, edu, irq] = &METRICS;
        let user = &r.hosts[0];
        assert_eq!(speed(&r, user, boot), Some(2.0));
        assert_eq!(speed(&r, user, tty), Some(2.0));
        assert_eq!(speed(&r, user, printk), Some(2.0));
        assert_eq!(speed(&r, user, edu), Some(0.5));
        assert_eq!(speed(&r, user, irq), Some(2.0));
        assert_eq!(speed(&r, &r.hosts[1], edu), Some(1.0));
    }

    #[test]
    fn renderings_carry_the_cells_and_counters() {
        let r = fixture();
        let t = table(&r);
        assert!(t.contains("40.0 KiB/s (2.00×)"), "{t}");
        assert!(t.contains("100 µs (0.50×)"), "{t}");
        assert!(t.contains("kvm-userdev uart16550a at 0x3f8: posted_stores=12\n"));
        let md = markdown(&r);
        assert!(md.starts_with("| Linux guest | kvm-userdev | qemu |\n| --- | ---: | ---: |\n"));
        assert!(
            md.contains("| `irq` | 300 µs (2.00×) | 600 µs (1.00×) |"),
            "{md}"
        );
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=\"150\"").count(), 2 * 5 + 2);
    }

    #[test]
    fn speeds_pair_the_rounds() {
        let mut r = fixture();
        // Round 2 ran on a machine twice as slow for both hosts.
        r.hosts[0].figures[3].rounds = vec![100.0, 200.0, 90.0];
        r.hosts[1].figures[3].rounds = vec![50.0, 100.0, 60.0];
        assert_eq!(speed(&r, &r.hosts[0], &METRICS[3]), Some(0.5));
    }

    #[test]
    fn a_missing_reference_leaves_the_values() {
        let mut r = fixture();
        r.hosts.pop();
        let t = table(&r);
        assert!(t.contains(" 40.0 KiB/s\n") && !t.contains("KiB/s ("), "{t}");
    }
}
