//! The egress certificate authority: the one key that signs every intercepted host's leaf.
//!
//! It owns the CA's files (`ca.pem`, `ca-key.pem` in the configuration directory), their
//! permissions, and the trust bundle handed to sandboxes. The CA is created once and then
//! reused forever: every agent that was told to trust it would break if it changed on restart,
//! so a half-present CA is an error, never a reason to quietly make a new one.

use std::{
    fmt::{self, Write as _},
    fs::{self, DirBuilder, OpenOptions, Permissions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _,
};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime};
use tracing::{info, warn};
use x509_parser::certificate::X509Certificate;

/// File name of the CA certificate inside the configuration directory.
pub const CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (PKCS#8 PEM, mode 0600) inside the configuration directory.
pub const KEY_FILE: &str = "ca-key.pem";

/// System trust bundles, in the order distributions put them (Debian/Alpine, Fedora/RHEL,
/// macOS/BSD-style). The first one that exists is copied into the sandbox bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

const CA_COMMON_NAME: &str = "egress CA";
const CA_ORGANIZATION: &str = "egress";
const CA_VALIDITY: Duration = Duration::days(3650);
/// Backdating absorbs clock skew between the host and the sandboxes that check our certs.
pub(crate) const BACKDATE: Duration = Duration::days(1);

/// Failures to create, load or publish the CA. All of them are configuration or host problems
/// (internal, in the client/upstream/internal split); none comes from a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create configuration directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{present} exists but {missing} does not; refusing to replace half of an existing CA \
         (restore {missing}, or remove {present} to generate a new CA that agents must trust again)"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{path} is not valid PEM")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the certificate cannot be parsed")]
    ParseCertificate {
        path: PathBuf,
        #[source]
        source: x509_parser::error::X509Error,
    },
    #[error("{path}: the certificate is not a usable CA: {reason}")]
    NotCa { path: PathBuf, reason: &'static str },
    #[error("{path}: the CA certificate expired at {not_after}")]
    Expired {
        path: PathBuf,
        not_after: OffsetDateTime,
    },
    #[error(
        "{path}: the CA subject name cannot be reproduced in the certificates it signs \
         (multi-valued or repeated name attributes are not supported)"
    )]
    UnsupportedSubject { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error(
        "{path}: the private key is {found}; an unencrypted PKCS#8 key (-----BEGIN PRIVATE KEY-----) \
         is required (convert with `openssl pkcs8 -topk8 -nocrypt`)"
    )]
    KeyNotPkcs8 { path: PathBuf, found: &'static str },
    #[error("{path}: the private key cannot be used for signing")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot generate the CA")]
    Generate {
        #[source]
        source: rcgen::Error,
    },
    #[error("the system random number generator failed")]
    Random,
}

