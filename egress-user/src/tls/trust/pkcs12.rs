//! A PKCS#12 trust store (RFC 7292) as Java reads its `cacerts`: one certificate bag per
//! trusted root, unencrypted, each marked with Oracle's trusted-key-usage attribute (without
//! it Java ignores a certificate that has no key), under an HMAC-SHA-256 integrity MAC.
//!
//! Only what a trust store needs is written: no keys, no encryption. Java (9 and later)
//! reads a PKCS#12 `cacerts` whatever the file is called, with or without its password
//! (`changeit`): without one, as the JDK's default trust manager loads it, the MAC is not
//! checked; with one (`keytool -storepass changeit`) it is. The MAC key is derived with the
//! PKCS#12 KDF (RFC 7292, appendix B.2), as OpenSSL 3 and the JDK do by default.
//!
//! A crate was considered first: `p12-keystore` does this, but brings in pre-release
//! RustCrypto crates (`cms`, `pkcs12`, `der` 0.8) for what is a few structures here.

use super::der::{self, cons, oid, tlv};

/// The password Java's stores conventionally carry.
pub const JAVA_PASSWORD: &str = "changeit";
/// MAC iterations: the JDK's default for PKCS#12 (OpenSSL's is 2048).
pub const MAC_ITERATIONS: u64 = 10_000;

const DATA: &str = "1.2.840.113549.1.7.1";
const CERT_BAG: &str = "1.2.840.113549.1.12.10.1.3";
const X509_CERTIFICATE: &str = "1.2.840.113549.1.9.22.1";
const FRIENDLY_NAME: &str = "1.2.840.113549.1.9.20";
const ORACLE_TRUSTED_KEY_USAGE: &str = "2.16.840.1.113894.746875.1.1";
const ANY_EXTENDED_KEY_USAGE: &str = "2.5.29.37.0";
const SHA256: &str = "2.16.840.1.101.3.4.2.1";

/// One trusted certificate and the alias Java lists it under.
pub struct Trusted<'a> {
    pub alias: &'a str,
    pub der: &'a [u8],
}

