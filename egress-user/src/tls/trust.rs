//! What the sandboxed command of `egress run` sees as the system trust store: every
//! standard location that exists on the host, shown again with the egress CA added.
//!
//! Clients that read only the system store (wget, OpenSSL `-CApath` users, npm with
//! `cafile` pinned to the system bundle, Java's `cacerts`) ignore the CA environment
//! variables. For them egress writes, into the run directory, a copy of each location with
//! the CA added, and the command gets them bind-mounted over the originals in a mount
//! namespace of its own (see [`crate::mountns`]). The host's files are only ever read.
//!
//! [`locate`] decides which host paths to cover (pure, given the file system);
//! [`TrustFiles::write`] writes the copies and says what to mount where.

pub mod der;
pub mod pkcs12;
pub mod subject_hash;

/// Certificates the trust tests share.
#[cfg(test)]
mod testdata {
    /// `/CN=egress CA/O=egress` (CN and O as UTF8String), the shape of egress's own CA.
    pub const EGRESS_CA: &str = include_str!("trust/testdata/egress-ca.pem");
}

use std::{
    collections::HashSet,
    fs, io,
    os::unix::fs::{symlink, PermissionsExt as _},
    path::{Path, PathBuf},
};

use super::ca::CertificateAuthority;

/// PEM bundles, by distribution. Symlinks among them (Alpine's `/etc/ssl/cert.pem`,
/// RHEL's `/etc/pki/tls/certs/ca-bundle.crt`) are followed and each file covered once.
const BUNDLES: &[&str] = &[
    // Debian, Ubuntu, Alpine, Arch
    "/etc/ssl/certs/ca-certificates.crt",
    // Alpine, and BSD-style clients (LibreSSL, some Go and Rust builds)
    "/etc/ssl/cert.pem",
    // RHEL, Fedora, CentOS, Amazon Linux
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/tls/certs/ca-bundle.trust.crt",
    "/etc/pki/tls/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/openssl/ca-bundle.trust.crt",
    // openSUSE, SLES
    "/etc/ssl/ca-bundle.pem",
    "/var/lib/ca-certificates/ca-bundle.pem",
];

/// OpenSSL-style directories (`<subject hash>.N` links), read through `-CApath` and
/// `SSL_CERT_DIR`, and by OpenSSL's default lookup.
const HASHED_DIRS: &[&str] = &[
    "/etc/ssl/certs",
    "/etc/pki/ca-trust/extracted/pem/directory-hash",
];

/// Java trust stores outside a JDK (each JDK's own `lib/security/cacerts` is added by
/// [`java_homes`]).
const JAVA_STORES: &[&str] = &[
    "/etc/ssl/certs/java/cacerts",
    "/etc/pki/ca-trust/extracted/java/cacerts",
    "/etc/pki/java/cacerts",
    "/var/lib/ca-certificates/java-cacerts",
];

/// Where JDKs are installed by distribution packages.
const JVM_DIR: &str = "/usr/lib/jvm";

/// The name the egress CA is filed under in a hashed directory (plus its hash link).
const CA_FILE_NAME: &str = "egress-ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Bundle(#[from] super::ca::Error),
    #[error("the egress CA certificate cannot be parsed for its subject hash")]
    CaSubject,
    #[error("the system random number generator failed")]
    Random,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A PEM file of roots.
    Bundle,
    /// An OpenSSL hashed directory.
    HashedDir,
    /// A Java `cacerts` (JKS or PKCS#12 on the host; PKCS#12 in the sandbox).
    JavaStore,
}

/// One host trust-store location to cover, by its canonical path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub kind: Kind,
}

