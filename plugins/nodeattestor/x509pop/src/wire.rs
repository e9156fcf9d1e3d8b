//! The three messages of an x509pop attestation, as the bytes the node API carries:
//!
//! | step | node API field | JSON |
//! |---|---|---|
//! | agent → server | `AttestationParams.payload` | `{"certificates":["<base64 DER>", ...]}`, leaf first |
//! | server → agent | `challenge` | `{"nonce":"<base64 of 32 bytes>"}` |
//! | agent → server | `challenge_response` | `{"signature":"<base64>"}` |
//!
//! Base64 is the standard alphabet with padding (RFC 4648 §4), decoded strictly
//! (canonical padding and trailing bits). Unknown and duplicate fields are refused. The
//! payload form is the one SPIRE's x509pop agent sends; the challenge and response are
//! tessera's own (see the crate documentation for what is signed).
//!
//! Every decoder checks the size of its input before parsing it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// Length of the server's nonce, in bytes.
pub const NONCE_LEN: usize = 32;

/// Largest challenge an agent accepts, in bytes (a 32-byte nonce needs 57).
pub const MAX_CHALLENGE_SIZE: usize = 1024;

/// Largest challenge response the server accepts, in bytes (an 8192-bit RSA signature
/// needs 1385).
pub const MAX_RESPONSE_SIZE: usize = 4096;

/// Largest signature accepted inside a response, in bytes (8192-bit RSA).
const MAX_SIGNATURE_LEN: usize = 1024;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestationData {
    certificates: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChallengeMessage {
    nonce: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponseMessage {
    signature: String,
}

/// Why bytes are not a well-formed message. Never quotes the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireError {
    /// Larger than the cap for this message.
    TooLarge,
    /// Not the JSON object expected, or a field is not valid base64.
    Malformed,
}

pub(crate) fn encode_payload<T: AsRef<[u8]>>(chain: &[T]) -> Vec<u8> {
    to_json(&AttestationData {
        certificates: chain.iter().map(|der| STANDARD.encode(der)).collect(),
    })
}

/// The base64 strings of the chain; decoding them is left to the caller so that it can
/// check the count first.
pub(crate) fn decode_payload(bytes: &[u8], max: usize) -> Result<Vec<String>, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge);
    }
    let data: AttestationData = serde_json::from_slice(bytes).map_err(|_| WireError::Malformed)?;
    Ok(data.certificates)
}

pub(crate) fn decode_base64(s: &str) -> Result<Vec<u8>, WireError> {
    STANDARD.decode(s).map_err(|_| WireError::Malformed)
}

pub(crate) fn encode_challenge(nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    to_json(&ChallengeMessage {
        nonce: STANDARD.encode(nonce),
    })
}

pub(crate) fn decode_challenge(bytes: &[u8]) -> Result<[u8; NONCE_LEN], WireError> {
    if bytes.len() > MAX_CHALLENGE_SIZE {
        return Err(WireError::TooLarge);
    }
    let msg: ChallengeMessage = serde_json::from_slice(bytes).map_err(|_| WireError::Malformed)?;
    decode_base64(&msg.nonce)?
        .try_into()
        .map_err(|_| WireError::Malformed)
}

pub(crate) fn encode_response(signature: &[u8]) -> Vec<u8> {
    to_json(&ResponseMessage {
        signature: STANDARD.encode(signature),
    })
}

pub(crate) fn decode_response(bytes: &[u8]) -> Result<Vec<u8>, WireError> {
    if bytes.len() > MAX_RESPONSE_SIZE {
        return Err(WireError::TooLarge);
    }
    let msg: ResponseMessage = serde_json::from_slice(bytes).map_err(|_| WireError::Malformed)?;
    let signature = decode_base64(&msg.signature)?;
    if signature.is_empty() || signature.len() > MAX_SIGNATURE_LEN {
        return Err(WireError::Malformed);
    }
    Ok(signature)
}

/// JSON of a struct of strings: serde_json cannot fail on it (no maps with non-string
/// keys, no fallible `Serialize` impls), but the error is handled rather than unwrapped;
/// an empty object would then be refused by the peer.
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let chain = vec![vec![1u8, 2, 3], vec![4u8; 40]];
        let payload = encode_payload(&chain);
        assert_eq!(
            std::str::from_utf8(&payload).unwrap(),
            r#"{"certificates":["AQID","BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBA=="]}"#
        );
        let back = decode_payload(&payload, 1 << 16).unwrap();
        let back: Vec<Vec<u8>> = back.iter().map(|s| decode_base64(s).unwrap()).collect();
        assert_eq!(back, chain);

        let nonce = [7u8; NONCE_LEN];
        assert_eq!(decode_challenge(&encode_challenge(&nonce)).unwrap(), nonce);
        assert_eq!(
            decode_response(&encode_response(b"sig")).unwrap(),
            b"sig".to_vec()
        );
    }

    #[test]
    fn strict_parsing() {
        let nonce = STANDARD.encode([0u8; NONCE_LEN]);
        for bad in [
            String::new(),
            "null".to_owned(),
            "[]".to_owned(),
            format!(r#"{{"nonce":"{nonce}","extra":1}}"#),
            format!(r#"{{"nonce":"{nonce}","nonce":"{nonce}"}}"#),
            r#"{"nonce":"AAAA"}"#.to_owned(),
            format!(r#"{{"nonce":"{}"}}"#, nonce.trim_end_matches('=')),
            format!(r#"{{"nonce":"{}"}}"#, STANDARD.encode([0u8; NONCE_LEN + 1])),
            format!(r#"{{"nonce":"{nonce}"}} x"#),
        ] {
            assert_eq!(
                decode_challenge(bad.as_bytes()),
                Err(WireError::Malformed),
                "{bad}"
            );
        }
        // Non-canonical trailing bits ("AR==" decodes to the same byte as "AQ==").
        assert_eq!(decode_base64("AR=="), Err(WireError::Malformed));
        assert_eq!(
            decode_payload(br#"{"certificates":[],"x":[]}"#, 100).map(|_| ()),
            Err(WireError::Malformed)
        );
        assert_eq!(
            decode_payload(&[b' '; 101], 100).map(|_| ()),
            Err(WireError::TooLarge)
        );
        assert_eq!(
            decode_response(br#"{"signature":""}"#),
            Err(WireError::Malformed)
        );
        let long = encode_response(&[1u8; MAX_SIGNATURE_LEN + 1]);
        assert_eq!(decode_response(&long), Err(WireError::Malformed));
        assert_eq!(
            decode_response(&vec![b' '; MAX_RESPONSE_SIZE + 1]),
            Err(WireError::TooLarge)
        );
        assert_eq!(
            decode_challenge(&vec![b' '; MAX_CHALLENGE_SIZE + 1]),
            Err(WireError::TooLarge)
        );
    }
}
