//! OpenSSL's subject-name hash (`openssl x509 -hash`, `X509_NAME_hash`): the name an
//! OpenSSL-style certificate directory (`-CApath`, `SSL_CERT_DIR`) files a root under, as
//! `<hash>.0`.
//!
//! The hash is the first four bytes, little-endian, of the SHA-1 of the name's canonical
//! encoding: every RDN's `SET` in DER, concatenated without the outer `SEQUENCE`, where each
//! string value is re-encoded as a UTF8String with leading and trailing whitespace removed,
//! inner runs of whitespace collapsed to one space and ASCII letters lowercased
//! (OpenSSL's `x509_name_canon` and `asn1_string_canon`). Other value types stay as they
//! are.

use super::der;

/// String types OpenSSL canonicalises (`ASN1_MASK_CANON`): UTF8String, PrintableString,
/// T61String, IA5String, VisibleString, UniversalString, BMPString.
const CANON_STRINGS: &[u8] = &[0x0c, 0x13, 0x14, 0x16, 0x1a, 0x1c, 0x1e];

/// The subject hash of a DER certificate, or `None` if it cannot be parsed.
pub fn of_cert(cert_der: &[u8]) -> Option<u32> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    of_name(cert.subject().as_raw())
}

/// The hash of a DER `Name` (the whole `SEQUENCE`).
pub fn of_name(name_der: &[u8]) -> Option<u32> {
    let canon = canonical(name_der)?;
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &canon);
    let d = digest.as_ref();
    Some(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
}

/// The canonical encoding the hash is taken over.
fn canonical(name_der: &[u8]) -> Option<Vec<u8>> {
    let (name, rest) = der::read(name_der)?;
    if name.tag != der::SEQUENCE || !rest.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for rdn in der::read_all(name.value)? {
        if rdn.tag != der::SET {
            return None;
        }
        let mut avas = Vec::new();
        for ava in der::read_all(rdn.value)? {
            let [oid, value] = der::read_all(ava.value)?[..] else {
                return None;
            };
            if ava.tag != der::SEQUENCE || oid.tag != der::OID {
                return None;
            }
            let oid = der::tlv(oid.tag, oid.value);
            let value = if CANON_STRINGS.contains(&value.tag) {
                der::tlv(der::UTF8_STRING, &canon_string(value.tag, value.value)?)
            } else {
                der::tlv(value.tag, value.value)
            };
            avas.push(der::cons(der::SEQUENCE, &[&oid, &value]));
        }
        // DER sorts the members of a SET OF by their encodings.
        avas.sort();
        out.extend(der::tlv(der::SET, &avas.concat()));
    }
    Some(out)
}

