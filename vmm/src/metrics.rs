//! The statistics in Prometheus' text exposition format (`GET /metrics`): one family per
//! [`COUNT_FIELDS`] entry, named `vmm_<field>` (counters end in `_total`), with one sample for
//! the process and one per guest (labels `guest` and `domain`), all labelled with `mode`.

use std::fmt::Write;

use crate::report::{COUNT_FIELDS, Report};

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The report as Prometheus text.
pub fn render(report: &Report) -> String {
    let mode = report.mode.name();
    let mut out = String::new();
    for &(field, kind, help) in COUNT_FIELDS {
        let name = if kind == "counter" {
            format!("vmm_{field}_total")
        } else {
            format!("vmm_{field}")
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        if let Some(v) = report.counts.get(field) {
            let _ = writeln!(out, "{name}{{mode=\"{mode}\",guest=\"\",domain=\"\"}} {v}");
        }
        for g in &report.guests {
            if let Some(v) = g.counts.get(field) {
                let _ = writeln!(
                    out,
                    "{name}{{mode=\"{mode}\",guest=\"{}\",domain=\"{}\"}} {v}",
                    escape(&g.name),
                    escape(&g.domain)
                );
            }
        }
    }
    let _ = writeln!(out, "# HELP vmm_guest_pages Guest RAM pages.");
    let _ = writeln!(out, "# TYPE vmm_guest_pages gauge");
    for g in &report.guests {
        let _ = writeln!(
            out,
            "vmm_guest_pages{{mode=\"{mode}\",guest=\"{}\",domain=\"{}\"}} {}",
            escape(&g.name),
            escape(&g.domain),
            g.pages
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Counts, GuestReport, Mode};

    #[test]
    fn families_have_help_type_and_labelled_samples() {
        let report = Report {
            mode: Mode::Dedup,
            counts: Counts {
                pages_sharing: 7,
                cow_breaks: 2,
                general_profit: -5,
                ..Counts::default()
            },
            pages: 10,
            engine: None,
            health: None,
            guests: vec![GuestReport {
                name: "g\"0".into(),
                domain: "a\\b".into(),
                counts: Counts {
                    pages_sharing: 3,
                    ..Counts::default()
                },
                pages: 10,
                pages_dirty: 0,
            }],
        };
        let text = render(&report);
        assert!(text.contains("# TYPE vmm_pages_sharing gauge\n"));
        assert!(text.contains("vmm_pages_sharing{mode=\"dedup\",guest=\"\",domain=\"\"} 7\n"));
        assert!(
            text.contains(
                "vmm_pages_sharing{mode=\"dedup\",guest=\"g\\\"0\",domain=\"a\\\\b\"} 3\n"
            )
        );
        assert!(text.contains("# TYPE vmm_cow_breaks_total counter\n"));
        assert!(text.contains("vmm_cow_breaks_total{mode=\"dedup\",guest=\"\",domain=\"\"} 2\n"));
        assert!(text.contains("vmm_general_profit{mode=\"dedup\",guest=\"\",domain=\"\"} -5\n"));
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<i128>().is_ok(), "{line}");
            assert!(line.starts_with("vmm_"), "{line}");
        }
    }
}
