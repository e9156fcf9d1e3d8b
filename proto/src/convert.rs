//! Conversions between the wire messages and the SDK's domain types. Parsing happens
//! here, at the boundary: a wire entry becomes a [`RegistrationEntry`] only when every
//! ID and selector in it is valid.

use std::time::Duration;

use tessera_plugin_sdk::{RegistrationEntry, Selector, SpiffeId, SpiffeIdTemplate, TrustDomain};

use crate::types;

/// Why a wire entry is not a valid registration entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// A field failed to parse; the message names it.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, e.g. `spiffe_id`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(field: &'static str, message: impl ToString) -> ConvertError {
    ConvertError::Invalid {
        field,
        message: message.to_string(),
    }
}

/// Wire form of a selector.
pub fn selector_to_proto(selector: &Selector) -> types::Selector {
    types::Selector {
        r#type: selector.kind().to_owned(),
        value: selector.value().to_owned(),
    }
}

/// Parses a wire selector.
pub fn selector_from_proto(selector: &types::Selector) -> Result<Selector, ConvertError> {
    Selector::new(&selector.r#type, &selector.value).map_err(|err| invalid("selector", err))
}

/// Wire form of an entry.
pub fn entry_to_proto(entry: &RegistrationEntry) -> types::Entry {
    types::Entry {
        id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.to_string(),
        parent_id: entry.parent_id.to_string(),
        selectors: entry.selectors.iter().map(selector_to_proto).collect(),
        x509_svid_ttl_seconds: entry.x509_svid_ttl.map_or(0, seconds),
        dns_names: entry.dns_names.clone(),
        hint: entry.hint.clone(),
        created_revision: entry.created_revision,
        revision: entry.revision,
        jwt_svid_ttl_seconds: entry.jwt_svid_ttl.map_or(0, seconds),
        jwt_audiences: entry.jwt_audiences.clone(),
        jwt_multi_audience: entry.jwt_multi_audience,
        federates_with: entry
            .federates_with
            .iter()
            .map(|td| td.name().to_owned())
            .collect(),
    }
}

fn seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
}

/// A TTL field of the wire: 0 means "server default", negative is invalid.
pub fn ttl_from_proto(field: &'static str, secs: i64) -> Result<Option<Duration>, ConvertError> {
    match secs {
        0 => Ok(None),
        secs => u64::try_from(secs)
            .map(|secs| Some(Duration::from_secs(secs)))
            .map_err(|_| invalid(field, "must not be negative")),
    }
}

/// Parses a wire entry as sent by the server (ids and revisions included).
pub fn entry_from_proto(entry: &types::Entry) -> Result<RegistrationEntry, ConvertError> {
    let spiffe_id =
        SpiffeIdTemplate::parse(&entry.spiffe_id).map_err(|err| invalid("spiffe_id", err))?;
    let parent_id = SpiffeId::parse(&entry.parent_id).map_err(|err| invalid("parent_id", err))?;
    let selectors = entry
        .selectors
        .iter()
        .map(selector_from_proto)
        .collect::<Result<Vec<_>, _>>()?;
    let x509_svid_ttl = ttl_from_proto("x509_svid_ttl_seconds", entry.x509_svid_ttl_seconds)?;
    let jwt_svid_ttl = ttl_from_proto("jwt_svid_ttl_seconds", entry.jwt_svid_ttl_seconds)?;
    let federates_with = federates_with_from_proto(&entry.federates_with)?;
    Ok(RegistrationEntry {
        id: entry.id.clone(),
        spiffe_id,
        parent_id,
        selectors,
        x509_svid_ttl,
        jwt_svid_ttl,
        jwt_audiences: entry.jwt_audiences.clone(),
        jwt_multi_audience: entry.jwt_multi_audience,
        dns_names: entry.dns_names.clone(),
        hint: entry.hint.clone(),
        federates_with,
        created_revision: entry.created_revision,
        revision: entry.revision,
    })
}

/// Parses the `federates_with` trust domain names of a wire entry (names such as
/// `example-federated.org`; a `spiffe://` prefix is accepted), sorted and deduplicated.
pub fn federates_with_from_proto(names: &[String]) -> Result<Vec<TrustDomain>, ConvertError> {
    let mut domains = names
        .iter()
        .map(|name| TrustDomain::new(name.strip_prefix("spiffe://").unwrap_or(name)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid("federates_with", err))?;
    domains.sort_by(|a, b| a.name().cmp(b.name()));
    domains.dedup();
    Ok(domains)
}
