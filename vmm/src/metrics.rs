//! The statistics in Prometheus' text exposition format (`GET /metrics`): one family per
//! [`COUNT_FIELDS`] entry, named `vmm_<field>` (counters end in `_total`), with one sample for
//! the process and one per guest (labels `guest` and `domain`), all labelled with `mode`.
//! With `--dedup` also the engine's merge counters and its health: degraded state and causes,
//! merge failures by cause, pool errors, the memory guard's pause, level and view of memory,
//! and whether the page figures are stale (process-wide samples, labelled with `mode` and,
//! where it makes sense, `cause`, `level` or `cgroup`).

use std::fmt::{Display, Write};

use crate::dedup::guard::Level;
use crate::dedup::health::{Cause, HealthReport};
use crate::report::{COUNT_FIELDS, EngineDetails, Report};

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes a family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample; `labels` are the ones after `mode`, already escaped (`,cause="pool"`).
fn sample(out: &mut String, name: &str, mode: &str, labels: &str, value: impl Display) {
    let _ = writeln!(out, "{name}{{mode=\"{mode}\"{labels}}} {value}");
}

/// A family with one process-wide sample.
fn single(out: &mut String, mode: &str, (name, kind, help): (&str, &str, &str), v: impl Display) {
    family(out, name, kind, help);
    sample(out, name, mode, "", v);
}

/// The engine's merge counters (`--dedup`).
fn engine(out: &mut String, mode: &str, e: &EngineDetails) {
    let merges = ("vmm_merges_total", "counter", "Merges done.");
    single(out, mode, merges, e.merges);
    let attempts = (
        "vmm_merge_attempts_total",
        "counter",
        "Merges attempted under the write-protect guard.",
    );
    single(out, mode, attempts, e.merge_attempts);
}

