//! Spotting DNS tunnelling: names that carry data rather than name a host.
//!
//! A sandbox denied direct egress can still leak data by asking for names under a domain
//! whose authoritative server the attacker runs (`<encoded secret>.exfil.example`): the
//! host's resolver carries the question out. Encoders pack as much as a name can hold, in
//! base32, hex or base36 labels. The heuristics here look for that shape: very long labels,
//! very long names, and long runs that read like machine-made random strings.
//!
//! Shannon entropy alone does not separate short random strings from words: a compound
//! with few repeated letters ("cloudflareinsights") measures 3.84 bits per character, more
//! than a typical random base36 run of the same length (3.75). So a run is flagged only if
//! it has some entropy and also looks
//! machine-made: letters and digits interleaved, or letter pairs English does not write
//! ([`MACHINE_SCORE`]).

use serde::Serialize;

/// Why a name looks like data being smuggled out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Suspicion {
    LongLabel,
    HighEntropy,
    LongName,
}

/// A label this long is flagged whatever it holds. Real hostnames rarely have labels past
/// 30 bytes; tunnelling tools fill labels towards the 63-byte maximum.
pub const LONG_LABEL: usize = 40;

/// A whole name longer than this (without the trailing dot) is flagged. The longest names
/// in everyday use (cloud endpoints, CDN edges) stay under 100 bytes.
pub const LONG_NAME: usize = 120;

/// Hyphen-free runs shorter than this are never judged by their content: there is too
/// little text to tell random from meaningful, and little room to smuggle data in.
pub const ENTROPY_MIN_LEN: usize = 16;

/// The entropy floor, in bits per character, for runs long enough to reach it. Shorter
/// runs cannot: a run of n characters from an alphabet of k symbols measures at most
/// log2(min(n, k)) bits, and a random one measures noticeably less. So the floor is
/// `min(ENTROPY_BITS, ENTROPY_FRACTION * log2(min(n, k)))`, with k = 16 for runs made only
/// of hex digits and 36 otherwise. It only excludes repetitive runs ("aaaa1111aaaa1111");
/// the shape tests below decide.
pub const ENTROPY_BITS: f64 = 3.5;
pub const ENTROPY_FRACTION: f64 = 0.7;

/// A run looks machine-made when its marks, per character, reach this share. Marks are
/// switches between a letter and a digit (base32, base36 and hex interleave them
/// constantly; names have one or two: "ec2", "office365security") and awkward letter pairs:
/// two consonants (y counts as a vowel) that English does not put together, see
/// [`COMMON_CLUSTERS`]. Random base36 runs of 16 characters score about 0.55 and fall
/// under 0.2 less than once in a hundred; hostnames, compounds and German included
/// ("githubusercontent" 0, "deutschlandradio" 0.06, "productionresultssa0" 0.1), stay
/// well under it. Runs of letters only are the weak spot: about one random run in twenty
/// passes.
pub const MACHINE_SCORE: f64 = 0.2;

/// A run of hex digits only, with at least this many decimal digits and this many letters,
/// is a hash or hex-encoded data: words spelt from a-f carry no digits, and numbers no
/// letters.
pub const HEX_MIX: usize = 3;

/// Consonant pairs common inside English words and the abbreviations hostnames use (within
/// onsets such as "str", codas such as "ngth", and across syllables such as "nd", "rc").
const COMMON_CLUSTERS: &[&[u8; 2]] = &[
    b"bb", b"bl", b"br", b"bs", b"cc", b"ch", b"ck", b"cl", b"cr", b"cs", b"ct", b"dd", b"dg",
    b"dl", b"dn", b"dr", b"ds", b"dw", b"ff", b"fl", b"fr", b"fs", b"ft", b"gg", b"gh", b"gl",
    b"gn", b"gr", b"gs", b"ht", b"kl", b"kn", b"ks", b"lb", b"lc", b"ld", b"lf", b"lg", b"lk",
    b"ll", b"lm", b"lp", b"ls", b"lt", b"lv", b"mb", b"mm", b"mn", b"mp", b"ms", b"nc", b"nd",
    b"nf", b"ng", b"nk", b"nl", b"nm", b"nn", b"ns", b"nt", b"nv", b"nz", b"ph", b"pl", b"pp",
    b"pr", b"ps", b"pt", b"rb", b"rc", b"rd", b"rf", b"rg", b"rk", b"rl", b"rm", b"rn", b"rp",
    b"rr", b"rs", b"rt", b"rv", b"sc", b"sh", b"sk", b"sl", b"sm", b"sn", b"sp", b"ss", b"st",
    b"sw", b"tc", b"th", b"tl", b"tm", b"tp", b"tr", b"ts", b"tt", b"tw", b"wh", b"wl", b"wn",
    b"wr", b"ws", b"xp", b"xt", b"zz",
];

