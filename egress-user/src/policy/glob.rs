//! Path globs of host rules (`paths = ["/api/**"]`): compiled once with the policy,
//! matched per request.

use std::fmt;

/// A compiled path glob: `*` is any run of characters other than `/`, `**` any run at all
/// (including `/` and nothing), `?` one character other than `/`; everything else is
/// literal. So `/api/**` matches `/api/` and `/api/x/y` but not `/api`: list `/api` too if
/// it is wanted.
///
/// Paths are compared as sent, without percent-decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathGlob {
    source: String,
    tokens: Vec<Token>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `?`
    One,
    /// `*`
    Segment,
    /// `**`
    Any,
}

impl PathGlob {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("path glob {s:?} must start with `/`"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || *c == '#')
        {
            return Err(format!(
                "path glob {s:?} contains {c:?}, which cannot appear in a request path"
            ));
        }
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            let token = match c {
                '?' => Token::One,
                '*' => {
                    let mut stars = 1;
                    while chars.next_if_eq(&'*').is_some() {
                        stars += 1;
                    }
                    match stars {
                        1 => Token::Segment,
                        2 => Token::Any,
                        _ => return Err(format!("path glob {s:?} has `***`; use `*` or `**`")),
                    }
                }
                c => {
                    literal.push(c);
                    continue;
                }
            };
            if !literal.is_empty() {
                tokens.push(Token::Literal(std::mem::take(&mut literal)));
            }
            tokens.push(token);
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        Ok(Self {
            source: s.to_owned(),
            tokens,
        })
    }

    /// Whether `path` (no query string) matches.
    pub fn matches(&self, path: &str) -> bool {
        // Set of positions in `path` the tokens so far can end at, advanced one token at a
        // time: linear in tokens × length, with no backtracking blow-up on `**` chains.
        let bytes = path.as_bytes();
        let n = bytes.len();
        let mut cur = vec![false; n + 1];
        let mut next = vec![false; n + 1];
        cur[0] = true;
        for token in &self.tokens {
            next.fill(false);
            match token {
                Token::Literal(lit) => {
                    for i in (0..=n).filter(|&i| cur[i]) {
                        if bytes[i..].starts_with(lit.as_bytes()) {
                            next[i + lit.len()] = true;
                        }
                    }
                }
                Token::One => {
                    for i in (0..n).filter(|&i| cur[i] && bytes[i] != b'/') {
                        let width = path[i..].chars().next().map_or(1, char::len_utf8);
                        next[i + width] = true;
                    }
                }
                Token::Segment | Token::Any => {
                    let mut reached = false;
                    for j in 0..=n {
                        reached |= cur[j];
                        next[j] = reached && path.is_char_boundary(j);
                        if *token == Token::Segment && bytes.get(j) == Some(&b'/') {
                            reached = false;
                        }
                    }
                }
            }
            std::mem::swap(&mut cur, &mut next);
            if !cur.contains(&true) {
                return false;
            }
        }
        cur[n]
    }
}

impl fmt::Display for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_single_star_stays_in_one_segment() {
        let g = PathGlob::parse("/*/*.git/info/refs").unwrap();
        assert!(g.matches("/o/r.git/info/refs"));
        assert!(g.matches("/o/.git/info/refs"), "`*` may be empty");
        assert!(!g.matches("/o/p/r.git/info/refs"));
        assert!(!g.matches("/o/rxgit/info/refs"), "`.` is literal");
        assert!(!g.matches("/o/r.git/info/refs/x"));
        let g = PathGlob::parse("/a*b").unwrap();
        assert!(g.matches("/ab") && g.matches("/axxb") && !g.matches("/ax/b"));
    }

    #[test]
    fn glob_double_star_crosses_segments() {
        let g = PathGlob::parse("/api/**").unwrap();
        assert!(g.matches("/api/"), "documented: `**` may be empty");
        assert!(g.matches("/api/x"));
        assert!(g.matches("/api/x/y"));
        assert!(!g.matches("/api"), "documented: list /api separately");
        assert!(!g.matches("/apix/y"));
        let g = PathGlob::parse("/**/x.json").unwrap();
        assert!(g.matches("/a/b/x.json") && g.matches("//x.json") && !g.matches("/x.json"));
        let g = PathGlob::parse("/a/**x").unwrap();
        assert!(g.matches("/a/x") && g.matches("/a/b/cx") && !g.matches("/a/b/c"));
        let g = PathGlob::parse("/**").unwrap();
        assert!(g.matches("/") && g.matches("/anything/at/all"));
    }

    #[test]
    fn glob_question_mark_and_literals() {
        let g = PathGlob::parse("/v?/x").unwrap();
        assert!(g.matches("/v1/x") && g.matches("/vé/x"));
        assert!(!g.matches("/v/x") && !g.matches("/v12/x") && !g.matches("/v//x"));
        let g = PathGlob::parse("/exact.txt").unwrap();
        assert!(g.matches("/exact.txt") && !g.matches("/exactxtxt") && !g.matches("/exact.txt/"));
        assert_eq!(g.to_string(), "/exact.txt");
    }

    #[test]
    fn glob_many_stars_stay_linear() {
        let g = PathGlob::parse(&format!("{}/z", "/**".repeat(30))).unwrap();
        assert!(
            !g.matches(&"/a".repeat(2000)),
            "no exponential backtracking"
        );
        assert!(g.matches(&format!("{}/z", "/a".repeat(40))));
    }

    #[test]
    fn bad_globs_are_refused() {
        for bad in ["", "api/**", "*/x", "/a b", "/a#b", "/***"] {
            assert!(PathGlob::parse(bad).is_err(), "{bad:?}");
        }
    }
}
