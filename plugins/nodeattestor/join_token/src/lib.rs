//! The `join_token` node attestor of tessera: the token format, generation, parsing and
//! hashing shared by the agent half (which presents a token) and the server half (which
//! redeems it).
//!
//! A join token is a single-use credential `<id>.<secret>`:
//!
//! - the **id** (`[a-z0-9-]`, 1 to 64 characters) is public: it is the only part that may
//!   appear in agent IDs (`spiffe://<td>/tessera/agent/join_token/<id>`), logs and
//!   datastore indexes;
//! - the **secret** never leaves this type except through [`JoinToken::expose`], used
//!   once to show a freshly generated token to the operator; the server stores only
//!   [`JoinToken::secret_hash`] and compares hashes in constant time.
//!
//! Redemption is single-use and atomic (SECURITY.md §2 rule 4, §3.9 items 81-83); that is
//! the server datastore's job, not this crate's. Malformed tokens, including any with `/`,
//! `..`, whitespace, NUL or non-ASCII characters, are rejected by [`JoinToken::parse`]
//! before any agent ID is built (item 84).
//!
//! This crate does no I/O and holds no policy (TTLs, storage); the agent and server own
//! those.

use std::fmt;

use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Longest accepted token id, in characters (all ASCII).
pub const MAX_ID_LEN: usize = 64;
/// Shortest accepted secret, in characters (16 characters of base64url carry 96 bits).
pub const MIN_SECRET_LEN: usize = 16;
/// Longest accepted secret, in characters.
pub const MAX_SECRET_LEN: usize = 128;
/// Longest accepted token: id, `.`, secret.
pub const MAX_TOKEN_LEN: usize = MAX_ID_LEN + 1 + MAX_SECRET_LEN;

/// Why a string is not a valid join token. Messages never quote the input, which may
/// contain the secret.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum JoinTokenError {
    /// The input is empty.
    #[error("join token is empty; the valid form is <id>.<secret>")]
    Empty,
    /// The input is longer than [`MAX_TOKEN_LEN`].
    #[error("join token is longer than 193 bytes; the valid form is <id>.<secret>")]
    TooLong,
    /// The input contains a character outside ASCII.
    #[error("join token contains a non-ASCII character")]
    NonAscii,
    /// The input contains whitespace (often a pasted trailing newline).
    #[error("join token contains whitespace (check for a trailing newline)")]
    Whitespace,
    /// The input contains NUL or another control character.
    #[error("join token contains a control character")]
    ControlChar,
    /// The input contains `/`.
    #[error("join token contains `/`; the valid form is <id>.<secret>")]
    Slash,
    /// The input contains `..`.
    #[error("join token contains `..`; the valid form is <id>.<secret>")]
    DotDot,
    /// The input does not contain exactly one `.`.
    #[error("join token must contain exactly one `.` between <id> and <secret>")]
    Separator,
    /// The id is empty or longer than [`MAX_ID_LEN`].
    #[error("join token id must be 1 to 64 characters")]
    IdLength,
    /// The id contains a character outside `[a-z0-9-]`.
    #[error("join token id may contain only [a-z0-9-]")]
    IdChar,
    /// The secret is shorter than [`MIN_SECRET_LEN`] or longer than [`MAX_SECRET_LEN`].
    #[error("join token secret must be 16 to 128 characters")]
    SecretLength,
    /// The secret contains a character outside `[A-Za-z0-9_-]`.
    #[error("join token secret may contain only [A-Za-z0-9_-]")]
    SecretChar,
}

/// A parsed or freshly generated join token.
///
/// There is deliberately no `Display`, and `Debug` prints only the id, so the secret
/// cannot end up in a log by accident.
#[derive(Clone)]
pub struct JoinToken {
    id: String,
    secret: String,
}

