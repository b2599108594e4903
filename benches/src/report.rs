//! The density benchmark's figures per mode and how they are written: a markdown table, a CSV
//! of the memory time series, and the `RESULT` line comparing this engine with kernel KSM.

use std::fmt::Write as _;

use crate::convergence::{Sample, savings, time_to_fraction};

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;
/// Bytes in a MiB.
const MIB: f64 = (1u64 << 20) as f64;

/// One mode's run as measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeRun {
    /// The mode's name (`ksm-max`).
    pub mode: String,
    /// Seconds from starting the VMM to every guest being ready (loading the images).
    pub ready_secs: f64,
    /// Samples from the moment every guest was ready.
    pub samples: Vec<Sample>,
    /// Whether memory reached a plateau before the time cap.
    pub converged: bool,
    /// The time cap, seconds.
    pub cap_secs: f64,
    /// Guest pages whose content was checked after the run.
    pub pages_checked: usize,
    /// Of which did not match the image.
    pub pages_bad: usize,
    /// Memory the merger spent outside the VMM's PSS, bytes: kernel KSM's reverse-map items
    /// for the VMM (`None` for the other modes; the engine's memory is inside the PSS).
    pub kernel_metadata: Option<u64>,
}

/// What a run gives, against the baseline memory without merging.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// The mode's name.
    pub mode: String,
    /// Whether it converged (else the figures are those at the time cap).
    pub converged: bool,
    /// Seconds from starting the VMM to its guests being ready.
    pub ready_secs: f64,
    /// The time cap, seconds.
    pub cap_secs: f64,
    /// Seconds from ready to 95% of the final savings (`None` without savings).
    pub t95: Option<f64>,
    /// CPU-seconds spent by then.
    pub cpu95: Option<f64>,
    /// Seconds the run was watched after ready.
    pub watched_secs: f64,
    /// CPU-seconds over the whole watch.
    pub cpu_total: f64,
    /// Final PSS of the VMM, bytes.
    pub pss: u64,
    /// Final cgroup memory without file cache, bytes.
    pub cgroup: Option<u64>,
    /// Final savings against the baseline, bytes.
    pub saved: i64,
    /// The merger's memory outside the PSS ([`ModeRun::kernel_metadata`]), bytes.
    pub kernel_metadata: Option<u64>,
    /// `saved` less `kernel_metadata`: what merging saved the host net of every merger's own
    /// memory.
    pub saved_net: i64,
    /// Final savings as a fraction of guest RAM.
    pub saved_fraction: f64,
    /// Guests per GiB of host memory (PSS).
    pub density: f64,
    /// Pages checked and of which bad.
    pub pages: (usize, usize),
}

impl Figures {
    /// The figures of `run` with `guests` guests of `guest_ram` bytes in total, against the
    /// memory `base` of the same guests without merging.
    pub fn of(run: &ModeRun, base: u64, guests: u32, guest_ram: u64) -> Self {
        let last = run.samples.last();
        let pss = last.map_or(0, |s| s.pss);
        let saved = savings(base, pss);
        let t95 = time_to_fraction(&run.samples, base, 0.95);
        // Savings under a megabyte are noise (the VMM's own allocations), not merging.
        let merged = saved as f64 >= MIB;
        Self {
            mode: run.mode.clone(),
            converged: run.converged,
            ready_secs: run.ready_secs,
            cap_secs: run.cap_secs,
            t95: t95.filter(|_| merged).map(|c| c.t),
            cpu95: t95.filter(|_| merged).map(|c| c.cpu),
            watched_secs: last.map_or(0.0, |s| s.t),
            cpu_total: last.map_or(0.0, |s| s.cpu),
            pss,
            cgroup: last.and_then(|s| s.cgroup),
            saved,
            kernel_metadata: run.kernel_metadata,
            saved_net: saved
                - run
                    .kernel_metadata
                    .map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX)),
            saved_fraction: saved as f64 / guest_ram.max(1) as f64,
            density: f64::from(guests) / (pss.max(1) as f64 / GIB),
            pages: (run.pages_checked, run.pages_bad),
        }
    }

    /// Time to 95% for comparisons: the time cap when the run did not converge (a lower bound).
    fn time_for_ratio(&self) -> Option<f64> {
        if self.converged {
            self.t95
        } else {
            Some(self.cap_secs)
        }
    }

    /// CPU-seconds for comparisons: to 95%, or the whole watch when the run did not converge.
    fn cpu_for_ratio(&self) -> Option<f64> {
        if self.converged {
            self.cpu95
        } else {
            Some(self.cpu_total)
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / MIB)
}

/// Signed bytes as whole MiB, without a sign on values that round to zero.
pub fn signed_mib(bytes: i64) -> String {
    // Adding 0.0 turns a rounded -0.0 into 0.0.
    format!("{:.0}", (bytes as f64 / MIB).round() + 0.0)
}