/// The standard locations and every JDK's `cacerts` that could exist on this host.
pub fn candidates() -> Vec<(PathBuf, Kind)> {
    let mut v: Vec<(PathBuf, Kind)> = Vec::new();
    v.extend(HASHED_DIRS.iter().map(|p| (p.into(), Kind::HashedDir)));
    v.extend(BUNDLES.iter().map(|p| (p.into(), Kind::Bundle)));
    v.extend(JAVA_STORES.iter().map(|p| (p.into(), Kind::JavaStore)));
    for home in java_homes() {
        for rel in ["lib/security/cacerts", "jre/lib/security/cacerts"] {
            v.push((home.join(rel), Kind::JavaStore));
        }
    }
    v
}

/// `$JAVA_HOME`, the JDK of the `java` on `PATH`, and every JDK under `/usr/lib/jvm`.
fn java_homes() -> Vec<PathBuf> {
    let mut homes = Vec::new();
    if let Some(h) = std::env::var_os("JAVA_HOME").filter(|h| !h.is_empty()) {
        homes.push(PathBuf::from(h));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("java"))
        .find(|j| j.is_file());
    if let Some(java) = on_path.and_then(|j| fs::canonicalize(j).ok()) {
        // <home>/bin/java
        if let Some(home) = java.parent().and_then(Path::parent) {
            homes.push(home.to_owned());
        }
    }
    if let Ok(entries) = fs::read_dir(JVM_DIR) {
        let mut jdks: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        jdks.sort();
        homes.extend(jdks);
    }
    homes
}

/// The candidates that exist with the right type, by canonical path, each once (the first
/// kind named wins), hashed directories first and parents before what lies below them:
/// the order they must be mounted in.
pub fn locate(candidates: &[(PathBuf, Kind)]) -> Vec<Location> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (path, kind) in candidates {
        let Ok(canon) = fs::canonicalize(path) else {
            continue;
        };
        let Ok(meta) = fs::metadata(&canon) else {
            continue;
        };
        let fits = match kind {
            Kind::HashedDir => meta.is_dir(),
            Kind::Bundle | Kind::JavaStore => meta.is_file(),
        };
        if fits && seen.insert(canon.clone()) {
            out.push(Location {
                path: canon,
                kind: *kind,
            });
        }
    }
    out.sort_by_key(|l| (l.kind != Kind::HashedDir, l.path.components().count()));
    out
}

/// One bind mount for the command's mount namespace: `source` (in the run directory) over
/// `target` (a host location), read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub dir: bool,
}

/// The trust files of one run.
#[derive(Debug)]
pub struct TrustFiles {
    /// System roots plus the egress CA, PEM: what the CA environment variables name.
    pub bundle: PathBuf,
    /// A hashed directory holding the system roots and the egress CA (`SSL_CERT_DIR`).
    pub cert_dir: PathBuf,
    /// What to mount over the host's locations, in order.
    pub mounts: Vec<BindMount>,
}