impl JoinToken {
    /// Generates a new token: id from 16 random bytes (32 lowercase hex characters),
    /// secret from 32 random bytes (64 lowercase hex characters), both from the system
    /// CSPRNG.
    pub fn generate() -> Self {
        let rng = SystemRandom::new();
        let mut id = [0u8; 16];
        let mut secret = [0u8; 32];
        fill(&rng, &mut id);
        fill(&rng, &mut secret);
        Self {
            id: hex::encode(id),
            secret: hex::encode(secret),
        }
    }

    /// Parses `<id>.<secret>`, rejecting (never trimming or normalising) anything else.
    pub fn parse(s: &str) -> Result<Self, JoinTokenError> {
        if s.is_empty() {
            return Err(JoinTokenError::Empty);
        }
        if s.len() > MAX_TOKEN_LEN {
            return Err(JoinTokenError::TooLong);
        }
        if !s.is_ascii() {
            return Err(JoinTokenError::NonAscii);
        }
        if s.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(JoinTokenError::Whitespace);
        }
        if s.bytes().any(|b| b.is_ascii_control()) {
            return Err(JoinTokenError::ControlChar);
        }
        if s.contains('/') {
            return Err(JoinTokenError::Slash);
        }
        if s.contains("..") {
            return Err(JoinTokenError::DotDot);
        }
        let (id, secret) = s.split_once('.').ok_or(JoinTokenError::Separator)?;
        if secret.contains('.') {
            return Err(JoinTokenError::Separator);
        }
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(JoinTokenError::IdLength);
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            // Implied by the character set; kept so the id is provably a path segment.
            || !tessera_plugin_sdk::id::is_valid_path_segment(id)
        {
            return Err(JoinTokenError::IdChar);
        }
        if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&secret.len()) {
            return Err(JoinTokenError::SecretLength);
        }
        if !secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(JoinTokenError::SecretChar);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The public token id: safe for agent IDs, logs and indexes.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// SHA-256 of the secret: what the server stores and compares.
    pub fn secret_hash(&self) -> [u8; 32] {
        let d = digest::digest(&digest::SHA256, self.secret.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// True when the secret hashes to `stored`, compared in constant time.
    pub fn matches_hash(&self, stored: &[u8; 32]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(&self.secret_hash(), stored).is_ok()
    }

    /// The full `<id>.<secret>` string. The only way to get the secret out: use it once,
    /// to show a newly generated token to the operator or to send it to the server.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &format_args!("<redacted>"))
            .finish()
    }
}

#[expect(
    clippy::expect_used,
    reason = "invariant: AWS-LC's RAND_bytes aborts the process instead of returning \
              failure, so SystemRandom::fill cannot return an error"
)]
fn fill(rng: &SystemRandom, buf: &mut [u8]) {
    rng.fill(buf)
        .expect("the system CSPRNG never reports failure");
}

/// Path segments of the agent ID for a join-token-attested agent:
/// `spiffe://<td>/tessera/agent/join_token/<token_id>`. Pass `token_id` from
/// [`JoinToken::id`], which is already a valid path segment.
pub fn agent_path_segments(token_id: &str) -> [&str; 4] {
    ["tessera", "agent", "join_token", token_id]
}

#[cfg(test)]
mod tests {
    use tessera_plugin_sdk::{SpiffeId, TrustDomain};

    use super::*;

    const SECRET: &str = "abcdefghijklmnop";

    #[test]
    fn generate_shape() {
        let a = JoinToken::generate();
        let b = JoinToken::generate();
        assert_eq!(a.id().len(), 32);
        assert!(
            a.id()
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        );
        let exposed = a.expose();
        let (id, secret) = exposed.split_once('.').unwrap();
        assert_eq!(id, a.id());
        assert_eq!(secret.len(), 64);
        assert!(
            secret
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        );
        assert_ne!(a.id(), b.id());
        assert_ne!(a.secret_hash(), b.secret_hash());

        // A generated token round-trips through parse.
        let back = JoinToken::parse(&exposed).unwrap();
        assert_eq!(back.id(), a.id());
        assert_eq!(back.secret_hash(), a.secret_hash());
    }

