//! The little DER the trust stores need: reading the TLVs of a certificate's subject name,
//! and writing the few structures of a PKCS#12 trust store. Single-byte tags only (every
//! tag used here is below 31); definite lengths only, as DER requires.

/// Universal and context tags used by the callers.
pub const INTEGER: u8 = 0x02;
pub const OCTET_STRING: u8 = 0x04;
pub const NULL: u8 = 0x05;
pub const OID: u8 = 0x06;
pub const UTF8_STRING: u8 = 0x0c;
pub const SEQUENCE: u8 = 0x30;
pub const SET: u8 = 0x31;
pub const BMP_STRING: u8 = 0x1e;
/// `[0] EXPLICIT`, constructed.
pub const CONTEXT_0: u8 = 0xa0;

/// One tag-length-value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub tag: u8,
    /// The contents octets.
    pub value: &'a [u8],
}

/// Reads one TLV from the front of `input`; returns it and what follows. `None` for a
/// truncated or non-DER (indefinite, multi-byte tag, over-long) encoding.
pub fn read(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((Tlv { tag, value }, rest))
}

/// Reads `input` as a sequence of TLVs that must end exactly at its end.
pub fn read_all(mut input: &[u8]) -> Option<Vec<Tlv<'_>>> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let (tlv, rest) = read(input)?;
        out.push(tlv);
        input = rest;
    }
    Some(out)
}

/// Encodes one TLV.
pub fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    out.push(tag);
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(value);
    out
}

/// A constructed TLV from already encoded parts.
pub fn cons(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    tlv(tag, &parts.concat())
}

/// A non-negative INTEGER.
pub fn uint(n: u64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count().min(7);
    let mut v = bytes[skip..].to_vec();
    if v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    tlv(INTEGER, &v)
}

/// An OBJECT IDENTIFIER from its dotted form (first arc 0..=2, as every OID here).
pub fn oid(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted
        .split('.')
        .map(|a| a.parse().expect("a valid OID literal"))
        .collect();
    let mut body = Vec::new();
    let mut push = |mut arc: u64| {
        let mut chunk = vec![(arc & 0x7f) as u8];
        arc >>= 7;
        while arc > 0 {
            chunk.push(0x80 | (arc & 0x7f) as u8);
            arc >>= 7;
        }
        chunk.reverse();
        body.extend_from_slice(&chunk);
    };
    push(arcs[0] * 40 + arcs[1]);
    for &arc in &arcs[2..] {
        push(arc);
    }
    tlv(OID, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip_across_the_short_and_long_forms() {
        for len in [0usize, 1, 127, 128, 255, 256, 65_535, 65_536, 1 << 20] {
            let value = vec![0xab; len];
            let enc = tlv(OCTET_STRING, &value);
            let (t, rest) = read(&enc).expect("parses");
            assert_eq!(t.tag, OCTET_STRING);
            assert_eq!(t.value.len(), len);
            assert!(rest.is_empty());
        }
        assert_eq!(tlv(OCTET_STRING, &[0; 128])[..3], [0x04, 0x81, 0x80]);
    }

    #[test]
    fn truncated_and_non_der_input_is_refused() {
        let enc = tlv(SEQUENCE, &[1, 2, 3]);
        for cut in 0..enc.len() {
            assert!(read(&enc[..cut]).is_none(), "prefix {cut}");
        }
        // Indefinite length, and a multi-byte tag.
        assert!(read(&[0x30, 0x80, 0, 0]).is_none());
        assert!(read(&[0x1f, 0x81, 0x00, 0x00]).is_none());
    }

    #[test]
    fn integers_and_oids_encode_as_openssl_does() {
        assert_eq!(uint(3), [0x02, 0x01, 0x03]);
        assert_eq!(uint(0), [0x02, 0x01, 0x00]);
        assert_eq!(uint(10_000), [0x02, 0x02, 0x27, 0x10]);
        assert_eq!(uint(128), [0x02, 0x02, 0x00, 0x80]);
        // sha256 and the Oracle trusted-key-usage attribute.
        assert_eq!(
            oid("2.16.840.1.101.3.4.2.1"),
            [0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01]
        );
        assert_eq!(
            oid("2.16.840.1.113894.746875.1.1"),
            [0x06, 0x0c, 0x60, 0x86, 0x48, 0x01, 0x86, 0xf9, 0x66, 0xad, 0xca, 0x7b, 0x01, 0x01]
        );
    }
}
