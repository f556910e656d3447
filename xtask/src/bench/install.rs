//! Installs the peers on first use (idempotently) and makes the benchmark's certificates and
//! content. Everything cached lives under `target/bench/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::sys::{self, output};

/// Debian packages the harness drives.
const APT_PACKAGES: &[&str] = &[
    "nginx",
    "wrk",
    "nghttp2-client",
    "squid-openssl",
    "iptables",
    "curl",
    "openssl",
    "iproute2",
    "util-linux",
    "coreutils",
];
pub const MITMPROXY_VERSION: &str = "12.2.1";
/// mitmproxy 12 needs Python 3.12 or newer; pyenv's builds are tried first.
const PYTHONS: &[&str] = &[
    "/root/.pyenv/versions/3.12.1/bin/python3",
    "python3.12",
    "python3.13",
];

/// Bulk object sizes: 1 GiB for the full run, 256 MiB for the quick one.
pub const BULK_FULL: u64 = 1 << 30;
pub const BULK_QUICK: u64 = 256 << 20;

pub fn ensure_peers(bench_dir: &Path) -> Result<PathBuf> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !crate::dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        // Package scripts would start nginx and squid as host services; a policy-rc.d that
        // says "no" keeps them stopped (only if the host has none of its own).
        let _guard = NoServiceStart::install()?;
        let apt = |args: &[&str]| {
            crate::run(
                Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        };
        let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
        install.extend(&missing);
        if apt(&install).is_err() {
            apt(&["update", "-qq"])?;
            apt(&install)?;
        }
    }
    ensure_mitmproxy(bench_dir)
}

/// Returns the path of `mitmdump` in the harness's venv, creating it if needed.
fn ensure_mitmproxy(bench_dir: &Path) -> Result<PathBuf> {
    let venv = bench_dir.join("venv");
    let mitmdump = venv.join("bin/mitmdump");
    let have = Command::new(&mitmdump)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).contains(&format!("Mitmproxy: {MITMPROXY_VERSION}"))
        })
        .unwrap_or(false);
    if have {
        return Ok(mitmdump);
    }
    let python = PYTHONS
        .iter()
        .find(|p| {
            Command::new(p)
                .args([
                    "-c",
                    "import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)",
                ])
                .status()
                .is_ok_and(|s| s.success())
        })
        .context("mitmproxy 12 needs Python 3.12 or newer; none found")?;
    if venv.exists() {
        fs::remove_dir_all(&venv)?;
    }
    crate::run(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    crate::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("mitmproxy=={MITMPROXY_VERSION}")),
    )?;
    Ok(mitmdump)
}

/// A temporary `/usr/sbin/policy-rc.d` refusing service starts, removed on drop.
struct NoServiceStart(Option<PathBuf>);

impl NoServiceStart {
    fn install() -> Result<Self> {
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(Self(None));
        }
        fs::write(&path, "#!/bin/sh\nexit 101\n")?;
        sys::set_mode(&path, 0o755)?;
        Ok(Self(Some(path)))
    }
}

