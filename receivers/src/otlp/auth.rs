//! Bearer-token authentication, checked before a request's body is read. A token either lets
//! its holder write anything ([`Grant::Any`]) or pins the tenant of what it writes
//! ([`Grant::Tenant`], see `ingest::pin_tenant`).

use std::sync::Arc;

/// What an accepted request may write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Any tenant's data (no auth configured, or a plain bearer token).
    Any,
    /// Only this tenant's data.
    Tenant(Arc<str>),
}

impl Grant {
    pub fn tenant(&self) -> Option<&Arc<str>> {
        match self {
            Grant::Any => None,
            Grant::Tenant(t) => Some(t),
        }
    }
}

/// The accepted tokens of one receiver.
#[derive(Clone)]
pub struct BearerAuth {
    tokens: Vec<(Vec<u8>, Grant)>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens.
        write!(f, "BearerAuth({} token(s))", self.tokens.len())
    }
}

impl BearerAuth {
    /// Tokens that may write anything.
    pub fn new(tokens: Vec<String>) -> Self {
        Self::with_grants(tokens.into_iter().map(|t| (t, Grant::Any)).collect())
    }

    /// Tokens with what each may write.
    pub fn with_grants(tokens: Vec<(String, Grant)>) -> Self {
        BearerAuth {
            tokens: tokens
                .into_iter()
                .map(|(t, g)| (t.into_bytes(), g))
                .collect(),
        }
    }

    /// Whether an `Authorization` header value carries an accepted token.
    pub fn allows(&self, header: Option<&[u8]>) -> bool {
        self.check(header).is_some()
    }

    /// What the token of an `Authorization` header value may write; `None`: not accepted.
    pub fn check(&self, header: Option<&[u8]>) -> Option<Grant> {
        let h = header?;
        let scheme = h.get(..7)?;
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return None;
        }
        let given = h[7..].trim_ascii();
        // Compare against every token without stopping early, so timing says nothing about
        // which token or how much of it matched. Tokens are unique (config validation), so at
        // most one matches.
        let mut found = None;
        for (t, g) in &self.tokens {
            if constant_time_eq(t, given) {
                found = Some(g);
            }
        }
        found.cloned()
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

    #[test]
    fn tenant_tokens_carry_their_tenant() {
        let a = BearerAuth::with_grants(vec![
            ("admin".into(), Grant::Any),
            ("tok-a".into(), Grant::Tenant("team-a".into())),
            ("tok-b".into(), Grant::Tenant("team-b".into())),
        ]);
        assert_eq!(a.check(Some(b"Bearer admin")), Some(Grant::Any));
        assert_eq!(
            a.check(Some(b"Bearer tok-a")),
            Some(Grant::Tenant("team-a".into()))
        );
        assert_eq!(
            a.check(Some(b"Bearer tok-b"))
                .as_ref()
                .and_then(Grant::tenant)
                .map(|t| &**t),
            Some("team-b")
        );
        assert_eq!(a.check(Some(b"Bearer tok-c")), None);
    }
}
