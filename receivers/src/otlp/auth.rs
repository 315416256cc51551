//! Bearer-token authentication, checked before a request's body is read.

/// The accepted tokens of one receiver.
#[derive(Clone)]
pub struct BearerAuth {
    tokens: Vec<Vec<u8>>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens.
        write!(f, "BearerAuth({} token(s))", self.tokens.len())
    }
}

impl BearerAuth {
    pub fn new(tokens: Vec<String>) -> Self {
        BearerAuth {
            tokens: tokens.into_iter().map(String::into_bytes).collect(),
        }
    }

    /// Whether an `Authorization` header value carries an accepted token.
    pub fn allows(&self, header: Option<&[u8]>) -> bool {
        let Some(h) = header else { return false };
        let Some(scheme) = h.get(..7) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        let given = h[7..].trim_ascii();
        // Compare against every token without stopping early, so timing says nothing about
        // which token or how much of it matched.
        self.tokens
            .iter()
            .fold(false, |ok, t| ok | constant_time_eq(t, given))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let a = BearerAuth::new(vec!["s3cret".into(), "other".into()]);
        assert!(a.allows(Some(b"Bearer s3cret")));
        assert!(a.allows(Some(b"bearer other ")));
        assert!(!a.allows(Some(b"Bearer s3cre")));
        assert!(!a.allows(Some(b"Bearer s3cretX")));
        assert!(!a.allows(Some(b"Basic s3cret")));
        assert!(!a.allows(Some(b"s3cret")));
        assert!(!a.allows(Some(b"Bearer ")));
        assert!(!a.allows(None));
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
