//! Embeds the eBPF object that `cargo xtask build` compiled. A plain `cargo build` (no
//! object) still works; the binary then explains how to build it properly when run.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=EGRESS_BPF_OBJECT");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let path = match env::var_os("EGRESS_BPF_OBJECT") {
        Some(p) => {
            let p = PathBuf::from(p);
            anyhow::ensure!(
                p.is_file(),
                "EGRESS_BPF_OBJECT={} is not a file",
                p.display()
            );
            println!("cargo:rerun-if-changed={}", p.display());
            p
        }
        None => {
            let empty = out.join("egress-ebpf-missing.o");
            fs::write(&empty, b"")?;
            empty
        }
    };
    println!("cargo:rustc-env=EGRESS_BPF_OBJECT_PATH={}", path.display());
    Ok(())
}
