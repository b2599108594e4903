//! Assembles the test guests in `asm/` into flat binaries with GNU binutils.
//!
//! Each `asm/NAME.S` becomes `$OUT_DIR/NAME.bin`: `as` to an object, `ld` at the flat load
//! address, `objcopy -O binary`. The tools can be overridden with the `AS`, `LD` and `OBJCOPY`
//! environment variables.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The guests built from `asm/NAME.S`.
const GUESTS: &[&str] = &["probe", "reset", "triple_fault", "hostile"];

/// Address the guests are linked at (they are position independent; this only fixes symbols).
const LOAD_ADDRESS: &str = "0x100000";

fn tool(var: &str, default: &str) -> String {
    println!("cargo:rerun-if-env-changed={var}");
    env::var(var).unwrap_or_else(|_| default.to_string())
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let status = Command::new(program).args(args).status().map_err(|e| {
        format!(
            "cannot run `{program}` ({e}): install GNU binutils (Debian: apt-get install binutils)"
        )
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed with {status}",
            args.join(" ")
        ))
    }
}

fn build(name: &str, src_dir: &Path, out_dir: &Path, tools: &[String; 3]) -> Result<(), String> {
    let [assembler, linker, objcopy] = tools;
    let source = src_dir.join(format!("{name}.S"));
    println!("cargo:rerun-if-changed={}", source.display());
    let object = out_dir.join(format!("{name}.o"));
    let elf = out_dir.join(format!("{name}.elf"));
    let bin = out_dir.join(format!("{name}.bin"));
    let path = |p: &Path| p.to_string_lossy().into_owned();

    run(
        assembler,
        &[
            "--64",
            "-I",
            &path(src_dir),
            "-o",
            &path(&object),
            &path(&source),
        ],
    )?;
    run(
        linker,
        &[
            "-m",
            "elf_x86_64",
            "-N",
            "-e",
            "_start",
            "-Ttext",
            LOAD_ADDRESS,
            "-o",
            &path(&elf),
            &path(&object),
        ],
    )?;
    run(objcopy, &["-O", "binary", &path(&elf), &path(&bin)])
}

fn main() -> ExitCode {
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        eprintln!("OUT_DIR is not set: build this crate with cargo");
        return ExitCode::FAILURE;
    };
    let src_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("asm");
    let tools = [
        tool("AS", "as"),
        tool("LD", "ld"),
        tool("OBJCOPY", "objcopy"),
    ];
    // Shared by several guests through `.include`.
    for include in ["console.inc", "idt.inc", "pic.inc", "print.inc"] {
        println!("cargo:rerun-if-changed={}", src_dir.join(include).display());
    }
    for name in GUESTS {
        if let Err(e) = build(name, &src_dir, &out_dir, &tools) {
            eprintln!("test-guests: building {name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