/// Why a queried name looks like data being smuggled out, if it does. Structural checks
/// come first: a long label, then a long name, then a random-looking run.
pub fn suspicion(name: &str) -> Option<Suspicion> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.split('.').any(|l| l.len() >= LONG_LABEL) {
        return Some(Suspicion::LongLabel);
    }
    if name.len() > LONG_NAME {
        return Some(Suspicion::LongName);
    }
    let lower = name.to_ascii_lowercase();
    let random_run = lower
        .split(['.', '-', '_'])
        .any(|run| run.len() >= ENTROPY_MIN_LEN && looks_random(run.as_bytes()));
    random_run.then_some(Suspicion::HighEntropy)
}

/// Whether a hyphen-free run of at least `ENTROPY_MIN_LEN` bytes reads as random.
/// Hyphens split runs because they separate words: "r3---sn-4g5e6nsz" or
/// "my-loadbalancer-1234567890" are made of short meaningful pieces.
fn looks_random(run: &[u8]) -> bool {
    let hex = run.iter().all(u8::is_ascii_hexdigit);
    let alphabet: f64 = if hex { 16.0 } else { 36.0 };
    let floor = ENTROPY_BITS.min(ENTROPY_FRACTION * (run.len() as f64).min(alphabet).log2());
    if entropy(run) < floor {
        return false;
    }
    let digits = run.iter().filter(|b| b.is_ascii_digit()).count();
    let letters = run.len() - digits;
    (hex && digits >= HEX_MIX && letters >= HEX_MIX)
        || marks(run) as f64 >= MACHINE_SCORE * run.len() as f64
}

