//! Orchestration: install the BPF toolchain, build the eBPF object into `egress`, run it,
//! and run every check CI runs.
#![forbid(unsafe_code)]

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod deploy;
mod fuzz;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test egress")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: nightly rust-src, LLVM 22, bpf-linker. Idempotent.
    Setup,
    /// Build the eBPF object and the `egress` binary that embeds it (installing what the
    /// build lacks first).
    Build {
        /// Build user space in debug mode (the eBPF object is always release).
        #[arg(long)]
        debug: bool,
    },
    /// Install what the build lacks (as `setup` does, quick once done), build, then run
    /// `egress` with the given arguments (as root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// setup, fmt, clippy -D warnings, unit and property tests, a short run of each fuzz
    /// target, the deployment files under deploy/, then the privileged end-to-end tests.
    Test {
        /// Extra arguments for the privileged test binary (a test name filter, for example).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Only the privileged end-to-end tests, or one file of them (as root): setup, build,
    /// then `cargo test -p egress-tests`. No fmt, clippy, unit tests or fuzzing.
    ///
    /// Examples: `cargo xtask e2e clients` (every real client),
    /// `cargo xtask e2e daemon -- restart` (the daemon tests whose name has "restart").
    E2e {
        /// A file under tests/tests/ without `.rs` (clients, capture, daemon, ...); all when
        /// omitted.
        file: Option<String>,
        /// Extra arguments for the test binary, after `--` (a test name filter, for example).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the libFuzzer targets under fuzz/ (nightly; installs cargo-fuzz into
    /// target/tools). A crash fails the run and names its reproducer.
    Fuzz {
        /// Seconds per target.
        #[arg(long, value_name = "S", default_value_t = 30)]
        time: u64,
        /// Targets to run (default: all): sniff, dns, policy, secrets_stream.
        targets: Vec<String>,
    },
    /// Validate the deployment files under deploy/ (part of `test`).
    CheckDeploy {
        /// Use this egress binary for `egress daemon check` instead of building one.
        #[arg(long, value_name = "PATH")]
        egress_bin: Option<PathBuf>,
    },
    /// Build the container image (`egress:local`) from the release binary, offline: assembles
    /// target/image and runs `docker build -f deploy/docker/Dockerfile` on it. Needs dockerd.
    Image {
        /// Tag of the image.
        #[arg(long, default_value = deploy::IMAGE_TAG)]
        tag: String,
        /// Put this egress binary in the image instead of building one.
        #[arg(long, value_name = "PATH")]
        egress_bin: Option<PathBuf>,
    },
    /// Soak egress under hostile load on loopback (idle connections by the thousand,
    /// slowloris, header bombs, malformed TLS, HTTP/2 rapid reset and CONTINUATION floods)
    /// beside a steady client; fails unless egress holds. Writes target/bench/SOAK.md and the
    /// soak section of BENCHMARKS.md. Needs root; stops by itself (about 2 minutes).
    Soak {
        /// About a minute, 2,000 idle connections; writes target/bench/SOAK.quick.md only.
        #[arg(long)]
        quick: bool,
        /// Use this egress binary instead of building one.
        #[arg(long, value_name = "PATH")]
        egress_bin: Option<PathBuf>,
    },
    /// Side-by-side benchmarks of egress, direct, mitmproxy and Squid; writes BENCHMARKS.md.
    /// Installs its peers on first use. Needs root.
    Bench {
        /// A run of about two minutes; writes target/bench/BENCHMARKS.quick.md.
        #[arg(long, conflicts_with = "smoke")]
        quick: bool,
        /// Only check that every peer starts and answers one request, and that the node
        /// daemon adds, serves and removes one netns sandbox (for CI).
        #[arg(long)]
        smoke: bool,
        /// Use this egress binary instead of building one.
        #[arg(long, value_name = "PATH")]
        egress_bin: Option<PathBuf>,
        /// Only the node daemon section (with --quick: its quick plan); prints its table and
        /// writes no report.
        #[arg(long, conflicts_with = "smoke")]
        daemon_only: bool,
        /// Internal: run one load-generator job (JSON) inside a sandbox.
        #[arg(long, hide = true, value_name = "JSON")]
        internal: Option<String>,
    },
}

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Tools the privileged tests drive as real clients.
const TEST_PACKAGES: &[&str] = &[
    "curl",
    "iproute2",
    "util-linux",
    "python3",
    "openssl",
    "bind9-dnsutils",
    // `bpftool cgroup show`: which programs a sandbox's cgroup holds.
    "bpftool",
    // prometheus_client's OpenMetrics parser checks the daemon's /metrics.
    "python3-prometheus-client",
    // The deployment files' validators: `systemd-analyze verify`, and a venv for the
    // Compose and Kubernetes ones (deploy.rs).
    "systemd",
    "python3-venv",
    // The container tests' runtime: dockerd, containerd and runc (tests/src/containers.rs
    // starts dockerd when none runs).
    "docker.io",
    // Clients that trust only the system store (tests/tests/clients.rs): wget (GnuTLS),
    // and Java's HttpClient and keytool (cacerts). On a machine without a JDK this is
    // 111 MB of packages: fetching and unpacking them took under 10 s here.
    "wget",
    "default-jdk-headless",
    // More of them: Python's requests (Debian's certifi is the system bundle), Ruby's
    // Net::HTTP, and git over smart HTTP (libcurl, served by `git http-backend`).
    "python3-requests",
    "ruby",
    "git",
    // And Go's crypto/x509 (an `http.Get` the test builds): 81 MB to fetch and
    // 464 MB on disk here, without recommends.
    "golang-go",
];
/// uv, which Debian does not package: installed from PyPI (`install_uv`).
const UV: &str = "uv==0.13.9";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Seconds per fuzz target in `cargo xtask test`: one minute for the four; building the
/// fuzz crate costs more (see README, Fuzzing).
const CI_FUZZ_SECONDS: u64 = 15;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build { debug } => build(!debug).map(|_| ()),
        Cmd::Run { args } => {
            let bin = build(true)?;
            let status = Command::new(bin).args(args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test { args } => test(args),
        Cmd::E2e { file, args } => {
            if let Some(f) = &file {
                ensure!(
                    root.join(format!("tests/tests/{f}.rs")).is_file(),
                    "no test file tests/tests/{f}.rs: give one of the files under tests/tests/ \
                     without `.rs` (clients, daemon, ...)"
                );
            }
            setup()?;
            let bin = build(true)?;
            privileged_tests(&ebpf_object(), &bin, file.as_deref(), args)
        }
        Cmd::Fuzz { time, targets } => fuzz::run_targets(&targets, time),
        Cmd::CheckDeploy { egress_bin } => {
            let bin = match egress_bin {
                Some(b) => b,
                None => build(true)?,
            };
            deploy::check(&bin)
        }
        Cmd::Image { tag, egress_bin } => {
            let bin = match egress_bin {
                Some(b) => b,
                None => build(true)?,
            };
            let tag = deploy::image(&bin, &tag)?;
            println!("{tag}");
            Ok(())
        }
        Cmd::Soak { quick, egress_bin } => {
            bench::soak::run(bench::soak::Options { quick, egress_bin })
        }
        Cmd::Bench {
            internal: Some(job),
            ..
        } => bench::internal(&job),
        Cmd::Bench {
            quick,
            smoke,
            egress_bin,
            daemon_only,
            internal: None,
        } => bench::run(bench::Options {
            quick,
            smoke,
            daemon_only,
            egress_bin,
        }),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// What the build needs (nightly rust-src, LLVM 22, bpf-linker), installed if missing.
/// Idempotent and quick once done (a few process spawns), so every build runs it: the
/// README's first command works on a fresh machine.
fn setup_build() -> Result<()> {
    // Nightly rust-src, for -Z build-std=core.
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()?;
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    apt_install(
        APT_PACKAGES
            .iter()
            .copied()
            .filter(|p| !dpkg_installed(p))
            .collect(),
    )?;
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !have_linker {
        // Against Debian's LLVM 22, not the system's default LLVM (which fails with
        // `unable to find library -lLLVM`).
        let path = format!("{LLVM_PREFIX}/bin:{}", env::var("PATH").unwrap_or_default());
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    }
    Ok(())
}

/// The build's needs, then the tests' clients and validators.
fn setup() -> Result<()> {
    setup_build()?;
    let mut missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    // Node may come from elsewhere than Debian; only install it when there is none at all.
    if !Path::new("/usr/bin/node").exists() {
        missing.push("nodejs");
    }
    // Likewise npm (NodeSource's nodejs ships it and conflicts with Debian's npm).
    if !Path::new("/usr/bin/npm").exists() {
        missing.push("npm");
    }
    apt_install(missing)?;
    install_uv()?;
    deploy::install_validators()?;
    Ok(())
}

/// A venv at `venv` holding exactly `packages` (pinned `name==version`), from PyPI. Made
/// again only when the list changes (a stamp file in the venv records it): idempotent.
fn pinned_venv(venv: &Path, packages: &[&str]) -> Result<()> {
    let stamp = venv.join("egress-requirements.txt");
    let want = packages.join("\n");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    if venv.exists() {
        fs::remove_dir_all(venv)?;
    }
    // Debian's python3 (python3-venv, installed by setup), not whatever is first on PATH.
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(packages))?;
    fs::write(&stamp, &want)?;
    Ok(())
}

/// Where `install_uv` puts uv's venv.
fn uv_venv() -> PathBuf {
    workspace_root().join("target/clients/venv")
}

/// uv, pinned, from PyPI into `target/clients/venv`: a client of the tests
/// (tests/tests/clients.rs) that Debian does not package.
fn install_uv() -> Result<()> {
    pinned_venv(&uv_venv(), &[UV])
}

fn apt_install(missing: Vec<&str>) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Path of the compiled eBPF object.
fn ebpf_object() -> PathBuf {
    workspace_root().join("target/bpfel-unknown-none/release/egress")
}

fn build_ebpf() -> Result<PathBuf> {
    setup_build()?;
    run(Command::new("cargo")
        .args(["+nightly", "build", "-p", "egress-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        // Outer cargo/rustup settings would otherwise pin the stable toolchain.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER"))?;
    let obj = ebpf_object();
    if !obj.is_file() {
        bail!("the eBPF build did not produce {}", obj.display());
    }
    Ok(obj)
}

/// Builds everything; returns the `egress` binary.
fn build(release: bool) -> Result<PathBuf> {
    let obj = build_ebpf()?;
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "-p", "egress-user", "-p", "egress-tests", "--bins"])
        .env("EGRESS_BPF_OBJECT", &obj);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root().join("target").join(profile).join("egress"))
}