/// The health families (`--dedup`).
fn health(out: &mut String, mode: &str, h: &HealthReport) {
    let degraded = (
        "vmm_degraded",
        "gauge",
        "Whether the engine is degraded (1) or not (0).",
    );
    single(out, mode, degraded, u8::from(h.degraded));
    let name = "vmm_degraded_cause";
    family(
        out,
        name,
        "gauge",
        "Whether each cause of degradation holds (1) or not (0).",
    );
    for c in Cause::ALL {
        let holds = h.degraded_reasons.iter().any(|r| r.cause == c);
        let labels = format!(",cause=\"{}\"", c.name());
        sample(out, name, mode, &labels, u8::from(holds));
    }
    let name = "vmm_merge_failures_total";
    family(out, name, "counter", "Merges refused, by cause.");
    for (cause, n) in h.failures.by_cause() {
        sample(out, name, mode, &format!(",cause=\"{cause}\""), n);
    }
    let counters = [
        (
            "vmm_pool_errors_total",
            "Pool operations that failed.",
            h.pool_errors,
        ),
        (
            "vmm_guard_repairs_total",
            "Write-protect guard operations repaired by unregistering.",
            h.guard_repairs,
        ),
        (
            "vmm_guarded_writes_total",
            "Writes that waited for a merge batch on a write-protected page.",
            h.guarded_writes,
        ),
    ];
    for (name, help, v) in counters {
        single(out, mode, (name, "counter", help), v);
    }
    let paused = (
        "vmm_merging_paused",
        "gauge",
        "Whether the memory guard paused merging (1) or not (0).",
    );
    single(out, mode, paused, u8::from(h.merging_paused));
    if let Some(m) = &h.memory {
        let name = "vmm_memory_level";
        family(
            out,
            name,
            "gauge",
            "The memory guard's level: 1 for the current one (ok, pressure, critical).",
        );
        for l in Level::ALL {
            let labels = format!(",level=\"{}\"", l.name());
            sample(out, name, mode, &labels, u8::from(l == m.level));
        }
        if let Some(c) = &m.cgroup {
            let labels = format!(
                ",cgroup=\"{}\",version=\"{}\"",
                escape(&c.path),
                escape(&c.version)
            );
            let mut gauges = vec![
                (
                    "vmm_memory_cgroup_usage_bytes",
                    "Memory charged to the process's memory cgroup.",
                    c.usage_bytes,
                ),
                (
                    "vmm_memory_cgroup_working_set_bytes",
                    "The memory cgroup's usage less inactive file cache: what the guard compares with the limit.",
                    c.working_set_bytes,
                ),
                (
                    "vmm_memory_cgroup_under_oom",
                    "Whether the kernel reports the memory cgroup out of memory (1) or not (0).",
                    u64::from(c.under_oom),
                ),
            ];
            if let Some(limit) = c.limit_bytes {
                gauges.push((
                    "vmm_memory_cgroup_limit_bytes",
                    "The memory cgroup's effective limit.",
                    limit,
                ));
            }
            for (name, help, v) in gauges {
                family(out, name, "gauge", help);
                sample(out, name, mode, &labels, v);
            }
            let name = "vmm_memory_cgroup_oom_events_total";
            family(
                out,
                name,
                "counter",
                "Out-of-memory events the kernel counted for the memory cgroup.",
            );
            sample(out, name, mode, &labels, c.oom_events);
        }
        if let Some(host) = &m.host {
            let total = (
                "vmm_memory_host_total_bytes",
                "gauge",
                "The host's MemTotal.",
            );
            single(out, mode, total, host.mem_total_bytes);
            let available = (
                "vmm_memory_host_available_bytes",
                "gauge",
                "The host's MemAvailable.",
            );
            single(out, mode, available, host.mem_available_bytes);
        }
    }
    let f = &h.figures;
    let stale = (
        "vmm_figures_stale",
        "gauge",
        "Whether the engine is not scanning, so the page figures do not follow the guests (1) or not (0).",
    );
    single(out, mode, stale, u8::from(f.stale));
    let age = (
        "vmm_figures_age_seconds",
        "gauge",
        "Time since the engine last published new page figures.",
    );
    single(
        out,
        mode,
        age,
        format_args!("{:.3}", f.age_ms as f64 / 1000.0),
    );
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
    let _ = writeln!(
        out,
        "vmm_guest_pages{{mode=\"{mode}\",guest=\"\",domain=\"\"}} {}",
        report.pages
    );
    for g in &report.guests {
        let _ = writeln!(
            out,
            "vmm_guest_pages{{mode=\"{mode}\",guest=\"{}\",domain=\"{}\"}} {}",
            escape(&g.name),
            escape(&g.domain),
            g.pages
        );
    }
    if let Some(e) = &report.engine {
        engine(&mut out, mode, e);
    }
    if let Some(h) = &report.health {
        health(&mut out, mode, h);
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
        assert!(text.contains("vmm_guest_pages{mode=\"dedup\",guest=\"\",domain=\"\"} 10\n"));
        assert_well_formed(&text);
        // Without an engine there are no engine or health families.
        assert!(!text.contains("vmm_degraded"), "{text}");
        assert!(!text.contains("vmm_merges_total"), "{text}");
    }

    /// Every sample line is `name{labels} value` with a number, and every family has `# HELP`
    /// and `# TYPE` before its samples.
    fn assert_well_formed(text: &str) {
        let mut typed = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["gauge", "counter"].contains(&kind), "{line}");
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "no HELP for {name}"
                );
                assert!(!typed.contains(&name), "{name} twice");
                typed.push(name);
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split_once('{').unwrap().0;
            assert!(name.starts_with("vmm_"), "{line}");
            assert_eq!(
                typed.last(),
                Some(&name),
                "sample outside its family: {line}"
            );
            assert!(series.ends_with('}'), "{line}");
        }
    }

    #[test]
    fn health_families_with_an_engine() {
        use crate::dedup::figures::{FiguresReport, StaleReason};
        use crate::dedup::health::{CgroupReport, HostReport, MemoryReport, Reason};
        use crate::report::EngineDetails;
        use vm_dedup::Failures;
        let health = HealthReport {
            degraded: true,
            degraded_reasons: vec![Reason {
                cause: Cause::MemoryPressure,
                detail: "x".into(),
            }],
            failures: Failures {
                differed: 4,
                pool: 2,
                ..Failures::default()
            },
            pool_errors: 3,
            merging_paused: true,
            memory: Some(MemoryReport {
                level: Level::Pressure,
                cgroup: Some(CgroupReport {
                    version: "v1".into(),
                    path: "/vm\"s".into(),
                    usage_bytes: 900,
                    working_set_bytes: 800,
                    limit_bytes: Some(1000),
                    percent: Some(80),
                    under_oom: false,
                    oom_events: 0,
                }),
                host: Some(HostReport {
                    mem_total_bytes: 4096,
                    mem_available_bytes: 1024,
                    used_percent: 75,
                }),
            }),
            figures: FiguresReport {
                stale: true,
                reason: Some(StaleReason::MemoryPressure),
                as_of_unix_ms: 1,
                age_ms: 2500,
            },
            ..HealthReport::default()
        };
        let report = Report {
            mode: Mode::Dedup,
            engine: Some(EngineDetails {
                merges: 9,
                merge_attempts: 15,
                ..EngineDetails::default()
            }),
            health: Some(health),
            ..Report::default()
        };
        let text = render(&report);
        assert_well_formed(&text);
        for line in [
            "# TYPE vmm_merges_total counter",
            "vmm_merges_total{mode=\"dedup\"} 9",
            "vmm_merge_attempts_total{mode=\"dedup\"} 15",
            "# TYPE vmm_degraded gauge",
            "vmm_degraded{mode=\"dedup\"} 1",
            "vmm_degraded_cause{mode=\"dedup\",cause=\"memory_pressure\"} 1",
            "vmm_degraded_cause{mode=\"dedup\",cause=\"pool\"} 0",
            "# TYPE vmm_merge_failures_total counter",
            "vmm_merge_failures_total{mode=\"dedup\",cause=\"differed\"} 4",
            "vmm_merge_failures_total{mode=\"dedup\",cause=\"pool\"} 2",
            "vmm_merge_failures_total{mode=\"dedup\",cause=\"vma_limit\"} 0",
            "vmm_pool_errors_total{mode=\"dedup\"} 3",
            "vmm_guard_repairs_total{mode=\"dedup\"} 0",
            "vmm_guarded_writes_total{mode=\"dedup\"} 0",
            "vmm_merging_paused{mode=\"dedup\"} 1",
            "vmm_memory_level{mode=\"dedup\",level=\"ok\"} 0",
            "vmm_memory_level{mode=\"dedup\",level=\"pressure\"} 1",
            "vmm_memory_level{mode=\"dedup\",level=\"critical\"} 0",
            "vmm_memory_cgroup_working_set_bytes{mode=\"dedup\",cgroup=\"/vm\\\"s\",version=\"v1\"} 800",
            "vmm_memory_cgroup_limit_bytes{mode=\"dedup\",cgroup=\"/vm\\\"s\",version=\"v1\"} 1000",
            "vmm_memory_cgroup_oom_events_total{mode=\"dedup\",cgroup=\"/vm\\\"s\",version=\"v1\"} 0",
            "vmm_memory_host_available_bytes{mode=\"dedup\"} 1024",
            "vmm_figures_stale{mode=\"dedup\"} 1",
            "vmm_figures_age_seconds{mode=\"dedup\"} 2.500",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line}\n{text}");
        }
        // One sample per cause and per level.
        let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(count("vmm_degraded_cause{"), Cause::ALL.len());
        assert_eq!(count("vmm_merge_failures_total{"), 9);
        assert_eq!(count("vmm_memory_level{"), 3);

        // Before the guard's first look, and outside a memory cgroup or without a limit, the
        // memory families it cannot fill are left out.
        let mut h = report.health.clone().unwrap();
        h.memory
            .as_mut()
            .unwrap()
            .cgroup
            .as_mut()
            .unwrap()
            .limit_bytes = None;
        let text = render(&Report {
            health: Some(h.clone()),
            ..report.clone()
        });
        assert!(!text.contains("vmm_memory_cgroup_limit_bytes"), "{text}");
        assert!(text.contains("vmm_memory_cgroup_usage_bytes{"), "{text}");
        h.memory = None;
        let text = render(&Report {
            health: Some(h),
            ..report
        });
        assert_well_formed(&text);
        assert!(!text.contains("vmm_memory_"), "{text}");
        assert!(text.contains("vmm_figures_stale{"), "{text}");
    }
}
