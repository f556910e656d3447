//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/`, built on nightly with cargo-fuzz
//! (installed into `target/tools`, pinned), each run for a fixed time from its committed
//! seed corpus. A crash fails the run and names the input that reproduces it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use crate::{run, workspace_root};

/// The targets, in the order they run; each has its seeds in `fuzz/corpus/<target>`.
pub const TARGETS: &[&str] = &["sniff", "dns", "policy", "secrets_stream"];

const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// No sanitizer: the code under test is safe Rust, and ASan would halve the executions per
/// second. Debug assertions (and so overflow checks) are on: an overflow is a bug found.
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

/// libFuzzer options of every run. `-timeout`: an input that takes this long is a hang,
/// reported like a crash.
const RUN_FLAGS: &[&str] = &["-timeout=10", "-print_final_stats=1"];

/// What one target's run did.
pub struct Outcome {
    pub target: &'static str,
    pub execs: Option<u64>,
    pub coverage: Option<String>,
    pub failure: Option<String>,
}

/// Runs `targets` (all when empty) for `seconds` each; fails if any of them crashed or hung.
pub fn run_targets(targets: &[String], seconds: u64) -> Result<()> {
    let chosen: Vec<&'static str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets
            .iter()
            .map(|t| {
                TARGETS
                    .iter()
                    .copied()
                    .find(|k| k == t)
                    .with_context(|| format!("no fuzz target {t:?}; there are {TARGETS:?}"))
            })
            .collect::<Result<_>>()?
    };
    let root = workspace_root();
    let tool = cargo_fuzz(&root)?;
    let start = Instant::now();
    run(fuzz_command(&tool).arg("build").args(BUILD_FLAGS))?;
    eprintln!("fuzz: targets built in {:.0?}", start.elapsed());

    let mut outcomes = Vec::new();
    for target in chosen {
        outcomes.push(run_one(&root, &tool, target, seconds)?);
    }
    eprintln!("fuzz: {seconds} s per target");
    for o in &outcomes {
        eprintln!(
            "  {:<16} {:>12} execs  {}  {}",
            o.target,
            o.execs.map_or("?".into(), |e| e.to_string()),
            o.coverage.as_deref().unwrap_or("cov: ?"),
            if o.failure.is_some() { "FAILED" } else { "ok" }
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter_map(|o| o.failure.as_deref())
        .collect();
    if !failed.is_empty() {
        bail!("fuzzing found failures:\n{}", failed.join("\n"));
    }
    Ok(())
}

fn run_one(root: &Path, tool: &Path, target: &'static str, seconds: u64) -> Result<Outcome> {
    let seeds = root.join("fuzz/corpus").join(target);
    if !seeds.is_dir() {
        bail!("no seed corpus at {}", seeds.display());
    }
    // libFuzzer adds what it finds to the first corpus directory: keep that out of the
    // committed seeds.
    let work = root.join("target/fuzz/corpus").join(target);
    let logs = root.join("target/fuzz/logs");
    fs::create_dir_all(&work)?;
    fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let log = fs::File::create(&log_path)?;
    let artifacts = root.join("fuzz/artifacts").join(target);
    let started = SystemTime::now();

    let mut cmd = fuzz_command(tool);
    cmd.arg("run")
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(RUN_FLAGS)
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!("+ {cmd:?} > {}", log_path.display());
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();

    let failure = if status.success() {
        None
    } else {
        // The end of the log holds the panic message and libFuzzer's own report.
        let lines: Vec<&str> = text.lines().collect();
        // The panic message sits above the backtrace, which the tail may not reach.
        if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
            eprintln!("---- {target}: the panic");
            for l in lines.iter().skip(at).take(5) {
                eprintln!("{l}");
            }
        }
        eprintln!("---- {target}: last lines of {}", log_path.display());
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{l}");
        }
        let inputs = new_files(&artifacts, started);
        let mut msg = format!("{target}: {status}; log {}", log_path.display());
        if inputs.is_empty() {
            msg.push_str("; no reproducer was written");
        }
        for i in &inputs {
            msg.push_str(&format!(
                "\n  reproducer: {}\n  replay it: cargo +nightly fuzz run {} {target} {}",
                i.display(),
                BUILD_FLAGS.join(" "),
                i.display()
            ));
        }
        Some(msg)
    };
    Ok(Outcome {
        target,
        execs: stat(&text, "stat::number_of_executed_units:").and_then(|s| s.parse().ok()),
        coverage: last_coverage(&text),
        failure,
    })
}

/// `cov: N ft: M corp: ...` from libFuzzer's last status line.
fn last_coverage(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| {
        let at = l.find("cov: ")?;
        let rest = &l[at..];
        let end = rest
            .find(" lim:")
            .or_else(|| rest.find(" exec/s"))
            .unwrap_or(rest.len());
        Some(rest[..end].trim().to_owned())
    })
}

fn stat<'a>(log: &'a str, key: &str) -> Option<&'a str> {
    log.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
}

/// Files in `dir` changed since `since`: what libFuzzer wrote for this run's failure.
fn new_files(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m >= since)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// `cargo +nightly fuzz`, run from the workspace root with our cargo-fuzz first on PATH.
fn fuzz_command(tool: &Path) -> Command {
    let bin = tool.parent().expect("cargo-fuzz lives in a bin directory");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"])
        .env("PATH", path)
        // Outer cargo/rustup settings would otherwise pin the stable toolchain.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .stdin(Stdio::null());
    cmd
}

/// The pinned cargo-fuzz in `target/tools/bin`, installed there on first use.
fn cargo_fuzz(root: &Path) -> Result<PathBuf> {
    let tools = root.join("target/tools");
    let bin = tools.join("bin/cargo-fuzz");
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if !have {
        run(Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked", "--version"])
            .arg(CARGO_FUZZ_VERSION)
            .arg("--root")
            .arg(&tools))?;
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_figures() {
        let log = "#1024\tpulse  cov: 10 ft: 12 corp: 3/40b exec/s: 0 rss: 30Mb\n\
                   #70000\tDONE   cov: 812 ft: 2210 corp: 301/20Kb lim: 4096 exec/s: 2333 rss: 60Mb\n\
                   stat::number_of_executed_units: 70000\n\
                   stat::average_exec_per_sec:     2333\n";
        assert_eq!(
            last_coverage(log).as_deref(),
            Some("cov: 812 ft: 2210 corp: 301/20Kb")
        );
        assert_eq!(stat(log, "stat::number_of_executed_units:"), Some("70000"));
    }

    #[test]
    fn every_target_is_built_and_has_seeds() {
        let manifest =
            fs::read_to_string(workspace_root().join("fuzz/Cargo.toml")).expect("fuzz/Cargo.toml");
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "fuzz/Cargo.toml has no [[bin]] {t}"
            );
            let dir = workspace_root().join("fuzz/corpus").join(t);
            let n = fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .count();
            assert!(n > 0, "{} is empty", dir.display());
        }
    }
}
