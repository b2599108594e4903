//! Runs the workload binary natively (it needs no guest) and checks its result lines.

use std::process::{Command, Output};

use guest_workload::content::{ContentMix, ContentPlan};
use guest_workload::report::ResultLine;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guest-workload"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run guest-workload: {e}"))
}

fn results(out: &Output) -> Vec<ResultLine> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| ResultLine::parse(l).unwrap_or_else(|| panic!("not a result line: {l}")))
        .collect()
}

#[test]
fn verify_fills_then_checks_every_page() {
    let out = run(&[
        "verify", "--mib", "4", "--seed", "9", "--unique", "0.5", "--zero", "0.125",
    ]);
    assert!(out.status.success(), "{out:?}");
    let lines = results(&out);
    assert_eq!(lines.len(), 2);
    let fill = &lines[0];
    assert_eq!(fill.op(), Some("fill"));
    // the host computes the same counts from the same mix
    let plan = ContentPlan::new(
        ContentMix {
            seed: 9,
            unique: 0.5,
            zero: 0.125,
            ..ContentMix::default()
        },
        1024,
    )
    .unwrap();
    let c = plan.counts();
    assert_eq!(fill.get("pages"), Some("1024"));
    assert_eq!(
        fill.get("unique_pages"),
        Some(c.unique.to_string().as_str())
    );
    assert_eq!(fill.get("zero_pages"), Some(c.zero.to_string().as_str()));
    assert_eq!(
        fill.get("dup_pages"),
        Some(c.duplicate.to_string().as_str())
    );
    let verify = &lines[1];
    assert_eq!(verify.op(), Some("verify"));
    assert_eq!(verify.get("bad_pages"), Some("0"));
    assert_eq!(verify.get("ok"), Some("1"));
}

#[test]
fn churn_rewrites_the_scheduled_pages_and_still_verifies() {
    let out = run(&["churn", "--mib", "2", "--fraction", "0.5", "--secs", "1"]);
    assert!(out.status.success(), "{out:?}");
    let lines = results(&out);
    let ops: Vec<_> = lines.iter().map(|l| l.op().unwrap().to_owned()).collect();
    assert_eq!(ops, ["fill", "churn", "verify"]);
    // 512 pages x 0.5 per second x 1 second
    assert_eq!(lines[1].get("pages_written"), Some("256"));
    assert_eq!(lines[2].get("ok"), Some("1"));
}

#[test]
fn fill_reports_and_exits_cleanly() {
    let out = run(&["fill", "--mib", "1", "--zero", "1", "--unique", "0"]);
    assert!(out.status.success(), "{out:?}");
    let lines = results(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].get("zero_pages"), Some("256"));
    assert_eq!(lines[0].get("dup_pages"), Some("0"));
}

#[test]
fn bad_input_gets_a_message_and_an_exit_code() {
    let out = run(&["verify", "--unique", "0.9", "--zero", "0.9"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exceed 1"), "{err}");

    let out = run(&["churn", "--fraction=-1", "--mib", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("churn fraction"));

    let out = run(&["explode"]);
    assert_eq!(out.status.code(), Some(2));
}
