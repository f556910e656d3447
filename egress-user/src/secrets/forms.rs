//! The shapes a real secret value takes on the wire besides its plain bytes: base64 (as in
//! HTTP Basic credentials or JSON blobs) and percent-encoding (query strings, form bodies).
//! Each function returns byte strings to search for, never anything derived for display.

use base64::{
    engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD},
    Engine as _,
};

/// Base64 forms of `value` that stay the same whatever surrounds it.
///
/// A value inside a longer base64 blob (`base64("user:" + value)`) starts at one of three
/// bit offsets, and the characters at its edges mix in bits of its neighbours. For each
/// offset we keep only the characters built entirely from the value's own bits. They are
/// a substring of every encoding, padded or not, so no separate padded patterns are
/// needed. With an 8-byte value each of these is at least 10 characters (60 bits).
pub(super) fn base64_forms(value: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(6);
    for lead in 0..3usize {
        let mut buf = vec![0u8; lead];
        buf.extend_from_slice(value);
        let start = (8 * lead).div_ceil(6);
        let end = (8 * (lead + value.len())) / 6;
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let enc = engine.encode(&buf);
            let inner = enc.as_bytes()[start..end].to_vec();
            if !inner.is_empty() && !out.contains(&inner) {
                out.push(inner);
            }
        }
    }
    out
}

/// How one family of encoders percent-encodes: which bytes it leaves alone and whether a
/// space becomes `+`. Encoders disagree on a handful of punctuation characters, so a value
/// containing them has several encoded spellings.
struct Profile {
    keep: &'static [u8],
    space_as_plus: bool,
}

const PROFILES: &[Profile] = &[
    // RFC 3986 unreserved only: curl, Python `quote(safe="")`, our own substitution.
    Profile {
        keep: b"-._~",
        space_as_plus: false,
    },
    // Go `url.QueryEscape`, Python `quote_plus` / `urlencode`.
    Profile {
        keep: b"-._~",
        space_as_plus: true,
    },
    // WHATWG `application/x-www-form-urlencoded` (browsers, `URLSearchParams`).
    Profile {
        keep: b"*-._",
        space_as_plus: true,
    },
    // JavaScript `encodeURIComponent`.
    Profile {
        keep: b"-_.!~*'()",
        space_as_plus: false,
    },
    // Python `quote` with its default `safe="/"`.
    Profile {
        keep: b"-._~/",
        space_as_plus: false,
    },
];

/// Percent-encoded forms of `value`, in upper- and lowercase hex, for each common encoder.
/// Empty when no encoder would change the value (then the plain form covers it).
pub(super) fn url_forms(value: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for p in PROFILES {
        for upper in [true, false] {
            let enc = encode(value, p, upper);
            if enc != value && !out.contains(&enc) {
                out.push(enc);
            }
        }
    }
    out
}

/// The spelling substituted for a placeholder inside a URI path or query: the upstream
/// decodes the component, so it must receive the encoded value to end up with the real one,
/// and a value containing `&`, `=` or `#` must not change the URI's structure.
pub(super) fn uri_component(value: &[u8]) -> Vec<u8> {
    encode(value, &PROFILES[0], true)
}

fn encode(value: &[u8], p: &Profile, upper: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if b.is_ascii_alphanumeric() || p.keep.contains(&b) {
            out.push(b);
        } else if b == b' ' && p.space_as_plus {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[
                b'%',
                digits[usize::from(b >> 4)],
                digits[usize::from(b & 15)],
            ]);
        }
    }
    out
}

/// Decodes `%XX` escapes, leaving malformed ones as they are. `None` if there were none, so
/// callers skip a second scan of unchanged bytes. `+` is left alone: the raw scan already
/// covers the `+`-for-space spellings, and decoding it would break base64 text.
pub(super) fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut changed = false;
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                changed = true;
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn base64_forms_are_found_at_every_alignment_and_padding() {
        let value = b"s3cr3t-V4lue?>>~";
        let forms = base64_forms(value);
        for prefix in ["", "u", "us", "user:", "ab:", "x:"] {
            for suffix in ["", "z", "zz", "trailing"] {
                let mut blob = prefix.as_bytes().to_vec();
                blob.extend_from_slice(value);
                blob.extend_from_slice(suffix.as_bytes());
                for enc in [
                    STANDARD.encode(&blob),
                    URL_SAFE.encode(&blob),
                    STANDARD_NO_PAD.encode(&blob),
                    URL_SAFE_NO_PAD.encode(&blob),
                ] {
                    assert!(
                        forms.iter().any(|f| contains(enc.as_bytes(), f)),
                        "no base64 form of the value found in {enc} (prefix {prefix:?}, suffix {suffix:?})"
                    );
                }
            }
        }
    }

    #[test]
    fn base64_forms_of_minimum_length_value_are_ten_chars() {
        for f in base64_forms(b"12345678") {
            assert!(
                f.len() >= 10,
                "form {:?} too short",
                String::from_utf8_lossy(&f)
            );
        }
    }

    #[test]
    fn url_forms_cover_common_encoders() {
        let forms = url_forms(b"a b/c+d~e*f");
        for expect in [
            "a%20b%2Fc%2Bd~e%2Af",
            "a%20b%2fc%2bd~e%2af",
            "a+b%2Fc%2Bd~e%2Af",
            "a+b%2Fc%2Bd%7Ee*f",
            "a%20b%2Fc%2Bd~e*f",
            "a%20b/c%2Bd~e%2Af",
        ] {
            assert!(
                forms.iter().any(|f| f == expect.as_bytes()),
                "missing {expect}"
            );
        }
        assert!(url_forms(b"plainAlnum_-.").is_empty());
        // WHATWG form encoding escapes `~`.
        assert_eq!(
            url_forms(b"tilde~~~"),
            vec![b"tilde%7E%7E%7E".to_vec(), b"tilde%7e%7e%7e".to_vec()]
        );
    }

    #[test]
    fn percent_decode_handles_edges() {
        assert_eq!(percent_decode(b"abc"), None);
        assert_eq!(percent_decode(b"a%2Fb%2f"), Some(b"a/b/".to_vec()));
        assert_eq!(percent_decode(b"%zz%4"), None);
        assert_eq!(percent_decode(b"%41"), Some(b"A".to_vec()));
    }
}
