//! Output of `authority show` and of the key states in `bundle show`.

use serde_json::json;
use tessera_proto::admin::{Authority, ListAuthoritiesResponse};

use super::{pem, unix_to_rfc3339};

fn time_or_none(secs: i64) -> Option<String> {
    (secs != 0).then(|| unix_to_rfc3339(secs))
}

/// One key as JSON.
pub(super) fn authority_json(a: &Authority) -> serde_json::Value {
    if a.kind == "x509" {
        json!({
            "state": a.state,
            "serial": a.id,
            "key_id": a.key_id,
            "not_before": unix_to_rfc3339(a.not_before),
            "not_after": unix_to_rfc3339(a.not_after),
            "activated_at": time_or_none(a.activated_at),
            "certificate": pem(&a.certificate),
        })
    } else {
        json!({
            "state": a.state,
            "kid": a.id,
            "key_id": a.key_id,
            "not_before": unix_to_rfc3339(a.not_before),
            "not_after": unix_to_rfc3339(a.not_after),
            "activated_at": time_or_none(a.activated_at),
            "published_until": time_or_none(a.published_until),
        })
    }
}

/// `{"x509_authorities": [...], "jwt_authorities": [...]}` of `response`.
pub(super) fn keys_json(response: &ListAuthoritiesResponse) -> serde_json::Value {
    let of = |kind: &str| -> Vec<serde_json::Value> {
        response
            .authorities
            .iter()
            .filter(|a| a.kind == kind)
            .map(authority_json)
            .collect()
    };
    json!({
        "key_manager": response.key_manager,
        "ca_ttl_seconds": response.ca_ttl_seconds,
        "jwt_key_ttl_seconds": response.jwt_key_ttl_seconds,
        "x509_authorities": of("x509"),
        "jwt_authorities": of("jwt"),
    })
}

/// The text of `authority show` (and `bundle show --format keys`).
pub(super) fn keys_text(response: &ListAuthoritiesResponse) -> String {
    let mut out = format!(
        "Key manager: {}   CA lifetime: {}s   JWT key lifetime: {}s\n",
        response.key_manager, response.ca_ttl_seconds, response.jwt_key_ttl_seconds
    );
    for (kind, title, id_label) in [
        ("x509", "X.509 authorities (CAs)", "Serial"),
        ("jwt", "JWT authorities", "Key ID (kid)"),
    ] {
        out.push_str(&format!("\n{title}\n"));
        for a in response.authorities.iter().filter(|a| a.kind == kind) {
            out.push_str(&format!("\n  State         : {}\n", a.state));
            out.push_str(&format!("  {id_label:<14}: {}\n", a.id));
            out.push_str(&format!("  Key manager ID: {}\n", a.key_id));
            if kind == "x509" {
                out.push_str(&format!(
                    "  Not before    : {}\n",
                    unix_to_rfc3339(a.not_before)
                ));
                out.push_str(&format!(
                    "  Not after     : {}\n",
                    unix_to_rfc3339(a.not_after)
                ));
            } else {
                out.push_str(&format!(
                    "  Created       : {}\n",
                    unix_to_rfc3339(a.not_before)
                ));
                out.push_str(&format!(
                    "  Rotates before: {}\n",
                    unix_to_rfc3339(a.not_after)
                ));
                if let Some(until) = time_or_none(a.published_until) {
                    out.push_str(&format!("  Published until: {until}\n"));
                }
            }
            if let Some(at) = time_or_none(a.activated_at) {
                out.push_str(&format!("  Active since  : {at}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_show_states() {
        let response = ListAuthoritiesResponse {
            authorities: vec![
                Authority {
                    kind: "x509".into(),
                    state: "prepared".into(),
                    key_id: "x509-ca-01".into(),
                    id: "abcd".into(),
                    not_before: 1_700_000_000,
                    not_after: 1_700_086_400,
                    published_until: 1_700_086_400,
                    activated_at: 0,
                    certificate: vec![1, 2, 3],
                },
                Authority {
                    kind: "jwt".into(),
                    state: "old".into(),
                    key_id: "jwt-k1".into(),
                    id: "k1".into(),
                    not_before: 1_700_000_000,
                    not_after: 1_700_086_400,
                    published_until: 1_700_003_660,
                    activated_at: 1_700_000_000,
                    certificate: Vec::new(),
                },
            ],
            key_manager: "disk".into(),
            ca_ttl_seconds: 86400,
            jwt_key_ttl_seconds: 86400,
        };
        let text = keys_text(&response);
        assert!(text.contains("State         : prepared"), "{text}");
        assert!(text.contains("Serial        : abcd"), "{text}");
        assert!(
            text.contains("Published until: 2023-11-14T23:14:20Z"),
            "{text}"
        );
        let json = keys_json(&response);
        assert_eq!(json["x509_authorities"][0]["state"], "prepared");
        assert_eq!(
            json["x509_authorities"][0]["activated_at"],
            serde_json::Value::Null
        );
        assert_eq!(json["jwt_authorities"][0]["kid"], "k1");
        assert_eq!(json["jwt_authorities"][0]["state"], "old");
    }
}