fn test(args: Vec<OsString>) -> Result<()> {
    setup()?;
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    let obj = build_ebpf()?;
    run(Command::new("cargo")
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--exclude",
            "egress-ebpf",
            "--",
            "-D",
            "warnings",
        ])
        .env("EGRESS_BPF_OBJECT", &obj))?;
    run(Command::new("cargo")
        .args(["+nightly", "clippy", "-p", "egress-ebpf", "--release"])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTUP_TOOLCHAIN"))?;
    // Unit tests of every default member (no root needed).
    run(Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--exclude",
            "egress-ebpf",
            "--exclude",
            "egress-tests",
        ])
        .env("EGRESS_BPF_OBJECT", &obj))?;
    // Each fuzz target briefly, from its seeds (no root needed).
    fuzz::run_targets(&[], CI_FUZZ_SECONDS)?;
    // The deployment files, checked with the release binary (no root needed).
    let bin = build(true)?;
    deploy::check(&bin)?;

    let skip = env::var_os("EGRESS_SKIP_PRIVILEGED").is_some_and(|v| v == "1");
    // On CI, skipping is a failure: a green run must mean the kernel was tested.
    if skip && env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        bail!(
            "EGRESS_SKIP_PRIVILEGED=1 with CI set: CI does not pass without the privileged tests"
        );
    }
    if skip {
        eprintln!();
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!(
            "!! EGRESS_SKIP_PRIVILEGED=1: the privileged end-to-end tests were NOT run.   !!"
        );
        eprintln!(
            "!! Nothing has been checked against the kernel. Do not treat this as green.  !!"
        );
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        return Ok(());
    }
    privileged_tests(&obj, &bin, None, args)
}

/// The privileged end-to-end tests (`egress-tests`), all or one file of them, against the
/// eBPF object `obj` and the binary `bin` that embeds it.
fn privileged_tests(obj: &Path, bin: &Path, file: Option<&str>, args: Vec<OsString>) -> Result<()> {
    // The egress image's build context, for the test that runs the daemon from its image.
    let image_context = workspace_root().join("target/image");
    deploy::assemble(bin, &image_context)?;
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--release", "-p", "egress-tests"])
        .env("EGRESS_BPF_OBJECT", obj)
        .env("EGRESS_BIN", bin)
        .env("EGRESS_IMAGE_CONTEXT", &image_context)
        // Installed by setup, which every caller has run.
        .env("EGRESS_UV", uv_venv().join("bin/uv"));
    if let Some(file) = file {
        ensure!(
            workspace_root()
                .join(format!("tests/tests/{file}.rs"))
                .is_file(),
            "no test file tests/tests/{file}.rs; the files are those under tests/tests/"
        );
        cmd.args(["--test", file]);
    }
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    run(&mut cmd)
}
