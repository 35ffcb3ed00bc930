//! Finding kernel reports in the VM's kernel log.

/// Markers of a kernel report that fails a VM run.
const MARKERS: &[&str] = &[
    "BUG:",
    "WARNING:",
    "KASAN:",
    "possible circular locking",
    "suspected memory leak",
    "unreferenced object",
    "Call Trace:",
    "Oops:",
    "Kernel panic",
];

/// How many lines of a report to show from its first marker.
const EXCERPT_LINES: usize = 30;

/// A kernel report: the line that gave it away and what follows it.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub line: usize,
    pub excerpt: Vec<String>,
}

fn has_marker(line: &str) -> bool {
    MARKERS.iter().any(|m| line.contains(m))
}

/// The reports in `log`, one per run of marked lines: a marker inside the
/// excerpt of an earlier report (the `Call Trace:` of a `WARNING:`) does not
/// start a new one.
pub fn scan(log: &str) -> Vec<Report> {
    let lines: Vec<&str> = log.lines().collect();
    let mut reports = vec![];
    let mut i = 0;
    while i < lines.len() {
        if has_marker(lines[i]) {
            let end = (i + EXCERPT_LINES).min(lines.len());
            reports.push(Report {
                line: i + 1,
                excerpt: lines[i..end].iter().map(|l| l.to_string()).collect(),
            });
            i = end;
        } else {
            i += 1;
        }
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_boot_has_no_reports() {
        let log = "[    0.000000] Linux version 6.12.117-kvm-userdev\n\
                   [    0.100000] kvm_amd: Nested Virtualization enabled\n\
                   [    1.000000] Run /init as init process\n";
        assert!(scan(log).is_empty());
    }

    #[test]
    fn warning_with_trace_is_one_report() {
        let mut log = String::from("[    1.0] booting\n");
        log.push_str("[    2.0] WARNING: CPU: 0 PID: 1 at virt/kvm/kvm_main.c:1 f+0x1\n");
        log.push_str("[    2.0] Call Trace:\n");
        log.push_str("[    2.0]  <TASK>\n");
        let reports = scan(&log);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].line, 2);
        assert_eq!(reports[0].excerpt.len(), 3);
    }

    #[test]
    fn every_marker_is_found() {
        for marker in MARKERS {
            let log = format!("ok\n[   3.0] {marker} something\nok\n");
            assert_eq!(scan(&log).len(), 1, "{marker}");
        }
    }

    #[test]
    fn separate_reports_are_counted_apart() {
        let mut log = String::from("BUG: sleeping function called from invalid context\n");
        log.push_str(&"filler\n".repeat(EXCERPT_LINES));
        log.push_str("unreferenced object 0xffff888 (size 64):\n");
        let reports = scan(&log);
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[1].line, EXCERPT_LINES + 2);
    }
}