impl Drop for NoServiceStart {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// The benchmark's certificates and content, made once and kept in `target/bench/assets`.
pub struct Assets {
    pub dir: PathBuf,
}

/// The origin's name; every other benchmark name is a sibling under [`DOMAIN`].
pub const ORIGIN_NAME: &str = "origin.bench.test";
pub const DOMAIN: &str = "bench.test";
/// The origin listens here inside each namespace.
pub const ORIGIN_IP: &str = "127.0.0.2";

impl Assets {
    pub fn ensure(bench_dir: &Path) -> Result<Self> {
        let a = Self {
            dir: bench_dir.join("assets"),
        };
        fs::create_dir_all(a.dir.join("www"))?;
        sys::set_mode(&a.dir, 0o755)?;
        sys::set_mode(&a.dir.join("www"), 0o755)?;
        if !a.test_ca().exists() || !a.origin_cert().exists() {
            a.make_ca("test-ca", "egress bench test CA")?;
            a.make_origin_cert()?;
        }
        if !a.proxy_ca().exists() {
            a.make_ca("proxy-ca", "egress bench proxy CA (mitmproxy, squid)")?;
        }
        let small = a.dir.join("www/1k");
        if !small.exists() {
            // 1 KiB of printable bytes.
            let body: String = (0..1024)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            fs::write(&small, body)?;
        }
        for (name, size) in [("bulk-full", BULK_FULL), ("bulk-quick", BULK_QUICK)] {
            let p = a.dir.join("www").join(name);
            if fs::metadata(&p).map(|m| m.len()).ok() != Some(size) {
                // Sparse: no disk space, and TLS does not compress, so zeros cost the same.
                let f = fs::File::create(&p)?;
                f.set_len(size)?;
            }
        }
        for entry in fs::read_dir(a.dir.join("www"))? {
            sys::set_mode(&entry?.path(), 0o644)?;
        }
        Ok(a)
    }

    pub fn test_ca(&self) -> PathBuf {
        self.dir.join("test-ca.pem")
    }

    pub fn origin_cert(&self) -> PathBuf {
        self.dir.join("origin.pem")
    }

    pub fn origin_key(&self) -> PathBuf {
        self.dir.join("origin-key.pem")
    }

    pub fn proxy_ca(&self) -> PathBuf {
        self.dir.join("proxy-ca.pem")
    }

    pub fn proxy_ca_key(&self) -> PathBuf {
        self.dir.join("proxy-ca-key.pem")
    }

    pub fn www(&self) -> PathBuf {
        self.dir.join("www")
    }

    /// An ECDSA P-256 CA, as every proxy and the origin use.
    fn make_ca(&self, base: &str, cn: &str) -> Result<()> {
        output(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-days", "3650", "-subj", &format!("/CN={cn}")])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(self.dir.join(format!("{base}-key.pem")))
                .arg("-out")
                .arg(self.dir.join(format!("{base}.pem"))),
        )?;
        sys::set_mode(&self.dir.join(format!("{base}.pem")), 0o644)?;
        sys::set_mode(&self.dir.join(format!("{base}-key.pem")), 0o600)?;
        Ok(())
    }

    /// The origin's ECDSA P-256 leaf: the origin name, every sibling (`*.bench.test`, so new
    /// names for first visits verify upstream) and the origin IP.
    fn make_origin_cert(&self) -> Result<()> {
        let csr = self.dir.join("origin.csr");
        let ext = self.dir.join("origin.ext");
        fs::write(
            &ext,
            format!(
                "subjectAltName=DNS:{ORIGIN_NAME},DNS:*.{DOMAIN},IP:{ORIGIN_IP}\n\
                 basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )?;
        output(
            Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                ])
                .args(["-subj", &format!("/CN={ORIGIN_NAME}")])
                .arg("-keyout")
                .arg(self.origin_key())
                .arg("-out")
                .arg(&csr),
        )?;
        output(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "3650", "-set_serial", "1"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(self.test_ca())
                .arg("-CAkey")
                .arg(self.dir.join("test-ca-key.pem"))
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(self.origin_cert()),
        )?;
        let _ = fs::remove_file(csr);
        let _ = fs::remove_file(ext);
        sys::set_mode(&self.origin_cert(), 0o644)?;
        sys::set_mode(&self.origin_key(), 0o600)?;
        Ok(())
    }
}

/// First line of a command's output (stdout, else stderr), for the versions table.
pub fn version_of(cmd: &str, args: &[&str]) -> String {
    let text = sys::output_lossy(Command::new(cmd).args(args));
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

/// Fails unless this process runs as root (namespaces, BPF, iptables).
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`cargo xtask bench` needs root: it creates network namespaces, loads eBPF programs and adds iptables rules inside its namespaces");
    }
    Ok(())
}