impl TrustFiles {
    /// Writes into `dir` the bundle, the hashed directory, and a copy of each location
    /// with the CA added. Everything is world-readable: the command runs unprivileged.
    pub fn write(
        dir: &Path,
        ca: &CertificateAuthority,
        locations: &[Location],
    ) -> Result<TrustFiles, Error> {
        let ca_der = ca.cert_der().as_ref();
        let ca_hash = subject_hash::of_cert(ca_der).ok_or(Error::CaSubject)?;
        let ca_pem = format!(
            "# egress CA, SHA-256 {}\n{}",
            ca.fingerprint_sha256(),
            ca.cert_pem()
        );
        let roots = super::ca::system_roots_pem();

        let bundle = dir.join("ca-bundle.pem");
        ca.write_trust_bundle(&bundle)?;

        let mounts_dir = dir.join("mounts");
        make_dir(&mounts_dir)?;
        let mut mounts = Vec::new();
        let mut cert_dir = None;
        let mut java_store = None;
        for (i, loc) in locations.iter().enumerate() {
            let name = loc
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let source = mounts_dir.join(format!("{i}-{name}"));
            match loc.kind {
                Kind::HashedDir => {
                    copy_tree(&loc.path, &source)?;
                    add_to_hashed_dir(&source, ca_hash, &ca_pem)?;
                    cert_dir.get_or_insert_with(|| source.clone());
                }
                Kind::Bundle => {
                    let host = fs::read(&loc.path).map_err(io_err("read", &loc.path))?;
                    write_file(&source, &appended(&host, &ca_pem))?;
                }
                Kind::JavaStore => {
                    let store = match &java_store {
                        Some(s) => s,
                        None => java_store.insert(java_trust_store(&roots, ca_der)?),
                    };
                    write_file(&source, store)?;
                }
            }
            // A file inside a directory already copied (Debian's bundle and Java store
            // live in /etc/ssl/certs) is replaced in the copy and needs no mount of its own.
            let inside = mounts.iter().find_map(|m: &BindMount| {
                let rel = loc.path.strip_prefix(&m.target).ok()?;
                (m.dir && loc.kind != Kind::HashedDir).then(|| m.source.join(rel))
            });
            match inside {
                Some(copy) => {
                    let _ = fs::remove_file(&copy);
                    fs::copy(&source, &copy).map_err(io_err("copy", &source))?;
                    fs::set_permissions(&copy, fs::Permissions::from_mode(0o644))
                        .map_err(io_err("chmod", &copy))?;
                }
                None => mounts.push(BindMount {
                    source,
                    target: loc.path.clone(),
                    dir: loc.kind == Kind::HashedDir,
                }),
            }
        }
        // With no hashed directory on the host, make one from the roots for SSL_CERT_DIR.
        let cert_dir = match cert_dir {
            Some(d) => d,
            None => {
                let d = dir.join("certs");
                make_dir(&d)?;
                for cert in pem_certs(&roots) {
                    if let Some(hash) = subject_hash::of_cert(&cert) {
                        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert));
                        let name = free_hash_name(&d, hash)?;
                        write_file(&d.join(name), pem.as_bytes())?;
                    }
                }
                add_to_hashed_dir(&d, ca_hash, &ca_pem)?;
                d
            }
        };
        Ok(TrustFiles {
            bundle,
            cert_dir,
            mounts,
        })
    }
}

/// `host` with the CA's PEM after it, on a line of its own.
fn appended(host: &[u8], ca_pem: &str) -> Vec<u8> {
    let mut out = host.to_vec();
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(ca_pem.as_bytes());
    out
}

/// The DER of every `CERTIFICATE` in a PEM bundle.
fn pem_certs(bundle: &[u8]) -> Vec<Vec<u8>> {
    pem::parse_many(bundle)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect()
}

/// A PKCS#12 store of the system roots and the CA, as Java's `cacerts`.
fn java_trust_store(roots_pem: &[u8], ca_der: &[u8]) -> Result<Vec<u8>, Error> {
    let roots = pem_certs(roots_pem);
    let aliases: Vec<String> = (0..roots.len()).map(|i| format!("system-{i}")).collect();
    let mut trusted: Vec<pkcs12::Trusted<'_>> = roots
        .iter()
        .zip(&aliases)
        .filter(|(der, _)| der.as_slice() != ca_der)
        .map(|(der, alias)| pkcs12::Trusted { alias, der })
        .collect();
    trusted.push(pkcs12::Trusted {
        alias: "egress-ca",
        der: ca_der,
    });
    pkcs12::trust_store(&trusted, pkcs12::JAVA_PASSWORD).map_err(|_| Error::Random)
}

/// Adds the CA to a hashed directory: as `egress-ca.pem` and a `<hash>.N` link to it.
fn add_to_hashed_dir(dir: &Path, hash: u32, ca_pem: &str) -> Result<(), Error> {
    let file = dir.join(CA_FILE_NAME);
    let _ = fs::remove_file(&file);
    write_file(&file, ca_pem.as_bytes())?;
    let link = dir.join(free_hash_name(dir, hash)?);
    symlink(CA_FILE_NAME, &link).map_err(io_err("link", &link))
}