/// Shannon entropy of the byte distribution, in bits per byte.
fn entropy(s: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in s {
        counts[usize::from(b)] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Letter/digit switches plus awkward consonant pairs; see [`MACHINE_SCORE`].
fn marks(s: &[u8]) -> usize {
    s.windows(2)
        .filter(|w| {
            let (a, b) = (w[0], w[1]);
            let switch = (a.is_ascii_digit() && b.is_ascii_alphabetic())
                || (a.is_ascii_alphabetic() && b.is_ascii_digit());
            let awkward = a.is_ascii_alphabetic()
                && b.is_ascii_alphabetic()
                && !is_vowel(a)
                && !is_vowel(b)
                && !COMMON_CLUSTERS.contains(&&[a, b]);
            switch || awkward
        })
        .count()
}

fn is_vowel(b: u8) -> bool {
    matches!(b, b'a' | b'e' | b'i' | b'o' | b'u' | b'y')
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, RngExt, SeedableRng};

    use super::*;

    /// Names sandboxed agents and their tools look up every day.
    const REAL: &[&str] = &[
        "www.googleapis.com",
        "storage.googleapis.com",
        "oauth2.googleapis.com",
        "s3.us-west-2.amazonaws.com",
        "s3-website-us-east-1.amazonaws.com",
        "ec2-54-123-45-67.compute-1.amazonaws.com",
        "ec2-198-51-100-234.us-west-2.compute.amazonaws.com",
        "my-loadbalancer-1234567890.us-west-2.elb.amazonaws.com",
        "d1.awsstatic.com",
        "d2lzkl7pfhq30w.cloudfront.net",
        "registry.npmjs.org",
        "files.pythonhosted.org",
        "pypi.org",
        "objects.githubusercontent.com",
        "raw.githubusercontent.com",
        "pkg-containers.githubusercontent.com",
        "productionresultssa0.blob.core.windows.net",
        "dualstack.python.map.fastly.net",
        "login.microsoftonline.com",
        "management.azure.com",
        "lh3.googleusercontent.com",
        "r3---sn-4g5e6nsz.googlevideo.com",
        "static.crates.io",
        "index.crates.io",
        "proxy.golang.org",
        "registry-1.docker.io",
        "production.cloudflare.docker.com",
        "deb.debian.org",
        "security.ubuntu.com",
        "api.anthropic.com",
        "api.openai.com",
        "cloudflareinsights.com",
        "elasticbeanstalk.com",
        "akamaitechnologies.com",
        "applicationinsights.azure.com",
        "onedscolprdwus04.westus.cloudapp.azure.com",
        "marketplacecdnvsassets.azureedge.net",
        "vscodeexperiments.azureedge.net",
        "windowsupdatebits.example.com",
        "xmlhttprequestpolyfill.example.org",
        "mysqlbackupstorage.blob.core.windows.net",
        "covid19vaccination.example.gov",
        "office365security.example.com",
        "kubernetesservice.example.io",
        "www.deutschlandradio.de",
        "myservice-abc123xyz-uc.a.run.app",
        "serene-example-4269.herokuapp.com",
        "_acme-challenge.example.com",
        "1.0.0.127.in-addr.arpa",
        "",
    ];

    #[test]
    fn real_names_pass() {
        for name in REAL {
            assert_eq!(suspicion(name), None, "{name} flagged");
            assert_eq!(suspicion(&format!("{name}.")), None, "{name}. flagged");
        }
    }

    fn random_label(rng: &mut StdRng, alphabet: &[u8], len: usize) -> String {
        (0..len)
            .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
            .collect()
    }

    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    const BASE32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    const HEX: &[u8] = b"0123456789abcdef";

    #[test]
    fn random_alnum_labels_are_flagged() {
        let mut rng = StdRng::seed_from_u64(0x00e9_7e55);
        for _ in 0..1000 {
            let len = rng.random_range(24..=50);
            let name = format!("{}.exfil.example", random_label(&mut rng, ALNUM, len));
            let s = suspicion(&name);
            assert!(s.is_some(), "{name} not flagged");
            if len < LONG_LABEL {
                assert_eq!(s, Some(Suspicion::HighEntropy), "{name}");
            }
        }
    }

    #[test]
    fn random_base32_and_hex_labels_are_flagged() {
        let mut rng = StdRng::seed_from_u64(32);
        for alphabet in [BASE32, HEX, ALNUM] {
            for len in ENTROPY_MIN_LEN..=63 {
                let caught = (0..200)
                    .filter(|_| {
                        let label = random_label(&mut rng, alphabet, len);
                        suspicion(&format!("{label}.t.example")).is_some()
                    })
                    .count();
                // Short runs carry less evidence: a few slip through.
                let floor = if len < 24 {
                    190
                } else if len < 32 {
                    196
                } else {
                    200
                };
                assert!(
                    caught >= floor,
                    "{len}-char labels over {:?}: only {caught}/200 flagged",
                    std::str::from_utf8(alphabet)
                );
            }
        }
    }

    #[test]
    fn long_labels_and_names() {
        let label63 = "a".repeat(63);
        assert_eq!(
            suspicion(&format!("{label63}.exfil.example")),
            Some(Suspicion::LongLabel)
        );
        assert_eq!(
            suspicion(&format!("{}.example", "a".repeat(LONG_LABEL))),
            Some(Suspicion::LongLabel)
        );
        assert_eq!(
            suspicion(&format!("{}.example", "a".repeat(LONG_LABEL - 1))),
            None
        );
        let many = vec!["chunk"; 30].join(".");
        assert!(many.len() > LONG_NAME);
        assert_eq!(suspicion(&many), Some(Suspicion::LongName));
    }

    #[test]
    fn repetitive_runs_are_not_high_entropy() {
        assert_eq!(suspicion("aaaaaaaaaaaaaaaaaaaa.example"), None);
        assert_eq!(suspicion("ab12ab12ab12ab12ab12.example"), None);
    }

    #[test]
    fn serializes_kebab_case() {
        let json = serde_json::to_string(&Suspicion::HighEntropy).expect("serialize");
        assert_eq!(json, "\"high-entropy\"");
    }
}