fn secs(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

/// The markdown table of every mode's figures.
pub fn markdown_table(rows: &[Figures]) -> String {
    let mut t = String::new();
    t.push_str(
        "| mode | ready (s) | converged | time to 95% (s) | CPU-s to 95% \
         | CPU-s, whole run (s watched) | host memory, PSS (MiB) | cgroup memory (MiB) \
         | saved (MiB) | merger memory outside PSS (MiB) | saved net of it (MiB) \
         | saved, % of guest RAM | guests per GiB | pages checked (bad) |\n",
    );
    t.push_str("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for f in rows {
        let (t95, cpu95) = if f.converged {
            (secs(f.t95), secs(f.cpu95))
        } else {
            (
                format!("> {:.0}", f.cap_secs),
                format!("> {:.1}", f.cpu_total),
            )
        };
        let _ = writeln!(
            t,
            "| {} | {:.1} | {} | {t95} | {cpu95} | {:.1} ({:.0}) | {} | {} | {} | {} | {} | {:.1}% | {:.2} | {} ({}) |",
            f.mode,
            f.ready_secs,
            if f.converged { "yes" } else { "no (time cap)" },
            f.cpu_total,
            f.watched_secs,
            mib(f.pss),
            f.cgroup.map_or_else(|| "-".into(), mib),
            signed_mib(f.saved),
            f.kernel_metadata.map_or_else(|| "-".into(), mib),
            signed_mib(f.saved_net),
            (1000.0 * f.saved_fraction).round() / 10.0 + 0.0,
            f.density,
            f.pages.0,
            f.pages.1,
        );
    }
    t
}

/// Header of [`csv`].
pub const CSV_HEADER: &str = "mode,t_secs,pss_bytes,cgroup_bytes,saved_bytes,cpu_secs,full_scans";

/// Every sample of every run, one line each, savings against `base`.
pub fn csv(runs: &[ModeRun], base: u64) -> String {
    let mut text = String::from(CSV_HEADER);
    text.push('\n');
    for run in runs {
        for s in &run.samples {
            let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
            let _ = writeln!(
                text,
                "{},{:.3},{},{},{},{:.3},{}",
                run.mode,
                s.t,
                s.pss,
                opt(s.cgroup),
                savings(base, s.pss),
                s.cpu,
                opt(s.full_scans),
            );
        }
    }
    text
}

/// The comparison of `ours` with `ksm`: time to 95%, CPU-seconds and final savings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    /// KSM's time to 95% over ours.
    pub speedup: f64,
    /// Our CPU-seconds over KSM's.
    pub cpu_ratio: f64,
    /// Our final savings over KSM's.
    pub savings_ratio: f64,
    /// The same, each net of its merger's memory outside the PSS (KSM's reverse-map items).
    pub savings_ratio_net: f64,
}

impl Ratios {
    /// The ratios, or `None` when a figure is missing (a run without savings).
    pub fn of(ours: &Figures, ksm: &Figures) -> Option<Self> {
        let (our_t, ksm_t) = (ours.time_for_ratio()?, ksm.time_for_ratio()?);
        let (our_cpu, ksm_cpu) = (ours.cpu_for_ratio()?, ksm.cpu_for_ratio()?);
        Some(Self {
            speedup: ksm_t / our_t.max(1e-3),
            cpu_ratio: our_cpu / ksm_cpu.max(1e-3),
            savings_ratio: ours.saved as f64 / (ksm.saved.max(1) as f64),
            savings_ratio_net: ours.saved_net as f64 / (ksm.saved_net.max(1) as f64),
        })
    }

    /// The line before the benchmark's last: the savings compared net of the mergers' memory.
    pub fn net_line(&self) -> String {
        format!(
            "savings net of the mergers' own memory outside the PSS (kernel KSM's reverse-map \
             items): savings_ratio_net={:.3}",
            self.savings_ratio_net
        )
    }