/// The CA certificate and the key that signs leaves with it.
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertificateAuthority {
    // The key stays out of logs; the fingerprint is what an operator compares.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("sha256", &self.fingerprint_sha256())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `confdir`, creating the directory (0700) and a new CA on first use.
    pub fn load_or_create(confdir: &Path) -> Result<Self, Error> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(confdir)
            .map_err(|source| Error::CreateDir {
                path: confdir.to_owned(),
                source,
            })?;
        let cert = confdir.join(CERT_FILE);
        let key = confdir.join(KEY_FILE);
        // Two egress processes starting at once on a fresh confdir must not each write half of
        // a CA: creation happens under an exclusive lock, and the loser loads the winner's.
        let lock_path = confdir.join(".lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| Error::Write {
                path: lock_path.clone(),
                source,
            })?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::Write {
                path: lock_path,
                source: e.into(),
            })?;
        match (exists(&cert)?, exists(&key)?) {
            (true, true) => Self::from_pem_files(&cert, &key),
            (true, false) => Err(Error::Incomplete {
                present: cert,
                missing: key,
            }),
            (false, true) => Err(Error::Incomplete {
                present: key,
                missing: cert,
            }),
            (false, false) => {
                let (cert_pem, key_pem) = generate()?;
                // Key first: a crash between the two writes then leaves only the key, which the
                // next start reports instead of publishing a certificate with no key behind it.
                write_atomic(&key, key_pem.as_bytes(), 0o600)?;
                write_atomic(&cert, cert_pem.as_bytes(), 0o644)?;
                // Reload through the same path as every later start, so a CA that could not
                // be loaded back fails now rather than on the next restart.
                let ca = Self::from_pem_files(&cert, &key)?;
                info!(
                    cert = %cert.display(),
                    sha256 = %ca.fingerprint_sha256(),
                    "generated a new egress CA"
                );
                Ok(ca)
            }
        }
    }

    /// Loads a user-supplied CA: the first certificate in `cert` and the PKCS#8 key in `key`.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, Error> {
        let cert_text = read(cert)?;
        let key_text = read(key)?;
        warn_if_key_exposed(key);
        Self::from_pem(&cert_text, cert, &key_text, key)
    }

    fn from_pem(
        cert_text: &[u8],
        cert_path: &Path,
        key_text: &[u8],
        key_path: &Path,
    ) -> Result<Self, Error> {
        let cert_der = match CertificateDer::pem_slice_iter(cert_text).next() {
            Some(Ok(der)) => der,
            Some(Err(source)) => {
                return Err(Error::Pem {
                    path: cert_path.to_owned(),
                    source,
                })
            }
            None => {
                return Err(Error::NoCertificate {
                    path: cert_path.to_owned(),
                })
            }
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| {
            Error::ParseCertificate {
                path: cert_path.to_owned(),
                source: nom_error(e),
            }
        })?;
        let (not_before, not_after) = check_ca_cert(&parsed, cert_path)?;

        let key = load_key(key_text, key_path)?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(Error::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|source| Error::BadKey {
            path: key_path.to_owned(),
            source,
        })?;
        check_issuer_reproduces_subject(&issuer, parsed.subject().as_raw(), cert_path)?;

        let cert_pem = pem::encode_config(
            &pem::Pem::new("CERTIFICATE", cert_der.as_ref()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        Ok(Self {
            cert_der,
            cert_pem,
            issuer,
            not_before,
            not_after,
        })
    }

    /// The CA certificate as PEM, ending in a newline.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the certificate, as `openssl x509 -fingerprint -sha256` prints it.
    pub fn fingerprint_sha256(&self) -> String {
        let digest = Sha256::digest(self.cert_der.as_ref());
        let mut out = String::with_capacity(digest.len() * 3);
        for (i, byte) in digest.iter().enumerate() {
            if i > 0 {
                out.push(':');
            }
            // Writing to a String cannot fail.
            let _ = write!(out, "{byte:02X}");
        }
        out
    }

    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Writes a PEM bundle of the system roots plus this CA to `path` (mode 0644).
    ///
    /// Sandboxed programs point `SSL_CERT_FILE` and friends at it. The system roots stay in
    /// because connections that are passed through (not intercepted) still present real
    /// certificates. The file is readable by everyone: sandboxes run as unprivileged users.
    pub fn write_trust_bundle(&self, path: &Path) -> Result<(), Error> {
        let mut bundle = system_roots_pem();
        if !bundle.is_empty() && !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(
            format!(
                "# egress CA, SHA-256 {}\n{}",
                self.fingerprint_sha256(),
                self.cert_pem
            )
            .as_bytes(),
        );
        write_atomic(path, &bundle, 0o644)
    }
}

fn generate() -> Result<(String, String), Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| Error::Generate { source })?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = name;
    // pathlen 0: this CA signs leaves only, so a stolen leaf key can never act as a CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(super::random_serial().map_err(|_| Error::Random)?);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    let cert = params
        .self_signed(&key)
        .map_err(|source| Error::Generate { source })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Checks what a CA certificate must be for the leaves it signs to verify; returns its
/// validity window.
fn check_ca_cert(
    cert: &X509Certificate<'_>,
    path: &Path,
) -> Result<(OffsetDateTime, OffsetDateTime), Error> {
    let not_ca = |reason| Error::NotCa {
        path: path.to_owned(),
        reason,
    };
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(not_ca("basicConstraints CA:TRUE is missing")),
        Err(_) => return Err(not_ca("basicConstraints is malformed")),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err(not_ca("keyUsage does not allow keyCertSign"))
        }
        Ok(_) => {}
        Err(_) => return Err(not_ca("keyUsage is malformed")),
    }
    // rcgen rebuilds the issuer name attribute by attribute and cannot express an RDN with
    // several attributes (it would even panic on an empty one), so refuse those up front.
    if cert.subject().iter().any(|rdn| rdn.iter().count() != 1) {
        return Err(Error::UnsupportedSubject {
            path: path.to_owned(),
        });
    }
    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    if not_after <= OffsetDateTime::now_utc() {
        return Err(Error::Expired {
            path: path.to_owned(),
            not_after,
        });
    }
    Ok((not_before, not_after))
}