/// One string value in canonical form: as UTF-8, trimmed, inner whitespace collapsed, ASCII
/// lowercased; bytes outside ASCII are kept as they are.
fn canon_string(tag: u8, bytes: &[u8]) -> Option<Vec<u8>> {
    let utf8 = match tag {
        0x0c => std::str::from_utf8(bytes).ok()?.as_bytes().to_vec(),
        // BMPString: UCS-2, big-endian.
        0x1e => {
            if !bytes.len().is_multiple_of(2) {
                return None;
            }
            let units = bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()?
                .into_bytes()
        }
        // UniversalString: UCS-4, big-endian.
        0x1c => {
            if !bytes.len().is_multiple_of(4) {
                return None;
            }
            bytes
                .chunks(4)
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect::<Option<String>>()?
                .into_bytes()
        }
        // One byte per character (OpenSSL reads these as Latin-1).
        _ => bytes
            .iter()
            .map(|&b| char::from(b))
            .collect::<String>()
            .into_bytes(),
    };
    // OpenSSL's isspace: space, \t, \n, \v, \f, \r.
    let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
    let start = utf8.iter().position(|b| !space(b)).unwrap_or(utf8.len());
    let end = utf8
        .iter()
        .rposition(|b| !space(b))
        .map_or(start, |i| i + 1);
    let mut out = Vec::with_capacity(end - start);
    let mut in_space = false;
    for b in &utf8[start..end] {
        if space(b) {
            if !in_space {
                out.push(b' ');
            }
            in_space = true;
        } else {
            out.push(b.to_ascii_lowercase());
            in_space = false;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Certificates whose hashes `openssl x509 -hash -noout` (OpenSSL 3.0.17) printed.
    /// The first is egress's own CA shape (CN and O as UTF8String); the second has
    /// PrintableString, IA5String and BMPString values with mixed case and runs of spaces,
    /// and a two-member RDN, so the canonical form has work to do.
    const CERTS: &[(&str, &str)] = &[(EGRESS_LIKE, "cc9fe554"), (MIXED, "6b2b82a8")];

    /// `/CN=egress CA/O=egress`.
    const EGRESS_LIKE: &str = super::super::testdata::EGRESS_CA;

    /// `/C=US/O=  Mixed   CASE  Org /CN=Some Root CA+OU=Unit  One/CN=Жук Beetle/
    /// emailAddress=Root@Example.COM` with OpenSSL's `string_mask = default`. The same
    /// name in UTF8Strings hashes the same, as it should.
    const MIXED: &str = "\
-----BEGIN CERTIFICATE-----
MIICKDCCAc8CFBVyj/eBnarBaGjR13XGRPH3mCU7MAoGCCqGSM49BAMCMIGVMQsw
CQYDVQQGEwJVUzEdMBsGA1UEChMUICBNaXhlZCAgIENBU0UgIE9yZyAxJzAQBgNV
BAsTCVVuaXQgIE9uZTATBgNVBAMTDFNvbWUgUm9vdCBDQTEdMBsGA1UEAx4UBBYE
QwQ6ACAAQgBlAGUAdABsAGUxHzAdBgkqhkiG9w0BCQEWEFJvb3RARXhhbXBsZS5D
T00wIBcNMjYxMTI3MjM0NTQ5WhgPMjEyNjExMDMyMzQ1NDlaMIGVMQswCQYDVQQG
EwJVUzEdMBsGA1UEChMUICBNaXhlZCAgIENBU0UgIE9yZyAxJzAQBgNVBAsTCVVu
aXQgIE9uZTATBgNVBAMTDFNvbWUgUm9vdCBDQTEdMBsGA1UEAx4UBBYEQwQ6ACAA
QgBlAGUAdABsAGUxHzAdBgkqhkiG9w0BCQEWEFJvb3RARXhhbXBsZS5DT00wWTAT
BgcqhkjOPQIBBggqhkjOPQMBBwNCAASvn8WHefodmdbqEEHcN10rR6/vV2GoOnQc
RVNIi4TUPp/LVUIx1zXAkf6UrLyvnBtpnv3HYy7hFmoIbRCqfnogMAoGCCqGSM49
BAMCA0cAMEQCIAJweq4Yuc94R/dxpQD1Ndpx72wam1kMUsJMXSIjHc2IAiBlYLOa
vtihVgkCKUf1cpxglTvJzmbr75BeY1jPyp19bg==
-----END CERTIFICATE-----
";

    #[test]
    fn matches_openssl_on_fixtures() {
        for (pem, expected) in CERTS {
            let der = pem::parse(pem).expect("fixture is PEM").into_contents();
            let got = of_cert(&der).expect("fixture parses");
            assert_eq!(format!("{got:08x}"), *expected);
        }
    }

    #[test]
    fn canonical_strings_are_trimmed_collapsed_and_lowercased() {
        assert_eq!(
            canon_string(0x13, b"  Foo   Bar\t Baz  ").unwrap(),
            b"foo bar baz"
        );
        assert_eq!(
            canon_string(0x0c, "  Ünï CODE ".as_bytes()).unwrap(),
            "Ünï code".as_bytes()
        );
        // Latin-1 in a T61String becomes UTF-8; BMP decodes from UTF-16.
        assert_eq!(canon_string(0x14, &[0xc4, b'X']).unwrap(), "Äx".as_bytes());
        assert_eq!(
            canon_string(0x1e, &[0, b'A', 0, b' ', 0, b'b']).unwrap(),
            b"a b"
        );
        assert_eq!(canon_string(0x13, b"   ").unwrap(), b"");
        assert!(canon_string(0x1e, &[0]).is_none());
    }

    #[test]
    fn every_hash_link_of_the_system_directory_agrees() {
        // Debian's /etc/ssl/certs files each root under `<hash>.N`, made by OpenSSL's
        // rehash: every link there must be the hash we compute for its target.
        let dir = std::path::Path::new("/etc/ssl/certs");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).expect("/etc/ssl/certs (ca-certificates) is needed") {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((hash, n)) = name.split_once('.') else {
                continue;
            };
            if hash.len() != 8
                || n.parse::<u32>().is_err()
                || !hash.bytes().all(|b| b.is_ascii_hexdigit())
            {
                continue;
            }
            let text = std::fs::read(entry.path()).unwrap();
            let der = pem::parse(&text).expect("a PEM root").into_contents();
            assert_eq!(format!("{:08x}", of_cert(&der).unwrap()), hash, "{name}");
            checked += 1;
        }
        assert!(checked > 50, "only {checked} hash links in /etc/ssl/certs");
    }
}
