//! The `guest-images` binary's handling of bad input; none of these reach apt or the network.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guest-images"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run guest-images: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_compose_parameters_are_usage_errors() {
    let out = run(&["compose", "--size", "1000"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("not a multiple of 4096"),
        "{}",
        stderr(&out)
    );

    let out = run(&["compose", "--size", "2M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no room above the reserved"));

    let out = run(&["compose", "--unique", "0.8", "--zero", "0.8"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("fractions"));

    let out = run(&["compose", "--guests", "0"]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["compose", "--size", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("bad size"));

    let out = run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn compose_without_a_build_says_to_run_build_first() {
    let out_dir = std::env::temp_dir().join(format!("guest-images-nobuild-{}", std::process::id()));
    let out = run(&[
        "compose",
        "--out",
        out_dir.to_str().unwrap(),
        "--size",
        "4M",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("run `guest-images build`"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out_dir.join("compose").exists());
}

#[test]
fn compose_refuses_a_bad_package_name_or_dest_before_anything_else() {
    let file = std::env::temp_dir().join(format!("guest-images-dest-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    for (args, want) in [
        (&["--packages", ""][..], "is not a Debian package name"),
        (
            &["--packages", "libc6,../x"][..],
            "\"../x\" is not a Debian package name",
        ),
        (
            &["--dest", file.to_str().unwrap()][..],
            "exists and is not a folder",
        ),
    ] {
        let out = run(&[&["compose", "--size", "4M"][..], args].concat());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    std::fs::remove_file(&file).unwrap();
}
