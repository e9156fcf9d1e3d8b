//! Reading the facts tessera needs out of an X.509 certificate: the SPIFFE ID of its
//! single URI SAN, its serial (lowercase hex, no leading zeros) and its validity. Used
//! by the server to identify agents and by the agent to inspect its own SVIDs and the
//! server's certificate.

use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::id::SpiffeId;

/// Why a certificate could not be read as an SVID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum X509Error {
    /// Not a single, well-formed DER certificate.
    #[error("not a DER certificate: {0}")]
    Malformed(String),
    /// The certificate does not carry exactly one URI SAN.
    #[error("an SVID carries exactly one URI SAN; found {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a canonical SPIFFE ID.
    #[error("the URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(String),
    /// The serial number is negative, empty or zero.
    #[error("invalid serial number")]
    Serial,
}

/// What tessera reads from a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// The SPIFFE ID of the single URI SAN.
    pub spiffe_id: SpiffeId,
    /// Serial, lowercase hex without leading zeros.
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, X509Error> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|err| X509Error::Malformed(err.to_string()))?;
    if !rest.is_empty() {
        return Err(X509Error::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(cert)
}

fn spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509Error> {
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(|err| X509Error::Malformed(err.to_string()))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|err| X509Error::InvalidSpiffeId(err.to_string())),
        other => Err(X509Error::UriSanCount(other.len())),
    }
}

fn serial(cert: &X509Certificate<'_>) -> Result<String, X509Error> {
    let raw = cert.raw_serial();
    if raw.first().is_none_or(|b| b & 0x80 != 0) {
        return Err(X509Error::Serial);
    }
    let first_nonzero = raw.iter().position(|b| *b != 0).ok_or(X509Error::Serial)?;
    Ok(hex_lower(&raw[first_nonzero..]))
}

fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

fn system_time(time: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = time.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// The SPIFFE ID of the certificate's single URI SAN.
pub fn spiffe_id_of_certificate(der: &[u8]) -> Result<SpiffeId, X509Error> {
    spiffe_id(&parse(der)?)
}

/// The certificate's serial as lowercase hex without leading zeros.
pub fn serial_of_certificate(der: &[u8]) -> Result<String, X509Error> {
    serial(&parse(der)?)
}

/// PEM (RFC 7468: 64-column base64, LF line endings) of one DER object.
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// PEM of several DER objects with the same tag, concatenated.
pub fn pem_encode_all(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter().map(|der| pem_encode(tag, der)).collect()
}

/// SPIFFE ID, serial and validity of a leaf certificate.
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, X509Error> {
    let cert = parse(der)?;
    Ok(LeafInfo {
        spiffe_id: spiffe_id(&cert)?,
        serial_hex: serial(&cert)?,
        not_before: system_time(cert.validity().not_before),
        not_after: system_time(cert.validity().not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x00, 0x12, 0xab]));
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_id_serial_and_validity() {
        let der = cert_with_uris(&["spiffe://example.org/w"]);
        let info = leaf_info(&der).unwrap();
        assert_eq!(info.spiffe_id.as_str(), "spiffe://example.org/w");
        assert_eq!(info.serial_hex, "12ab");
        assert!(info.not_before < info.not_after);
    }

    #[test]
    fn zero_or_two_uris_and_bad_ids_are_refused() {
        assert_eq!(
            spiffe_id_of_certificate(&cert_with_uris(&[])),
            Err(X509Error::UriSanCount(0))
        );
        assert_eq!(
            spiffe_id_of_certificate(&cert_with_uris(&["spiffe://a.org/x", "spiffe://a.org/y"])),
            Err(X509Error::UriSanCount(2))
        );
        assert!(matches!(
            spiffe_id_of_certificate(&cert_with_uris(&["https://a.org/x"])),
            Err(X509Error::InvalidSpiffeId(_))
        ));
    }

    #[test]
    fn pem_matches_rcgen_and_known_vectors() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        assert_eq!(pem_encode("CERTIFICATE", cert.der()), cert.pem());
        assert_eq!(
            pem_encode("X", b"fooba"),
            "-----BEGIN X-----\nZm9vYmE=\n-----END X-----\n"
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut der = cert_with_uris(&["spiffe://example.org/w"]);
        der.push(0);
        assert!(matches!(leaf_info(&der), Err(X509Error::Malformed(_))));
    }
}