    /// The benchmark's last line.
    pub fn result_line(&self) -> String {
        format!(
            "RESULT speedup_vs_ksm_max={:.2} cpu_ratio={:.3} savings_ratio={:.3}",
            self.speedup, self.cpu_ratio, self.savings_ratio
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, pss: u64, cpu: f64) -> Sample {
        Sample {
            t,
            pss,
            cgroup: Some(pss + 10),
            cpu,
            full_scans: None,
        }
    }

    fn run(mode: &str, converged: bool, points: &[(f64, u64, f64)]) -> ModeRun {
        ModeRun {
            mode: mode.into(),
            ready_secs: 3.25,
            samples: points.iter().map(|&(t, m, c)| sample(t, m, c)).collect(),
            converged,
            cap_secs: 300.0,
            pages_checked: 8,
            pages_bad: 0,
            kernel_metadata: None,
        }
    }

    const G: u64 = 1 << 30;

    #[test]
    fn figures_against_the_baseline() {
        let r = run(
            "x",
            true,
            &[(0.0, 2 * G, 0.0), (2.0, G, 4.0), (4.0, G, 6.0)],
        );
        let f = Figures::of(&r, 2 * G, 4, 2 * G);
        assert_eq!(f.saved, G as i64);
        assert!((f.saved_fraction - 0.5).abs() < 1e-12);
        assert!((f.density - 4.0).abs() < 1e-12);
        // 95% of 1 GiB between t=0 and t=2, linear: t = 1.9, cpu = 3.8.
        assert!((f.t95.unwrap() - 1.9).abs() < 1e-9);
        assert!((f.cpu95.unwrap() - 3.8).abs() < 1e-9);
        assert_eq!((f.watched_secs, f.cpu_total), (4.0, 6.0));
        assert_eq!(f.cgroup, Some(G + 10));
        // Nothing saved: no time to 95%.
        let flat = run("none", true, &[(0.0, 2 * G, 0.0), (3.0, 2 * G, 0.1)]);
        let f = Figures::of(&flat, 2 * G, 4, 2 * G);
        assert_eq!((f.t95, f.saved), (None, 0));
        assert!((f.density - 2.0).abs() < 1e-12);
    }

    #[test]
    fn ratios_and_the_result_line() {
        let ours = run("dedup-fastest", true, &[(0.0, 2 * G, 0.0), (1.0, G, 2.0)]);
        let ksm = run(
            "ksm-max",
            true,
            &[(0.0, 2 * G, 0.0), (10.0, G + G / 2, 10.0)],
        );
        let base = 2 * G;
        let o = Figures::of(&ours, base, 4, base);
        let k = Figures::of(&ksm, base, 4, base);
        let r = Ratios::of(&o, &k).unwrap();
        // ours: 95% at 0.95 s and 1.9 CPU-s; KSM: 9.5 s and 9.5 CPU-s; savings 1 vs 0.5 GiB.
        assert!((r.speedup - 10.0).abs() < 1e-9);
        assert!((r.cpu_ratio - 0.2).abs() < 1e-9);
        assert!((r.savings_ratio - 2.0).abs() < 1e-9);
        assert_eq!(
            r.result_line(),
            "RESULT speedup_vs_ksm_max=10.00 cpu_ratio=0.200 savings_ratio=2.000"
        );
        assert!((r.savings_ratio_net - 2.0).abs() < 1e-9);
        // KSM's reverse-map items come off its savings: 0.5 GiB - 0.25 GiB.
        let with_items = ModeRun {
            kernel_metadata: Some(G / 4),
            ..ksm.clone()
        };
        let k = Figures::of(&with_items, base, 4, base);
        assert_eq!((k.saved, k.saved_net), ((G / 2) as i64, (G / 4) as i64));
        let r = Ratios::of(&o, &k).unwrap();
        assert!((r.savings_ratio - 2.0).abs() < 1e-9);
        assert!((r.savings_ratio_net - 4.0).abs() < 1e-9);
        assert!(
            r.net_line().ends_with("savings_ratio_net=4.000"),
            "{}",
            r.net_line()
        );
        // KSM that did not converge counts with the cap as its time and its whole CPU.
        let slow = ModeRun {
            converged: false,
            ..ksm
        };
        let k = Figures::of(&slow, base, 4, base);
        let r = Ratios::of(&o, &k).unwrap();
        assert!((r.speedup - 300.0 / 0.95).abs() < 1e-9);
        assert!((r.cpu_ratio - 0.19).abs() < 1e-9);
        // A run that saved nothing has no time to 95%.
        let none = run("dedup-fastest", true, &[(0.0, base, 0.0), (1.0, base, 1.0)]);
        assert!(Ratios::of(&Figures::of(&none, base, 4, base), &k).is_none());
    }

    #[test]
    fn savings_round_without_negative_zero() {
        assert_eq!(signed_mib(-300_000), "0");
        assert_eq!(signed_mib(-(3 << 20)), "-3");
        assert_eq!(signed_mib(5 << 20), "5");
    }

    #[test]
    fn table_and_csv_have_a_row_per_mode_and_sample() {
        let runs = [
            run("none", true, &[(0.0, 2 * G, 0.0), (3.0, 2 * G, 0.1)]),
            ModeRun {
                kernel_metadata: Some(G / 8),
                ..run("ksm-default", false, &[(0.0, 2 * G, 0.0), (300.0, G, 30.0)])
            },
        ];
        let figures: Vec<Figures> = runs
            .iter()
            .map(|r| Figures::of(r, 2 * G, 4, 2 * G))
            .collect();
        let table = markdown_table(&figures);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| mode |"));
        assert!(lines[2].starts_with(
            "| none | 3.2 | yes | - | - | 0.1 (3) | 2048 | 2048 | 0 | - | 0 | 0.0% |"
        ));
        assert!(lines[3].starts_with("| ksm-default | 3.2 | no (time cap) | > 300 | > 30.0 |"));
        assert!(lines[3].contains("| 1024 | 128 | 896 | 50.0% | 4.00 | 8 (0) |"));
        let text = csv(&runs, 2 * G);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows[0], CSV_HEADER);
        assert_eq!(rows.len(), 5);
        assert_eq!(
            rows[4],
            format!("ksm-default,300.000,{G},{},{G},30.000,", G + 10)
        );
    }
}