/// Signs a throwaway certificate and checks that its issuer field is byte-for-byte the CA's
/// subject: path building compares the two as raw bytes, and rcgen re-encodes the name, so a
/// difference here would make every minted leaf unverifiable.
fn check_issuer_reproduces_subject(
    issuer: &Issuer<'static, KeyPair>,
    subject: &[u8],
    path: &Path,
) -> Result<(), Error> {
    let unsupported = || Error::UnsupportedSubject {
        path: path.to_owned(),
    };
    let probe = CertificateParams::default()
        .signed_by(issuer.key(), issuer)
        .map_err(|_| unsupported())?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(probe.der()).map_err(|_| unsupported())?;
    if parsed.issuer().as_raw() != subject {
        return Err(unsupported());
    }
    Ok(())
}

fn load_key(text: &[u8], path: &Path) -> Result<KeyPair, Error> {
    let der = match PrivateKeyDer::from_pem_slice(text) {
        Ok(der) => der,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(Error::NoKey {
                path: path.to_owned(),
            })
        }
        Err(source) => {
            return Err(Error::Pem {
                path: path.to_owned(),
                source,
            })
        }
    };
    // ring (our only provider) reads PKCS#8 only.
    let pkcs8 = match &der {
        PrivateKeyDer::Pkcs8(k) => k,
        PrivateKeyDer::Pkcs1(_) => {
            return Err(Error::KeyNotPkcs8 {
                path: path.to_owned(),
                found: "PKCS#1 (BEGIN RSA PRIVATE KEY)",
            })
        }
        PrivateKeyDer::Sec1(_) => {
            return Err(Error::KeyNotPkcs8 {
                path: path.to_owned(),
                found: "SEC1 (BEGIN EC PRIVATE KEY)",
            })
        }
        _ => {
            return Err(Error::KeyNotPkcs8 {
                path: path.to_owned(),
                found: "of an unknown kind",
            })
        }
    };
    KeyPair::try_from(pkcs8).map_err(|source| Error::BadKey {
        path: path.to_owned(),
        source,
    })
}

fn warn_if_key_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format_args!("{mode:04o}"),
                "CA private key is readable by other users; chmod 600 it"
            );
        }
    }
}