/// The first `<hash>.N` not taken in `dir` (OpenSSL tries .0, .1, ... in turn).
fn free_hash_name(dir: &Path, hash: u32) -> Result<String, Error> {
    for n in 0.. {
        let name = format!("{hash:08x}.{n}");
        match fs::symlink_metadata(dir.join(&name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(name),
            Err(e) => return Err(io_err("stat", &dir.join(&name))(e)),
            Ok(_) => {}
        }
    }
    unreachable!("u32 range exhausted")
}

/// Copies a directory as it is: symlinks as symlinks (relative ones resolve inside the
/// copy, absolute ones where they always did), files by content, directories recursively.
fn copy_tree(from: &Path, to: &Path) -> Result<(), Error> {
    make_dir(to)?;
    let entries = fs::read_dir(from).map_err(io_err("read", from))?;
    for entry in entries {
        let entry = entry.map_err(io_err("read", from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ty = entry.file_type().map_err(io_err("stat", &src))?;
        if ty.is_symlink() {
            let target = fs::read_link(&src).map_err(io_err("read", &src))?;
            symlink(&target, &dst).map_err(io_err("link", &dst))?;
        } else if ty.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ty.is_file() {
            fs::copy(&src, &dst).map_err(io_err("copy", &src))?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o644))
                .map_err(io_err("chmod", &dst))?;
        }
    }
    Ok(())
}

fn make_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", dir))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    fs::write(path, bytes).map_err(io_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io_err("chmod", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &Path) -> CertificateAuthority {
        crate::tls::install_crypto_provider();
        CertificateAuthority::load_or_create(&dir.join("conf")).expect("a CA")
    }

    #[test]
    fn locate_follows_symlinks_covers_each_file_once_and_orders_for_mounting() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let certs = root.join("etc/ssl/certs");
        fs::create_dir_all(certs.join("java")).unwrap();
        fs::write(certs.join("ca-certificates.crt"), "pem").unwrap();
        fs::write(certs.join("java/cacerts"), "jks").unwrap();
        // Alpine: cert.pem is a link to the bundle.
        symlink("certs/ca-certificates.crt", root.join("etc/ssl/cert.pem")).unwrap();
        let found = locate(&[
            (root.join("etc/ssl/cert.pem"), Kind::Bundle),
            (certs.join("java/cacerts"), Kind::JavaStore),
            (certs.join("ca-certificates.crt"), Kind::Bundle),
            (root.join("missing.pem"), Kind::Bundle),
            // Wrong type: a directory named as a bundle, a file named as a directory.
            (certs.join("java"), Kind::Bundle),
            (certs.join("ca-certificates.crt"), Kind::HashedDir),
            (certs.clone(), Kind::HashedDir),
        ]);
        let canon = |p: &Path| fs::canonicalize(p).unwrap();
        assert_eq!(
            found,
            vec![
                Location {
                    path: canon(&certs),
                    kind: Kind::HashedDir
                },
                Location {
                    path: canon(&certs.join("ca-certificates.crt")),
                    kind: Kind::Bundle
                },
                Location {
                    path: canon(&certs.join("java/cacerts")),
                    kind: Kind::JavaStore
                },
            ]
        );
    }

    #[test]
    fn written_files_add_the_ca_and_leave_the_host_alone() {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("host");
        let certs = host.join("certs");
        fs::create_dir_all(certs.join("java")).unwrap();
        fs::write(certs.join("ca-certificates.crt"), "HOST BUNDLE").unwrap();
        fs::write(certs.join("java/cacerts"), "JKS").unwrap();
        fs::write(certs.join("Some_Root.pem"), "ROOT").unwrap();
        symlink("Some_Root.pem", certs.join("12345678.0")).unwrap();
        let other = host.join("tls-ca-bundle.pem");
        fs::write(&other, "OTHER BUNDLE\n").unwrap();
        let locations = locate(&[
            (certs.clone(), Kind::HashedDir),
            (certs.join("ca-certificates.crt"), Kind::Bundle),
            (other.clone(), Kind::Bundle),
            (certs.join("java/cacerts"), Kind::JavaStore),
        ]);
        let ca = ca(t.path());
        let run = t.path().join("run");
        fs::create_dir(&run).unwrap();
        let files = TrustFiles::write(&run, &ca, &locations).unwrap();

        let hash = subject_hash::of_cert(ca.cert_der()).unwrap();
        // The directory and the other bundle are mounted; the files inside the directory
        // are replaced in its copy instead.
        assert_eq!(files.mounts.len(), 2, "{:#?}", files.mounts);
        assert_eq!(files.mounts[0].target, fs::canonicalize(&certs).unwrap());
        assert!(files.mounts[0].dir);
        assert_eq!(files.mounts[1].target, fs::canonicalize(&other).unwrap());
        let copy = &files.mounts[0].source;
        assert_eq!(files.cert_dir, *copy);
        let link = copy.join(format!("{hash:08x}.0"));
        assert!(fs::read_to_string(&link).unwrap().contains(ca.cert_pem()));
        assert_eq!(fs::read_link(&link).unwrap(), Path::new(CA_FILE_NAME));
        assert_eq!(
            fs::read_link(copy.join("12345678.0")).unwrap(),
            Path::new("Some_Root.pem")
        );
        assert_eq!(
            fs::read_to_string(copy.join("Some_Root.pem")).unwrap(),
            "ROOT"
        );
        let bundle = fs::read_to_string(copy.join("ca-certificates.crt")).unwrap();
        assert!(bundle.starts_with("HOST BUNDLE\n# egress CA"), "{bundle}");
        assert!(bundle.ends_with(ca.cert_pem()));
        let other_copy = fs::read_to_string(&files.mounts[1].source).unwrap();
        assert!(other_copy.starts_with("OTHER BUNDLE\n# egress CA"));
        let p12 = fs::read(copy.join("java/cacerts")).unwrap();
        assert_eq!(p12[0], 0x30, "a PKCS#12 store, not the host's JKS");
        assert!(p12
            .windows(ca.cert_der().len())
            .any(|w| w == ca.cert_der().as_ref()));
        // The run's bundle: the system roots and the CA.
        let b = fs::read_to_string(&files.bundle).unwrap();
        assert!(b.ends_with(ca.cert_pem()));
        assert!(
            b.matches("BEGIN CERTIFICATE").count() > 1,
            "no system roots"
        );
        // The host's files are as they were.
        assert_eq!(
            fs::read_to_string(certs.join("ca-certificates.crt")).unwrap(),
            "HOST BUNDLE"
        );
        assert_eq!(
            fs::read_to_string(certs.join("java/cacerts")).unwrap(),
            "JKS"
        );
        assert_eq!(fs::read_to_string(&other).unwrap(), "OTHER BUNDLE\n");
        assert!(!certs.join(CA_FILE_NAME).exists());
        let mode = fs::metadata(&files.mounts[1].source)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn without_a_host_directory_the_roots_get_one_of_their_own() {
        let t = tempfile::tempdir().unwrap();
        let ca = ca(t.path());
        let run = t.path().join("run");
        fs::create_dir(&run).unwrap();
        let files = TrustFiles::write(&run, &ca, &[]).unwrap();
        assert!(files.mounts.is_empty());
        let hash = subject_hash::of_cert(ca.cert_der()).unwrap();
        assert!(files.cert_dir.join(format!("{hash:08x}.0")).exists());
        let links = fs::read_dir(&files.cert_dir).unwrap().count();
        assert!(
            links > 10,
            "only {links} entries: the system roots are missing"
        );
    }
}
