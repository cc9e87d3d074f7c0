//! Validation of template names and sandbox ids: 1..=64 characters of `[A-Za-z0-9._-]`, no leading
//! dot (so no `.`, `..`, hidden files or path components can be smuggled in).

/// The longest name or id accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("{what} must not be empty")]
    Empty {
        /// "template name" or "sandbox id".
        what: &'static str,
    },
    /// Too long.
    #[error("{what} is {len} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// "template name" or "sandbox id".
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// Starts with a dot.
    #[error("{what} {name:?} must not start with a dot")]
    LeadingDot {
        /// "template name" or "sandbox id".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A character outside the set.
    #[error("{what} {name:?} contains {ch:?}; only A-Z a-z 0-9 . _ - are allowed")]
    BadChar {
        /// "template name" or "sandbox id".
        what: &'static str,
        /// The name (escaped by Debug).
        name: String,
        /// The first bad character.
        ch: char,
    },
}

fn check(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            len: name.len(),
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadChar {
            what,
            name: name.chars().take(MAX_NAME_LEN).collect(),
            ch,
        });
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks a template name.
pub fn template_name(name: &str) -> Result<(), NameError> {
    check("template name", name)
}

/// Checks a sandbox id.
pub fn sandbox_id(id: &str) -> Result<(), NameError> {
    check("sandbox id", id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_charset() {
        for ok in [
            "a",
            "demo",
            "ubuntu-22.04_base",
            "A.b-C_d9",
            &"x".repeat(64),
        ] {
            assert_eq!(template_name(ok), Ok(()), "{ok}");
            assert_eq!(sandbox_id(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_paths_dots_and_long_names() {
        assert!(matches!(sandbox_id(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            sandbox_id("../x"),
            Err(NameError::BadChar { ch: '/', .. })
        ));
        assert!(matches!(
            sandbox_id(".."),
            Err(NameError::LeadingDot { .. })
        ));
        assert!(matches!(
            sandbox_id(".hidden"),
            Err(NameError::LeadingDot { .. })
        ));
        assert!(matches!(
            sandbox_id("a b"),
            Err(NameError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(sandbox_id("a\0"), Err(NameError::BadChar { .. })));
        assert!(matches!(sandbox_id("é"), Err(NameError::BadChar { .. })));
        assert!(matches!(
            template_name(&"x".repeat(65)),
            Err(NameError::TooLong { len: 65, .. })
        ));
    }
}
