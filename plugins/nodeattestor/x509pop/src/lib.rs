//! The `x509pop` node attestor of tessera: an agent proves possession of the private key
//! of a certificate that chains to CAs the server is configured with.
//!
//! This crate owns the wire messages, the checks and the identity derivation of both
//! halves; it does no networking and holds no policy about bans or storage (the server
//! owns those). The server and agent call it from the `AttestAgent` stream
//! (`AttestationParams { type: "x509pop", payload }`, then one `challenge` and one
//! `challenge_response`).
//!
//! # The exchange
//!
//! 1. **Agent** ([`AgentCredentials::attestation_payload`]): sends its certificate chain,
//!    leaf first (the [`wire`](crate#wire-format) payload).
//! 2. **Server** ([`X509PopVerifier::verify_payload`]): checks the caps first, with no
//!    signature work (payload size, number of intermediates, RSA modulus sizes,
//!    SECURITY.md §3.9 item 86), then the leaf (supported key, not a CA, key usage allows
//!    signatures), then verifies the chain with webpki to the configured CAs for client
//!    authentication at the given time. The result is a [`Candidate`]: not yet proven.
//! 3. **Server** ([`X509PopVerifier::challenge`]): 32 random bytes from AWS-LC, sent to
//!    the agent.
//! 4. **Agent** ([`AgentCredentials::respond`]): signs
//!    `b"tessera x509pop v1\0" || nonce || SHA-256(leaf certificate DER)` with the leaf key
//!    ([`SIGNATURE_CONTEXT`]): ECDSA P-256 with SHA-256, ECDSA P-384 with SHA-384 (both
//!    ASN.1 DER signatures) or RSA-PSS with SHA-256 (salt length 32).
//! 5. **Server** ([`X509PopVerifier::verify_response`]): verifies that signature with the
//!    leaf's public key over exactly that message. The [`Challenge`] is consumed, so a
//!    nonce is verified at most once; a challenge older than
//!    [`Limits::challenge_timeout`] is refused; a response made for another session's
//!    nonce does not verify (item 85). The result is an [`AttestedNode`].
//!
//! # Identity
//!
//! The agent ID is `spiffe://<td>/tessera/agent/x509pop/<fingerprint>`
//! ([`AttestedNode::agent_path_segments`]), derived only from the verified leaf
//! (item 87). The fingerprint is the lowercase hex SHA-256 of the leaf's
//! **TBSCertificate** (the part the CA signed), not of the whole DER: ECDSA signatures are
//! malleable (`s` and `n - s` both verify), so anyone holding a certificate could make a
//! second DER encoding of it with a different whole-DER hash, and with it a second agent ID
//! that a ban on the first would not cover. The TBS is fixed by the CA's signature.
//! Compute it with
//! `openssl asn1parse -in leaf.pem -strparse 4 -noout -out /dev/stdout | sha256sum`.
//!
//! Re-attestation with the same certificate yields the same agent ID; that is allowed
//! (x509pop is not trust-on-first-use), so **the server must check its ban list** before
//! issuing an SVID to an [`AttestedNode`].
//!
//! # Selectors
//!
//! All of type `x509pop` (see [`AttestedNode::selectors`]):
//!
//! - `x509pop:subject:cn:<common name>`: one per subject CN that is a string and makes a
//!   valid selector (no control characters, value at most 1024 bytes); others are
//!   skipped;
//! - `x509pop:ca:fingerprint:<hex>`: lowercase hex SHA-256 of the whole DER of each CA
//!   certificate on the verified path, intermediates from the leaf up, then the configured
//!   root (`openssl x509 -in ca.pem -outform der | sha256sum`). SPIRE uses SHA-1 here;
//! - `x509pop:serialnumber:<hex>`: the leaf's serial, lowercase hex with an even number
//!   of digits and no extra leading `00` (SPIRE's form).
//!
//! # Wire format
//!
//! JSON, size-capped and strictly parsed (unknown or duplicate fields refused):
//! payload `{"certificates":["<base64 DER>", ...]}` (leaf first; SPIRE's x509pop payload
//! form), challenge `{"nonce":"<base64>"}`, response `{"signature":"<base64>"}`, standard
//! base64 with padding. Errors never quote the peer's input.