    #[test]
    fn debug_redacts_secret() {
        let t = JoinToken::generate();
        let exposed = t.expose();
        let (_, secret) = exposed.split_once('.').unwrap();
        let dbg = format!("{t:?}");
        assert!(dbg.contains(t.id()), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        assert!(!dbg.contains(secret), "{dbg}");
        let pretty = format!("{t:#?}");
        assert!(!pretty.contains(secret));
    }

    #[test]
    fn secret_hash_is_sha256_of_secret() {
        let t = JoinToken::parse("tok-1.abc_DEF-0123456789").unwrap();
        let want = digest::digest(&digest::SHA256, b"abc_DEF-0123456789");
        assert_eq!(t.secret_hash().as_slice(), want.as_ref());
        assert!(t.matches_hash(&t.secret_hash()));
        let other = JoinToken::parse("tok-1.abc_DEF-0123456780").unwrap();
        assert!(!t.matches_hash(&other.secret_hash()));
        // The id is not part of the hash.
        let same_secret = JoinToken::parse("tok-2.abc_DEF-0123456789").unwrap();
        assert_eq!(t.secret_hash(), same_secret.secret_hash());
        // Known answer: SHA-256("abcdefghijklmnop").
        let kat = JoinToken::parse(&format!("x.{SECRET}")).unwrap();
        assert_eq!(
            hex::encode(kat.secret_hash()),
            "f39dac6cbaba535e2c207cd0cd8f154974223c848f727f98b3564cea569b41cf"
        );
    }

    #[test]
    fn parse_accepts_valid_forms() {
        let t = JoinToken::parse(&format!("a.{SECRET}")).unwrap();
        assert_eq!(t.id(), "a");
        let id64 = "a".repeat(MAX_ID_LEN);
        let s128 = "Z".repeat(MAX_SECRET_LEN);
        let t = JoinToken::parse(&format!("{id64}.{s128}")).unwrap();
        assert_eq!(t.id(), id64);
        assert_eq!(t.expose(), format!("{id64}.{s128}"));
        JoinToken::parse(&format!("0-9-a-z.{}", "Az09_-".repeat(3))).unwrap();
        JoinToken::parse(&format!("-.{SECRET}")).unwrap();
    }

    #[test]
    fn parse_rejects_bad_structure() {
        let cases: Vec<(String, JoinTokenError)> = vec![
            (String::new(), JoinTokenError::Empty),
            (SECRET.to_owned(), JoinTokenError::Separator),
            (format!("a.b.{SECRET}"), JoinTokenError::Separator),
            (format!("a.{SECRET}."), JoinTokenError::Separator),
            (format!(".{SECRET}"), JoinTokenError::IdLength),
            (
                format!("{}.{SECRET}", "a".repeat(65)),
                JoinTokenError::IdLength,
            ),
            ("abc.".to_owned(), JoinTokenError::SecretLength),
            (
                "abc.abcdefghijklmno".to_owned(),
                JoinTokenError::SecretLength,
            ),
            (
                format!("a.{}", "s".repeat(129)),
                JoinTokenError::SecretLength,
            ),
            (
                format!("{}.{}", "a".repeat(65), "s".repeat(128)),
                JoinTokenError::TooLong,
            ),
            (format!("Abc.{SECRET}"), JoinTokenError::IdChar),
            (format!("a_b.{SECRET}"), JoinTokenError::IdChar),
            (format!("a:b.{SECRET}"), JoinTokenError::IdChar),
            (format!("a%2Fb.{SECRET}"), JoinTokenError::IdChar),
            (format!("a.{SECRET}+"), JoinTokenError::SecretChar),
            (format!("a.{SECRET}="), JoinTokenError::SecretChar),
            (format!("a.{SECRET}%2F"), JoinTokenError::SecretChar),
            (format!("a.{SECRET}\n"), JoinTokenError::Whitespace),
            (format!(" a.{SECRET}"), JoinTokenError::Whitespace),
            (format!("a.{SECRET}\t"), JoinTokenError::Whitespace),
            (format!("a\0.{SECRET}"), JoinTokenError::ControlChar),
            (format!("a.{SECRET}\0"), JoinTokenError::ControlChar),
            (format!("a.{SECRET}\x7f"), JoinTokenError::ControlChar),
        ];
        for (input, want) in cases {
            assert_eq!(JoinToken::parse(&input).unwrap_err(), want, "{input:?}");
        }
    }

    /// SECURITY.md §3.9 item 84: `/`, `..` and unicode are rejected before any agent ID
    /// can be built from the token.
    #[test]
    fn s84_slash_dotdot_unicode_rejected() {
        let cases: Vec<(String, JoinTokenError)> = vec![
            (format!("a/b.{SECRET}"), JoinTokenError::Slash),
            (format!("/.{SECRET}"), JoinTokenError::Slash),
            (format!("../x.{SECRET}"), JoinTokenError::Slash),
            (format!("a.{SECRET}/x"), JoinTokenError::Slash),
            (format!("...{SECRET}"), JoinTokenError::DotDot),
            (format!("a..{SECRET}"), JoinTokenError::DotDot),
            (format!("..{SECRET}"), JoinTokenError::DotDot),
            (format!("caf\u{e9}.{SECRET}"), JoinTokenError::NonAscii),
            (format!("a\u{2215}b.{SECRET}"), JoinTokenError::NonAscii),
            (format!("a\u{ff0f}b.{SECRET}"), JoinTokenError::NonAscii),
            (
                format!("a\u{2024}\u{2024}.{SECRET}"),
                JoinTokenError::NonAscii,
            ),
            (format!("a.{SECRET}\u{e9}"), JoinTokenError::NonAscii),
            (format!("a\u{200b}.{SECRET}"), JoinTokenError::NonAscii),
        ];
        for (input, want) in cases {
            assert_eq!(JoinToken::parse(&input).unwrap_err(), want, "{input:?}");
        }
        // Every accepted token id builds a valid agent ID with exactly four segments.
        let td = TrustDomain::new("example.org").unwrap();
        for raw in [
            format!("a.{SECRET}"),
            format!("-.{SECRET}"),
            JoinToken::generate().expose(),
        ] {
            let t = JoinToken::parse(&raw).unwrap();
            let id = SpiffeId::from_segments(&td, &agent_path_segments(t.id())).unwrap();
            assert_eq!(id.path(), format!("/tessera/agent/join_token/{}", t.id()));
            assert!(id.has_path_prefix("/tessera/agent/join_token"));
        }
    }

    #[test]
    fn every_byte_in_id_and_secret() {
        for b in 0..=255u8 {
            let c = char::from(b);
            let id_ok = matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-');
            assert_eq!(
                JoinToken::parse(&format!("a{c}b.{SECRET}")).is_ok(),
                id_ok,
                "byte {b:#04x} in id"
            );
            let secret_ok = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-');
            assert_eq!(
                JoinToken::parse(&format!("a.{SECRET}{c}")).is_ok(),
                secret_ok,
                "byte {b:#04x} in secret"
            );
        }
    }

    #[test]
    fn errors_never_contain_input() {
        let secret = "TopSecretValue_0123";
        for bad in [
            format!("a/b.{secret}"),
            format!("a.{secret}+"),
            format!("a.{secret}\n"),
            format!("A.{secret}"),
        ] {
            let m = JoinToken::parse(&bad).unwrap_err().to_string();
            assert!(!m.contains(secret), "{m}");
            assert!(!m.contains('\n'), "{m}");
        }
    }

    #[test]
    fn agent_segments() {
        assert_eq!(
            agent_path_segments("abc"),
            ["tessera", "agent", "join_token", "abc"]
        );
    }
}
