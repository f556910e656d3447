//! TLS for the interceptor: the crypto provider, the egress CA, the leaf certificates it
//! mints for intercepted hosts, and the client configuration used to reach the real
//! upstreams.
//!
//! Everything here uses rustls with the `ring` provider, chosen by [`install_crypto_provider`]
//! and the crate-private [`provider`]: ring builds with a plain C compiler, while aws-lc-rs
//! would drag cmake into every build. Configurations name the provider explicitly rather than
//! trusting the process default, so a dependency that enables another provider through
//! feature unification cannot silently change what we sign and verify with.

pub mod ca;
pub mod mint;
pub mod trust;
pub mod upstream;

use std::sync::{Arc, Once, OnceLock};

use rustls::crypto::CryptoProvider;

/// Installs the ring provider as the process-wide rustls default, once.
///
/// Safe to call from every entry point (binary, tests, libraries): later calls do nothing,
/// and a default that someone else installed first is left in place, since rustls allows
/// exactly one per process and our own configurations name their provider explicitly anyway.
pub fn install_crypto_provider() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        if CryptoProvider::install_default((*provider()).clone()).is_err() {
            tracing::debug!("a rustls crypto provider was already installed; keeping it");
        }
    });
}

/// The provider every configuration in this crate is built with.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A fresh positive certificate serial number.
///
/// rcgen's default derives the serial from the subject's public key; every leaf shares one
/// key, so that would give every leaf the same issuer+serial, which Firefox rejects outright
/// (`SEC_ERROR_REUSED_ISSUER_AND_SERIAL`).
pub(crate) fn random_serial() -> Result<rcgen::SerialNumber, rustls::crypto::GetRandomFailed> {
    let mut serial = [0u8; 16];
    provider().secure_random.fill(&mut serial)?;
    // DER integers are signed: a clear top bit keeps the serial positive without padding,
    // and a set second bit keeps it from shrinking when re-encoded.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(rcgen::SerialNumber::from_slice(&serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(
            CryptoProvider::get_default().is_some(),
            "a default provider must be installed after install_crypto_provider()"
        );
    }

    #[test]
    fn serials_are_positive_and_distinct() {
        let a = random_serial().expect("rng");
        let b = random_serial().expect("rng");
        assert_ne!(a, b, "two serials collided");
        assert_eq!(a.len(), 16);
        assert_eq!(
            a.as_ref()[0] & 0xc0,
            0x40,
            "serial must be positive, top byte 01xxxxxx"
        );
    }
}
