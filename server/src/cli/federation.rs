//! `tessera-server federation ...` and `bundle set|list|delete`: federation
//! relationships and federated bundles, over the admin socket.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use serde_json::json;
use tessera_proto::admin::{
    DeleteFederatedBundleRequest, DeleteFederationRelationshipRequest, FederationRelationship,
    GetFederationRelationshipRequest, ListFederatedBundlesRequest,
    ListFederationRelationshipsRequest, RefreshFederatedBundleRequest, SetFederatedBundleRequest,
};
use tessera_proto::types::Bundle;

use super::{CommandError, Common, Output, client, pem, unix_to_rfc3339};

/// Bundle endpoint profiles (SPIFFE Federation §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EndpointProfileArg {
    /// The endpoint presents a Web PKI certificate for its host name, checked against
    /// the server's `web_trust_roots_path`.
    #[value(name = "https_web")]
    HttpsWeb,
    /// The endpoint presents an X509-SVID with `--endpoint-spiffe-id`, checked against
    /// the stored bundle of the federated trust domain.
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
}

impl EndpointProfileArg {
    fn name(self) -> &'static str {
        match self {
            Self::HttpsWeb => "https_web",
            Self::HttpsSpiffe => "https_spiffe",
        }
    }
}

/// `federation` subcommands.
#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Federate with another trust domain: the server polls its bundle endpoint at the
    /// bundle's refresh hint and stores the bundle under that trust domain only.
    ///
    /// With `https_spiffe`, the first fetch needs the peer's bundle: give it with
    /// `--trust-domain-bundle` (or `bundle set` beforehand). Entries receive the bundle
    /// with `entry create --federates-with TD`.
    Create {
        /// The federated trust domain, e.g. `example-federated.org`.
        #[arg(long = "trust-domain", value_name = "TD")]
        trust_domain: String,
        /// Its bundle endpoint, an `https://` URL.
        #[arg(long = "bundle-endpoint-url", value_name = "URL")]
        bundle_endpoint_url: String,
        /// How the endpoint is authenticated.
        #[arg(long, value_enum)]
        profile: EndpointProfileArg,
        /// `https_spiffe`: the SPIFFE ID the endpoint must present (default
        /// `spiffe://<TD>/tessera/server`).
        #[arg(long = "endpoint-spiffe-id", value_name = "ID")]
        endpoint_spiffe_id: Option<String>,
        /// A bundle of the trust domain to store now (PEM certificates or a SPIFFE
        /// bundle document), e.g. from `bundle show --format spiffe` over there.
        #[arg(long = "trust-domain-bundle", value_name = "FILE")]
        trust_domain_bundle: Option<PathBuf>,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Change a relationship: the flags given replace the stored values.
    Update {
        /// The federated trust domain.
        #[arg(long = "trust-domain", value_name = "TD")]
        trust_domain: String,
        /// A new bundle endpoint URL.
        #[arg(long = "bundle-endpoint-url", value_name = "URL")]
        bundle_endpoint_url: Option<String>,
        /// A new profile.
        #[arg(long, value_enum)]
        profile: Option<EndpointProfileArg>,
        /// A new endpoint SPIFFE ID (`https_spiffe`).
        #[arg(long = "endpoint-spiffe-id", value_name = "ID")]
        endpoint_spiffe_id: Option<String>,
        /// A bundle of the trust domain to store now (replaces the stored one).
        #[arg(long = "trust-domain-bundle", value_name = "FILE")]
        trust_domain_bundle: Option<PathBuf>,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// List the relationships with their refresh status.
    List {
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Show one relationship.
    Show {
        /// The federated trust domain.
        #[arg(value_name = "TD")]
        trust_domain: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Delete a relationship and the bundle stored for it; agents drop the bundle at
    /// once.
    Delete {
        /// The federated trust domain.
        #[arg(value_name = "TD")]
        trust_domain: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Fetch the trust domain's bundle endpoint now; prints what was done (`stored`,
    /// `unchanged`, `ignored_lower_sequence`, `rejected_empty`). A failed fetch exits 1
    /// and keeps the stored bundle.
    Refresh {
        /// The federated trust domain.
        #[arg(value_name = "TD")]
        trust_domain: String,
        /// Accept a bundle whose sequence number is lower than the stored one's (the
        /// peer trust domain was rebuilt).
        #[arg(long = "accept-lower-sequence")]
        accept_lower_sequence: bool,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, CommandError> {
    std::fs::read(path).map_err(|err| CommandError {
        code: 64,
        message: format!("cannot read {}: {err}", path.display()),
    })
}

fn relationship_json(r: &FederationRelationship) -> serde_json::Value {
    json!({
        "trust_domain": r.trust_domain,
        "bundle_endpoint_url": r.bundle_endpoint_url,
        "profile": r.profile,
        "endpoint_spiffe_id": (!r.endpoint_spiffe_id.is_empty()).then_some(&r.endpoint_spiffe_id),
        "bundle_sequence_number": r.bundle_sequence_number,
        "last_refresh_at": (r.last_refresh_at != 0).then(|| unix_to_rfc3339(r.last_refresh_at)),
        "last_error": (!r.last_error.is_empty()).then_some(&r.last_error),
    })
}

fn relationship_text(r: &FederationRelationship) -> String {
    let mut out = format!(
        "Trust domain     : {}\nBundle endpoint  : {}\nProfile          : {}\n",
        r.trust_domain, r.bundle_endpoint_url, r.profile
    );
    if !r.endpoint_spiffe_id.is_empty() {
        out.push_str(&format!("Endpoint ID      : {}\n", r.endpoint_spiffe_id));
    }
    out.push_str(&format!(
        "Bundle sequence  : {}\n",
        r.bundle_sequence_number
    ));
    if r.last_refresh_at != 0 {
        out.push_str(&format!(
            "Last refresh     : {}\n",
            unix_to_rfc3339(r.last_refresh_at)
        ));
    }
    if !r.last_error.is_empty() {
        out.push_str(&format!("Last error       : {}\n", r.last_error));
    }
    out
}

fn bundle_json(b: &Bundle) -> serde_json::Value {
    json!({
        "trust_domain": b.trust_domain,
        "sequence_number": b.sequence_number,
        "x509_authorities": b.x509_authorities.iter().map(|der| pem(der)).collect::<Vec<_>>(),
        "jwt_authorities": b.jwt_authorities.iter().map(|a| json!({ "kid": a.kid })).collect::<Vec<_>>(),
    })
}

fn bundle_text(b: &Bundle) -> String {
    format!(
        "Trust domain     : {}\nSequence number  : {}\nX.509 authorities: {}\nJWT authorities  : {}\n",
        b.trust_domain,
        b.sequence_number,
        b.x509_authorities.len(),
        b.jwt_authorities
            .iter()
            .map(|a| a.kid.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn print_one(output: Output, r: &FederationRelationship) -> String {
    match output {
        Output::Text => relationship_text(r),
        Output::Json => format!("{}\n", relationship_json(r)),
    }
}

/// Runs a `federation` command.
pub(super) async fn run(command: FederationCommand) -> Result<String, CommandError> {
    match command {
        FederationCommand::Create {
            trust_domain,
            bundle_endpoint_url,
            profile,
            endpoint_spiffe_id,
            trust_domain_bundle,
            common,
        } => {
            let bundle = trust_domain_bundle
                .as_deref()
                .map(read_file)
                .transpose()?
                .unwrap_or_default();
            let created = client(&common)
                .await?
                .create_federation_relationship(FederationRelationship {
                    trust_domain,
                    bundle_endpoint_url,
                    profile: profile.name().to_owned(),
                    endpoint_spiffe_id: endpoint_spiffe_id.unwrap_or_default(),
                    trust_domain_bundle: bundle,
                    ..FederationRelationship::default()
                })
                .await?
                .into_inner();
            Ok(print_one(common.output, &created))
        }
        FederationCommand::Update {
            trust_domain,
            bundle_endpoint_url,
            profile,
            endpoint_spiffe_id,
            trust_domain_bundle,
            common,
        } => {
            let mut admin = client(&common).await?;
            let mut current = admin
                .get_federation_relationship(GetFederationRelationshipRequest { trust_domain })
                .await?
                .into_inner();
            if let Some(url) = bundle_endpoint_url {
                current.bundle_endpoint_url = url;
            }
            if let Some(profile) = profile {
                current.profile = profile.name().to_owned();
                if profile == EndpointProfileArg::HttpsWeb {
                    current.endpoint_spiffe_id.clear();
                }
            }
            if let Some(id) = endpoint_spiffe_id {
                current.endpoint_spiffe_id = id;
            }
            if let Some(path) = trust_domain_bundle {
                current.trust_domain_bundle = read_file(&path)?;
            }
            let updated = admin
                .update_federation_relationship(current)
                .await?
                .into_inner();
            Ok(print_one(common.output, &updated))
        }
        FederationCommand::List { common } => {
            let relationships = client(&common)
                .await?
                .list_federation_relationships(ListFederationRelationshipsRequest {})
                .await?
                .into_inner()
                .relationships;
            Ok(match common.output {
                Output::Text => {
                    let mut out =
                        format!("Found {} federation relationships\n", relationships.len());
                    for r in &relationships {
                        out.push('\n');
                        out.push_str(&relationship_text(r));
                    }
                    out
                }
                Output::Json => format!(
                    "{}\n",
                    serde_json::Value::Array(relationships.iter().map(relationship_json).collect())
                ),
            })
        }
        FederationCommand::Show {
            trust_domain,
            common,
        } => {
            let r = client(&common)
                .await?
                .get_federation_relationship(GetFederationRelationshipRequest { trust_domain })
                .await?
                .into_inner();
            Ok(print_one(common.output, &r))
        }
        FederationCommand::Delete {
            trust_domain,
            common,
        } => {
            client(&common)
                .await?
                .delete_federation_relationship(DeleteFederationRelationshipRequest {
                    trust_domain: trust_domain.clone(),
                })
                .await?;
            Ok(match common.output {
                Output::Text => format!("Deleted federation relationship with {trust_domain}\n"),
                Output::Json => format!("{}\n", json!({ "deleted": trust_domain })),
            })
        }
        FederationCommand::Refresh {
            trust_domain,
            accept_lower_sequence,
            common,
        } => {
            let response = client(&common)
                .await?
                .refresh_federated_bundle(RefreshFederatedBundleRequest {
                    trust_domain,
                    accept_lower_sequence,
                })
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => format!("{}\n", response.outcome),
                Output::Json => format!(
                    "{}\n",
                    json!({
                        "outcome": response.outcome,
                        "bundle": response.bundle.as_ref().map(bundle_json),
                    })
                ),
            })
        }
    }
}

/// `bundle set --trust-domain TD FILE`.
pub(super) async fn set(
    trust_domain: String,
    file: PathBuf,
    common: Common,
) -> Result<String, CommandError> {
    let bundle = read_file(&file)?;
    let stored = client(&common)
        .await?
        .set_federated_bundle(SetFederatedBundleRequest {
            trust_domain,
            bundle,
        })
        .await?
        .into_inner();
    Ok(match common.output {
        Output::Text => bundle_text(&stored),
        Output::Json => format!("{}\n", bundle_json(&stored)),
    })
}

/// `bundle list`: the federated bundles.
pub(super) async fn list(common: Common) -> Result<String, CommandError> {
    let bundles = client(&common)
        .await?
        .list_federated_bundles(ListFederatedBundlesRequest {})
        .await?
        .into_inner()
        .bundles;
    Ok(match common.output {
        Output::Text => {
            let mut out = format!("Found {} federated bundles\n", bundles.len());
            for b in &bundles {
                out.push('\n');
                out.push_str(&bundle_text(b));
            }
            out
        }
        Output::Json => format!(
            "{}\n",
            serde_json::Value::Array(bundles.iter().map(bundle_json).collect())
        ),
    })
}

/// `bundle delete TD`.
pub(super) async fn delete(trust_domain: String, common: Common) -> Result<String, CommandError> {
    client(&common)
        .await?
        .delete_federated_bundle(DeleteFederatedBundleRequest {
            trust_domain: trust_domain.clone(),
        })
        .await?;
    Ok(match common.output {
        Output::Text => format!("Deleted the bundle of {trust_domain}\n"),
        Output::Json => format!("{}\n", json!({ "deleted": trust_domain })),
    })
}