mod agent;
mod server;
mod wire;

use aws_lc_rs::digest;
use x509_parser::certificate::X509Certificate;

pub use agent::{AgentCredentials, AgentError};
pub use server::{
    AttestationError, AttestedNode, Candidate, Challenge, ConfigError, Limits, X509PopVerifier,
    load_ca_bundle, parse_ca_bundle_pem,
};
pub use wire::{MAX_CHALLENGE_SIZE, MAX_RESPONSE_SIZE, NONCE_LEN};

/// The attestation type on the wire and in agent IDs.
pub const PLUGIN_NAME: &str = "x509pop";

/// The selector type of every selector this attestor produces.
pub const SELECTOR_TYPE: &str = "x509pop";

/// Domain separation prefix of the message the agent signs:
/// `SIGNATURE_CONTEXT || nonce || SHA-256(leaf DER)`.
pub const SIGNATURE_CONTEXT: &[u8] = b"tessera x509pop v1\0";

/// Largest payload accepted by default, in bytes.
pub const DEFAULT_MAX_PAYLOAD_SIZE: usize = 64 * 1024;

/// Intermediates accepted by default between the leaf and a configured CA.
pub const DEFAULT_MAX_INTERMEDIATES: usize = 4;

/// Largest RSA modulus accepted by default in any certificate of the chain, in bits.
pub const DEFAULT_MAX_RSA_KEY_SIZE: usize = 8192;

/// Path segments of the agent ID for an x509pop-attested agent:
/// `spiffe://<td>/tessera/agent/x509pop/<fingerprint>`. Use
/// [`AttestedNode::agent_path_segments`] on the server; this form exists for the agent
/// (which knows its fingerprint from [`AgentCredentials::fingerprint`]) and for tools.
pub fn agent_path_segments(fingerprint: &str) -> [&str; 4] {
    ["tessera", "agent", PLUGIN_NAME, fingerprint]
}

/// Parses exactly one DER certificate (no trailing bytes).
fn parse_certificate(der: &[u8]) -> Option<X509Certificate<'_>> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Some(cert),
        _ => None,
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// The agent fingerprint of a parsed leaf: hex SHA-256 of its TBSCertificate.
fn tbs_fingerprint(cert: &X509Certificate<'_>) -> String {
    hex::encode(sha256(cert.tbs_certificate.as_ref()))
}

/// `SIGNATURE_CONTEXT || nonce || leaf_der_sha256`.
fn signed_message(nonce: &[u8; NONCE_LEN], leaf_der_sha256: &[u8; 32]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNATURE_CONTEXT.len() + NONCE_LEN + 32);
    msg.extend_from_slice(SIGNATURE_CONTEXT);
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(leaf_der_sha256);
    msg
}

#[cfg(test)]
mod tests {
    use tessera_plugin_sdk::{SpiffeId, TrustDomain};

    use super::*;

    #[test]
    fn message_layout() {
        let msg = signed_message(&[1; NONCE_LEN], &[2; 32]);
        assert_eq!(msg.len(), 19 + 32 + 32);
        assert_eq!(&msg[..19], b"tessera x509pop v1\0");
        assert!(msg[19..51].iter().all(|b| *b == 1));
        assert!(msg[51..].iter().all(|b| *b == 2));
    }

    #[test]
    fn segments_build_an_agent_id() {
        let fp = hex::encode([0xab; 32]);
        let td = TrustDomain::new("example.org").unwrap();
        let id = SpiffeId::from_segments(&td, &agent_path_segments(&fp)).unwrap();
        assert_eq!(
            id.as_str(),
            format!("spiffe://example.org/tessera/agent/x509pop/{fp}")
        );
    }
}
