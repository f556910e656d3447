//! The client side of interception: how the proxy verifies the real upstream servers.
//!
//! It owns the root store: the system's roots, an optional OpenSSL-style directory, and extra
//! CA files given on the command line. Verification is always on. There is deliberately no
//! way to turn it off: the proxy would then vouch, with its own CA, for servers it never
//! checked.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject as _, CertificateDer};
use tracing::{debug, warn};

use super::provider;

/// Failures to build the upstream trust configuration; all are configuration or host
/// problems, reported at startup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read trust directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read CA file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CA file {path} is not valid PEM")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {path} holds no certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificates { path: PathBuf },
    #[error("CA file {path} holds a certificate that cannot be a trust anchor")]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "no trusted root certificates: the system store is empty and no trust directory or \
         extra CA file added any"
    )]
    NoRoots,
    #[error("cannot build the upstream TLS configuration")]
    Config {
        #[source]
        source: rustls::Error,
    },
}

/// The configuration for connections to real upstreams: roots from the system store, every
/// certificate in `trust_dir`, and every certificate in each of `extra_cas`; offering `alpn`.
///
/// Broken certificates in the system store or in `trust_dir` are skipped with a warning (one
/// bad file must not take the proxy down); an `extra_cas` file was named explicitly, so any
/// problem with it is an error.
pub fn client_config(
    trust_dir: Option<&Path>,
    extra_cas: &[PathBuf],
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = Roots::default();
    roots.add_system();
    if let Some(dir) = trust_dir {
        roots.add_dir(dir)?;
    }
    for file in extra_cas {
        roots.add_file(file)?;
    }
    if roots.store.is_empty() {
        return Err(Error::NoRoots);
    }
    debug!(roots = roots.store.len(), "upstream trust store loaded");

    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Config { source })?
        .with_root_certificates(roots.store)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A root store that ignores repeats: `/etc/ssl/certs` holds each root several times over
/// (the file, its hash symlink, and the combined bundle).
struct Roots {
    store: RootCertStore,
    seen: HashSet<Vec<u8>>,
}

impl Default for Roots {
    fn default() -> Self {
        Self {
            store: RootCertStore::empty(),
            seen: HashSet::new(),
        }
    }
}

impl Roots {
    fn add(&mut self, cert: CertificateDer<'static>) -> Result<(), rustls::Error> {
        if self.seen.contains(cert.as_ref()) {
            return Ok(());
        }
        let der = cert.to_vec();
        self.store.add(cert)?;
        self.seen.insert(der);
        Ok(())
    }

    fn add_system(&mut self) {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            warn!(error = %e, "skipping part of the system trust store");
        }
        let mut skipped = 0usize;
        for cert in found.certs {
            if let Err(e) = self.add(cert) {
                skipped += 1;
                debug!(error = %e, "skipping an unusable system root");
            }
        }
        if skipped > 0 {
            warn!(
                skipped,
                "skipped unusable certificates in the system trust store"
            );
        }
    }

    /// Reads an OpenSSL-style directory: PEM files named `*.pem`, `*.crt`, or by subject hash
    /// (`1a2b3c4d.0`), regular files or symlinks to them. Unreadable entries are skipped.
    fn add_dir(&mut self, dir: &Path) -> Result<(), Error> {
        let read_dir_err = |source| Error::ReadDir {
            path: dir.to_owned(),
            source,
        };
        let mut entries = fs::read_dir(dir)
            .map_err(read_dir_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_dir_err)?;
        // Sorted, so that which duplicate wins and the order of warnings are reproducible.
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            if !is_cert_file_name(&entry.file_name().to_string_lossy()) {
                continue;
            }
            // fs::metadata follows symlinks: hash links are the common case in these dirs.
            match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => continue,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "skipping unreadable trust file");
                    continue;
                }
            }
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "skipping unreadable trust file");
                    continue;
                }
            };
            let mut found = 0usize;
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                match cert
                    .map_err(|e| e.to_string())
                    .and_then(|c| self.add(c).map_err(|e| e.to_string()))
                {
                    Ok(()) => found += 1,
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "skipping a bad certificate");
                    }
                }
            }
            if found == 0 {
                warn!(path = %path.display(), "trust file holds no usable certificate");
            }
        }
        Ok(())
    }

    fn add_file(&mut self, path: &Path) -> Result<(), Error> {
        let bytes = fs::read(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let mut found = 0usize;
        for cert in CertificateDer::pem_slice_iter(&bytes) {
            let cert = cert.map_err(|source| Error::Pem {
                path: path.to_owned(),
                source,
            })?;
            self.add(cert).map_err(|source| Error::BadCertificate {
                path: path.to_owned(),
                source,
            })?;
            found += 1;
        }
        if found == 0 {
            return Err(Error::NoCertificates {
                path: path.to_owned(),
            });
        }
        Ok(())
    }
}