/// The system's root certificates as PEM; empty (with a warning) if the host has none.
pub(crate) fn system_roots_pem() -> Vec<u8> {
    for candidate in SYSTEM_BUNDLES {
        match fs::read(candidate) {
            Ok(bytes) => return bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = candidate, error = %e, "cannot read system trust bundle"),
        }
    }
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        warn!(error = %e, "skipping a system root certificate");
    }
    if found.certs.is_empty() {
        warn!("no system root certificates found; the trust bundle holds only the egress CA");
    }
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    let mut out = Vec::new();
    for cert in &found.certs {
        out.extend_from_slice(
            pem::encode_config(&pem::Pem::new("CERTIFICATE", cert.as_ref()), config).as_bytes(),
        );
    }
    out
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Replaces `path` with `bytes` so that readers see the old file or the new one, never a
/// torn one, and a secret never exists with looser permissions than `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let write_err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    // A leftover from a crash would make create_new fail, and could carry other permissions.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_err(e)),
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode` (a 0644 bundle must stay world-readable).
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    // Persist the rename itself; without it a power cut can lose the new directory entry.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn nom_error(
    e: x509_parser::nom::Err<x509_parser::error::X509Error>,
) -> x509_parser::error::X509Error {
    match e {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
        x509_parser::nom::Err::Incomplete(_) => x509_parser::error::X509Error::InvalidCertificate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("create a temp dir")
    }

    #[test]
    fn load_or_create_reuses_the_ca() {
        let dir = tempdir();
        let conf = dir.path().join("conf");
        let first = CertificateAuthority::load_or_create(&conf).expect("create CA");
        let second = CertificateAuthority::load_or_create(&conf).expect("reload CA");
        assert_eq!(
            first.fingerprint_sha256(),
            second.fingerprint_sha256(),
            "a restart must not change the CA"
        );
        assert_eq!(first.cert_der(), second.cert_der());
        assert!(first
            .cert_pem()
            .starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(first.cert_pem().ends_with("-----END CERTIFICATE-----\n"));
    }

    #[test]
    fn files_have_the_right_modes() {
        let dir = tempdir();
        let conf = dir.path().join("conf");
        CertificateAuthority::load_or_create(&conf).expect("create CA");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&conf), 0o700, "config dir mode");
        assert_eq!(mode(&conf.join(KEY_FILE)), 0o600, "key file mode");
        assert_eq!(mode(&conf.join(CERT_FILE)), 0o644, "cert file mode");
        let leftovers: Vec<_> = fs::read_dir(&conf)
            .expect("list conf")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp."))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp files left behind: {leftovers:?}"
        );
    }

    #[test]
    fn generated_ca_has_the_expected_shape() {
        let dir = tempdir();
        let ca = CertificateAuthority::load_or_create(dir.path()).expect("create CA");
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse CA");
        let subject = cert.subject().to_string();
        assert!(subject.contains("CN=egress CA"), "subject was {subject}");
        assert!(subject.contains("O=egress"), "subject was {subject}");
        let bc = cert
            .basic_constraints()
            .expect("basicConstraints parses")
            .expect("basicConstraints present");
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = cert.key_usage().expect("ku parses").expect("ku present");
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        let now = OffsetDateTime::now_utc();
        assert!(ca.not_before() < now - Duration::hours(23));
        assert!(ca.not_after() > now + Duration::days(3640));
        let fp = ca.fingerprint_sha256();
        assert_eq!(fp.len(), 32 * 3 - 1, "fingerprint {fp}");
        assert!(fp
            .chars()
            .all(|c| c == ':' || c.is_ascii_digit() || c.is_ascii_uppercase()));
    }

    #[test]
    fn one_file_missing_is_an_error_naming_it() {
        let dir = tempdir();
        CertificateAuthority::load_or_create(dir.path()).expect("create CA");
        let key = dir.path().join(KEY_FILE);
        fs::remove_file(&key).expect("remove key");
        let err = CertificateAuthority::load_or_create(dir.path()).expect_err("half a CA");
        assert!(
            matches!(&err, Error::Incomplete { missing, .. } if *missing == key),
            "unexpected error: {err:?}"
        );
        assert!(err.to_string().contains(KEY_FILE), "message: {err}");
        assert!(
            !key.exists(),
            "load_or_create must not regenerate over a half-present CA"
        );

        let dir = tempdir();
        CertificateAuthority::load_or_create(dir.path()).expect("create CA");
        let cert = dir.path().join(CERT_FILE);
        fs::remove_file(&cert).expect("remove cert");
        let err = CertificateAuthority::load_or_create(dir.path()).expect_err("half a CA");
        assert!(err.to_string().contains(CERT_FILE), "message: {err}");
    }

    #[test]
    fn user_supplied_files_are_checked() {
        let dir = tempdir();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        CertificateAuthority::load_or_create(&a).expect("create CA a");
        CertificateAuthority::load_or_create(&b).expect("create CA b");
        let (a_cert, a_key) = (a.join(CERT_FILE), a.join(KEY_FILE));

        CertificateAuthority::from_pem_files(&a_cert, &a_key).expect("a matching pair loads");

        let err = CertificateAuthority::from_pem_files(&a_cert, &b.join(KEY_FILE))
            .expect_err("mismatched key");
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err:?}");

        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, "hello\n").expect("write");
        let err = CertificateAuthority::from_pem_files(&garbage, &a_key).expect_err("no cert");
        assert!(
            matches!(&err, Error::NoCertificate { path } if *path == garbage),
            "{err:?}"
        );
        let err = CertificateAuthority::from_pem_files(&a_cert, &garbage).expect_err("no key");
        assert!(
            matches!(&err, Error::NoKey { path } if *path == garbage),
            "{err:?}"
        );
        let err = CertificateAuthority::from_pem_files(&a_cert, &dir.path().join("absent"))
            .expect_err("missing file");
        assert!(err.to_string().contains("absent"), "{err}");
    }

    #[test]
    fn a_leaf_certificate_is_not_accepted_as_ca() {
        let dir = tempdir();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let cert = CertificateParams::new(vec!["leaf.example".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("sign");
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        fs::write(&cert_path, cert.pem()).expect("write cert");
        fs::write(&key_path, key.serialize_pem()).expect("write key");
        let err = CertificateAuthority::from_pem_files(&cert_path, &key_path).expect_err("leaf");
        assert!(matches!(err, Error::NotCa { .. }), "{err:?}");
    }

    #[test]
    fn trust_bundle_holds_the_ca_and_is_world_readable() {
        let dir = tempdir();
        let ca = CertificateAuthority::load_or_create(dir.path()).expect("create CA");
        let bundle = dir.path().join("bundle.pem");
        ca.write_trust_bundle(&bundle).expect("write bundle");
        let text = fs::read_to_string(&bundle).expect("read bundle");
        assert!(text.contains(ca.cert_pem()), "bundle lacks the egress CA");
        let certs = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("bundle parses as PEM");
        assert!(certs.iter().any(|c| c == ca.cert_der()));
        let mode = fs::metadata(&bundle).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Rewriting replaces rather than appends.
        ca.write_trust_bundle(&bundle).expect("rewrite bundle");
        let again = fs::read_to_string(&bundle).expect("read bundle");
        assert_eq!(text, again);
    }
}