/// A PKCS#12 file trusting `certs`, with a fresh random MAC salt.
pub fn trust_store(
    certs: &[Trusted<'_>],
    password: &str,
) -> Result<Vec<u8>, rustls::crypto::GetRandomFailed> {
    let mut salt = [0u8; 16];
    crate::tls::provider().secure_random.fill(&mut salt)?;
    Ok(encode(certs, password, &salt, MAC_ITERATIONS))
}

/// The store for a given salt and iteration count (deterministic, for the tests).
pub fn encode(certs: &[Trusted<'_>], password: &str, salt: &[u8], iterations: u64) -> Vec<u8> {
    let bags: Vec<Vec<u8>> = certs.iter().map(cert_bag).collect();
    let safe_contents = cons(
        der::SEQUENCE,
        &bags.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    );
    let auth_safe = cons(der::SEQUENCE, &[&data_content_info(&safe_contents)]);
    let mac = mac(password, salt, iterations, &auth_safe);
    let digest_info = cons(
        der::SEQUENCE,
        &[
            &cons(der::SEQUENCE, &[&oid(SHA256), &tlv(der::NULL, &[])]),
            &tlv(der::OCTET_STRING, &mac),
        ],
    );
    let mac_data = cons(
        der::SEQUENCE,
        &[
            &digest_info,
            &tlv(der::OCTET_STRING, salt),
            &der::uint(iterations),
        ],
    );
    cons(
        der::SEQUENCE,
        &[&der::uint(3), &data_content_info(&auth_safe), &mac_data],
    )
}

/// `ContentInfo { data, [0] OCTET STRING content }`.
fn data_content_info(content: &[u8]) -> Vec<u8> {
    cons(
        der::SEQUENCE,
        &[
            &oid(DATA),
            &tlv(der::CONTEXT_0, &tlv(der::OCTET_STRING, content)),
        ],
    )
}

fn cert_bag(cert: &Trusted<'_>) -> Vec<u8> {
    let bag = cons(
        der::SEQUENCE,
        &[
            &oid(X509_CERTIFICATE),
            &tlv(der::CONTEXT_0, &tlv(der::OCTET_STRING, cert.der)),
        ],
    );
    let name: Vec<u8> = cert
        .alias
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    let mut attributes = [
        cons(
            der::SEQUENCE,
            &[
                &oid(FRIENDLY_NAME),
                &tlv(der::SET, &tlv(der::BMP_STRING, &name)),
            ],
        ),
        cons(
            der::SEQUENCE,
            &[
                &oid(ORACLE_TRUSTED_KEY_USAGE),
                &tlv(der::SET, &oid(ANY_EXTENDED_KEY_USAGE)),
            ],
        ),
    ];
    // DER orders the members of a SET OF by their encodings.
    attributes.sort();
    cons(
        der::SEQUENCE,
        &[
            &oid(CERT_BAG),
            &tlv(der::CONTEXT_0, &bag),
            &tlv(der::SET, &attributes.concat()),
        ],
    )
}

/// HMAC-SHA-256 of `data` under the key the PKCS#12 KDF derives from `password`.
pub fn mac(password: &str, salt: &[u8], iterations: u64, data: &[u8]) -> Vec<u8> {
    let key = kdf(password, salt, iterations, 3, 32);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    ring::hmac::sign(&key, data).as_ref().to_vec()
}

/// RFC 7292 appendix B.2 with SHA-256 (u = 32, v = 64): `id` 1 derives keys, 2 IVs, 3 MAC
/// keys. The password is a BMPString with its two-byte terminator.
fn kdf(password: &str, salt: &[u8], iterations: u64, id: u8, n: usize) -> Vec<u8> {
    const U: usize = 32;
    const V: usize = 64;
    let mut pass: Vec<u8> = password.encode_utf16().flat_map(u16::to_be_bytes).collect();
    pass.extend_from_slice(&[0, 0]);
    let stretch = |s: &[u8]| -> Vec<u8> {
        let len = s.len().div_ceil(V) * V;
        s.iter().copied().cycle().take(len).collect()
    };
    let mut i = stretch(salt);
    i.extend(stretch(&pass));
    let d = [id; V];
    let mut out = Vec::with_capacity(n.div_ceil(U) * U);
    while out.len() < n {
        let mut a = ring::digest::digest(&ring::digest::SHA256, &[&d[..], &i].concat());
        for _ in 1..iterations {
            a = ring::digest::digest(&ring::digest::SHA256, a.as_ref());
        }
        out.extend_from_slice(a.as_ref());
        if out.len() >= n {
            break;
        }
        // I_j = (I_j + B + 1) mod 2^(8v) for every v-byte block, B being A stretched to v.
        let b: Vec<u8> = a.as_ref().iter().copied().cycle().take(V).collect();
        for block in i.chunks_mut(V) {
            let mut carry = 1u16;
            for k in (0..V).rev() {
                let sum = u16::from(block[k]) + u16::from(b[k]) + carry;
                block[k] = sum as u8;
                carry = sum >> 8;
            }
        }
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    /// `openssl pkcs12 -export -nokeys -in CA -name egress-ca -certpbe NONE -macalg sha256
    /// -passout pass:changeit` (OpenSSL 3.0.19; 3.0 has no `-jdktrust`, so no trust
    /// attribute), for [`CA`].
    const OPENSSL_P12: &str = "\
MIICTgIBAzCCAgQGCSqGSIb3DQEHAaCCAfUEggHxMIIB7TCCAekGCSqGSIb3DQEHAaCCAdoEggHW
MIIB0jCCAc4GCyqGSIb3DQEMCgEDoIIBvTCCAbkGCiqGSIb3DQEJFgGgggGpBIIBpTCCAaEwggFH
oAMCAQICFCMCgmkkoVh0Rq9y0+XGb+8+gTjRMAoGCCqGSM49BAMCMCUxEjAQBgNVBAMMCWVncmVz
cyBDQTEPMA0GA1UECgwGZWdyZXNzMCAXDTI2MTEyNzIzNDU0NVoYDzIxMjYxMTAzMjM0NTQ1WjAl
MRIwEAYDVQQDDAllZ3Jlc3MgQ0ExDzANBgNVBAoMBmVncmVzczBZMBMGByqGSM49AgEGCCqGSM49
AwEHA0IABK+fxYd5+h2Z1uoQQdw3XStHr+9XYag6dBxFU0iLhNQ+n8tVQjHXNcCR/pSsvK+cG2me
/cdjLuEWaghtEKp+eiCjUzBRMB0GA1UdDgQWBBRvRRXZOiJdbDJLjt5oOC8rXbi50zAfBgNVHSME
GDAWgBRvRRXZOiJdbDJLjt5oOC8rXbi50zAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gA
MEUCIQDggc0rOo75xCm17bWKc/WqN6LDUycqDHsYOksM9ifjagIgK1EdFQNhbCXb6t00sSnqOaTu
ipa7arAspKUTd744TfowQTAxMA0GCWCGSAFlAwQCAQUABCDOhpcK9k5fNfIbjfB8QQNm+b5kYDCY
hPpgrkuudupfuwQIf/rf01jTOQMCAggA";

    /// egress's own CA shape, shared with the subject-hash tests.
    const CA: &str = super::super::testdata::EGRESS_CA;

    /// The parts of a PFX: (authSafe content, MAC, salt, iterations).
    fn split(pfx: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>, u64) {
        let (pfx, rest) = der::read(pfx).expect("PFX");
        assert!(rest.is_empty());
        let [version, auth, mac_data] = der::read_all(pfx.value).expect("PFX fields")[..] else {
            panic!("a PFX has three fields");
        };
        assert_eq!(version.value, [3]);
        let [data_oid, wrapped] = der::read_all(auth.value).unwrap()[..] else {
            panic!("ContentInfo");
        };
        assert_eq!(der::tlv(data_oid.tag, data_oid.value), oid(DATA));
        let (octets, _) = der::read(wrapped.value).unwrap();
        let [digest_info, salt, iterations] = der::read_all(mac_data.value).unwrap()[..] else {
            panic!("MacData");
        };
        let [alg, mac] = der::read_all(digest_info.value).unwrap()[..] else {
            panic!("DigestInfo");
        };
        assert!(
            alg.value.starts_with(&oid(SHA256)),
            "the MAC is not HMAC-SHA-256"
        );
        let iterations = iterations
            .value
            .iter()
            .fold(0u64, |a, b| (a << 8) | u64::from(*b));
        (
            octets.value.to_vec(),
            mac.value.to_vec(),
            salt.value.to_vec(),
            iterations,
        )
    }

    #[test]
    fn the_mac_matches_openssl() {
        let p12 = base64::engine::general_purpose::STANDARD
            .decode(OPENSSL_P12.replace('\n', ""))
            .unwrap();
        let (auth_safe, expected, salt, iterations) = split(&p12);
        assert_eq!(iterations, 2048);
        assert_eq!(mac(JAVA_PASSWORD, &salt, iterations, &auth_safe), expected);
        assert_ne!(mac("changeme", &salt, iterations, &auth_safe), expected);
    }

    #[test]
    fn a_store_holds_each_certificate_with_its_alias_and_the_trust_mark() {
        let der = pem::parse(CA).unwrap().into_contents();
        let other = b"\x30\x03\x02\x01\x01".to_vec();
        let certs = [
            Trusted {
                alias: "egress-ca",
                der: &der,
            },
            Trusted {
                alias: "root-1",
                der: &other,
            },
        ];
        let p12 = trust_store(&certs, JAVA_PASSWORD).unwrap();
        let (auth_safe, mac_value, salt, iterations) = split(&p12);
        assert_eq!(iterations, MAC_ITERATIONS);
        assert_eq!(salt.len(), 16);
        assert_eq!(mac(JAVA_PASSWORD, &salt, iterations, &auth_safe), mac_value);
        // Same input, same salt: the same bytes.
        assert_eq!(encode(&certs, JAVA_PASSWORD, &salt, iterations), p12);
        let trust = der::cons(
            der::SEQUENCE,
            &[
                &oid(ORACLE_TRUSTED_KEY_USAGE),
                &der::tlv(der::SET, &oid(ANY_EXTENDED_KEY_USAGE)),
            ],
        );
        for cert in &certs {
            let bag = cert_bag(cert);
            let at = |needle: &[u8]| auth_safe.windows(needle.len()).any(|w| w == needle);
            assert!(at(&bag), "{} is not in the store", cert.alias);
            assert!(bag.windows(cert.der.len()).any(|w| w == cert.der));
            assert!(
                bag.windows(trust.len()).any(|w| *w == trust[..]),
                "no trust mark"
            );
            let alias: Vec<u8> = cert
                .alias
                .encode_utf16()
                .flat_map(u16::to_be_bytes)
                .collect();
            assert!(bag.windows(alias.len()).any(|w| w == alias), "no alias");
        }
    }

    #[test]
    fn the_kdf_matches_openssl_over_two_blocks() {
        // `openssl kdf -keylen 48 -kdfopt digest:SHA256 -kdfopt
        // hexpass:006300680061006e00670065006900740000 ("changeit" as a BMPString with its
        // terminator) -kdfopt salt:saltsalt -kdfopt iter:3 -kdfopt id:1
        // PKCS12KDF`: 48 bytes take two SHA-256 blocks, so the I_j update runs.
        let expected = "0b2cc65ce9cf26ab77ed8f2051c98f222819998ed263c4a7c8ba960371adfd67\
                        d7ff6130a461da57a9a2c3580c839f1f";
        let got: String = kdf(JAVA_PASSWORD, b"saltsalt", 3, 1, 48)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expected);
    }
}