/// Names OpenSSL's `c_rehash` and distributions use for certificates: `*.pem`, `*.crt`, and
/// `<8 hex digits>.<n>`. CRL links (`.r0`) and anything else are not certificates.
fn is_cert_file_name(name: &str) -> bool {
    if name.ends_with(".pem") || name.ends_with(".crt") {
        return true;
    }
    match name.split_once('.') {
        Some((hash, n)) => {
            hash.len() == 8
                && hash.bytes().all(|b| b.is_ascii_hexdigit())
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ca::CertificateAuthority;

    fn test_ca(dir: &Path) -> CertificateAuthority {
        CertificateAuthority::load_or_create(dir).expect("create CA")
    }

    #[test]
    fn cert_file_names() {
        for ok in ["a.pem", "b.crt", "1a2b3c4d.0", "DEADBEEF.12"] {
            assert!(is_cert_file_name(ok), "{ok}");
        }
        for no in [
            "1a2b3c4d.r0",
            "README",
            "key.der",
            "1a2b3c4.0",
            "1a2b3c4d.",
            "x.pem~",
        ] {
            assert!(!is_cert_file_name(no), "{no}");
        }
    }

    #[test]
    fn trust_dir_certificates_are_loaded() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = test_ca(&tmp.path().join("ca"));
        let dir = tmp.path().join("trust");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join("mine.pem"), ca.cert_pem()).expect("write");
        std::os::unix::fs::symlink(dir.join("mine.pem"), dir.join("0badc0de.0")).expect("link");
        std::os::unix::fs::symlink(dir.join("absent.pem"), dir.join("dangling.pem")).expect("link");
        fs::write(dir.join("junk.crt"), "not a certificate").expect("write");
        fs::write(dir.join("notes.txt"), ca.cert_pem()).expect("write");

        let mut roots = Roots::default();
        roots.add_dir(&dir).expect("load dir");
        assert_eq!(roots.store.len(), 1, "one distinct certificate");
        assert!(roots.seen.contains(ca.cert_der().as_ref()));

        client_config(Some(&dir), &[], vec![b"h2".to_vec()]).expect("config with trust dir");
    }

    #[test]
    fn a_missing_trust_dir_is_an_error() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let missing = tmp.path().join("nope");
        let err = client_config(Some(&missing), &[], vec![]).expect_err("missing dir");
        assert!(
            matches!(&err, Error::ReadDir { path, .. } if *path == missing),
            "{err:?}"
        );
    }

    #[test]
    fn extra_ca_files() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = test_ca(&tmp.path().join("ca"));
        let good = tmp.path().join("good.pem");
        fs::write(&good, ca.cert_pem()).expect("write");
        let mut roots = Roots::default();
        roots.add_file(&good).expect("good file");
        assert_eq!(roots.store.len(), 1);

        let empty = tmp.path().join("empty.pem");
        fs::write(
            &empty,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let err = client_config(None, std::slice::from_ref(&empty), vec![]).expect_err("no certs");
        assert!(
            matches!(&err, Error::NoCertificates { path } if *path == empty),
            "{err:?}"
        );
        assert!(err.to_string().contains("empty.pem"), "{err}");

        let missing = tmp.path().join("missing.pem");
        let err = client_config(None, std::slice::from_ref(&missing), vec![]).expect_err("missing");
        assert!(
            matches!(&err, Error::ReadFile { path, .. } if *path == missing),
            "{err:?}"
        );
    }

    #[test]
    fn alpn_is_offered_as_given() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = test_ca(&tmp.path().join("ca"));
        let file = tmp.path().join("ca.pem");
        fs::write(&file, ca.cert_pem()).expect("write");
        let config = client_config(None, &[file], vec![b"h2".to_vec(), b"http/1.1".to_vec()])
            .expect("config");
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
