//! TOML documents whose every error names the file, the line, the column and the dotted
//! key (`FILE:LINE:COL: key: message`), for the policy file and the daemon's config.
//!
//! Parsers deserialise into structs of [`toml::Spanned`] values, so that a value found wrong
//! only after parsing is still reported at its own place.

use std::{
    borrow::Cow,
    ops::Range,
    path::{Path, PathBuf},
};

use toml::Spanned;

/// An error at a place in a document: a syntax error, a value of the wrong type or shape,
/// or a value that does not compile. `key` is the dotted key path
/// (`sandbox.agent.rule[0].methods[1]`), `None` when the document is not even valid TOML.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}:{line}:{column}: {}: {message}",
    path.display(),
    key.as_deref().unwrap_or("-")
)]
pub struct Located {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub key: Option<String>,
    pub message: String,
}

/// A document's text and the path it came from.
pub struct Doc<'a> {
    pub text: &'a str,
    pub path: &'a Path,
}

impl Doc<'_> {
    /// An error at byte range `span`, under the dotted key path `key`.
    pub fn error(
        &self,
        span: Range<usize>,
        key: Option<String>,
        message: impl Into<String>,
    ) -> Located {
        let (line, column) = line_col(self.text, span.start);
        Located {
            path: self.path.to_owned(),
            line,
            column,
            key,
            message: message.into(),
        }
    }

    /// An error at `value`.
    pub fn at<T>(&self, value: &Spanned<T>, key: String, message: impl Into<String>) -> Located {
        self.error(value.span(), Some(key), message)
    }

    /// toml's own errors carry a span but no key path: recover the key from the parsed
    /// document ([`key_at`]). A document that does not parse has no keys to name.
    pub fn toml_error(&self, e: &toml::de::Error) -> Located {
        let span = e.span().unwrap_or(0..0);
        let key = toml::de::DeTable::parse(self.text)
            .ok()
            .and_then(|doc| key_at(doc.get_ref(), span.start));
        self.error(span, key, e.message())
    }
}

/// 1-based line and column of byte offset `byte` in `text`. Columns count characters, not
/// bytes, as editors do. An offset past the end or inside a character is moved back to the
/// nearest character start.
pub fn line_col(text: &str, byte: usize) -> (usize, usize) {
    let mut b = byte.min(text.len());
    while !text.is_char_boundary(b) {
        b -= 1;
    }
    let before = &text[..b];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// `prefix.key`, quoting a key that is not a bare TOML key so the path can be pasted back.
pub fn child(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key: Cow<'_, str> = if bare {
        key.into()
    } else {
        format!("{key:?}").into()
    };
    if prefix.is_empty() {
        key.into_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

pub fn index(prefix: &str, i: usize) -> String {
    format!("{prefix}[{i}]")
}

/// The dotted path of the key, or failing that of the innermost value, whose span holds
/// `offset`. Keys are tried first because some table spans are wider than the table: one
/// opened by a `[header]` spans the header, which also holds its keys, and one created
/// implicitly (`sandbox` in `[sandbox.agent]`) spans its key.
fn key_at(doc: &toml::de::DeTable<'_>, offset: usize) -> Option<String> {
    walk_table(doc, offset, "", Look::Keys).or_else(|| walk_table(doc, offset, "", Look::Values))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Look {
    Keys,
    Values,
}

/// Every entry is searched, not only those whose span holds the offset: a header's span
/// does not cover the entries below it.
fn walk_table(
    table: &toml::de::DeTable<'_>,
    offset: usize,
    prefix: &str,
    look: Look,
) -> Option<String> {
    table.iter().find_map(|(k, v)| {
        let path = child(prefix, k.get_ref());
        if look == Look::Keys && k.span().contains(&offset) {
            return Some(path);
        }
        walk_value(v, offset, path, look)
    })
}

fn walk_value(
    value: &Spanned<toml::de::DeValue<'_>>,
    offset: usize,
    path: String,
    look: Look,
) -> Option<String> {
    let inner = match value.get_ref() {
        toml::de::DeValue::Table(t) => walk_table(t, offset, &path, look),
        toml::de::DeValue::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| walk_value(v, offset, index(&path, i), look)),
        _ => None,
    };
    inner.or_else(|| (look == Look::Values && value.span().contains(&offset)).then_some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let t = "ab\ncdé\nf";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 2), (1, 3));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 8), (3, 1), "é is two bytes but one column");
        assert_eq!(line_col(t, 6), (2, 3), "inside é: moved back to its start");
        assert_eq!(line_col(t, 100), (3, 2), "clamped to the end");
    }
}
