//! The two signing calls the agent makes for workloads (`BatchNewX509SVID` for one key,
//! `NewJWTSVID`), behind a trait so that the SVID caches can be tested against a local
//! signer. [`ServerConnection`] is the real one (with failover between the configured
//! servers).

use std::fmt;

use futures::future::BoxFuture;
use tessera_plugin_sdk::TemplateValues;
use tessera_proto::node::{
    BatchNewX509svidRequest, NewJwtsvidRequest, NewJwtsvidResponse, NewX509svidParams,
    x509svid_result,
};
use tokio::sync::watch;
use tonic::Status;

use crate::node::ServerConnection;

/// Signs SVIDs for entries this agent holds. `values` are the caller's placeholder
/// values when the entry's SPIFFE ID is a template (only those the template uses), and
/// empty otherwise; the server renders and checks the ID itself.
pub trait Signer: Send + Sync + fmt::Debug {
    /// An X.509-SVID for the public key `spki` (SubjectPublicKeyInfo, DER): its DER
    /// chain, leaf first.
    fn new_x509<'a>(
        &'a self,
        entry_id: &'a str,
        spki: Vec<u8>,
        values: &'a TemplateValues,
    ) -> BoxFuture<'a, Result<Vec<Vec<u8>>, Status>>;

    /// A JWT-SVID for `audiences`.
    fn new_jwt<'a>(
        &'a self,
        entry_id: &'a str,
        audiences: &'a [String],
        values: &'a TemplateValues,
    ) -> BoxFuture<'a, Result<NewJwtsvidResponse, Status>>;

    /// Changes when a call reaches a server after none could be reached (see
    /// [`ServerConnection::reachable_again`]), so that retries waiting for their backoff
    /// can go at once; `None` when the signer cannot tell.
    fn reachable_again(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

impl Signer for ServerConnection {
    fn new_x509<'a>(
        &'a self,
        entry_id: &'a str,
        spki: Vec<u8>,
        values: &'a TemplateValues,
    ) -> BoxFuture<'a, Result<Vec<Vec<u8>>, Status>> {
        Box::pin(async move {
            let request = BatchNewX509svidRequest {
                params: vec![NewX509svidParams {
                    entry_id: entry_id.to_owned(),
                    public_key: spki,
                    template_values: values.to_map(),
                }],
            };
            let response = self
                .call_within(
                    "BatchNewX509SVID",
                    self.timeouts().workload_signing,
                    |mut client| {
                        let request = request.clone();
                        async move { client.batch_new_x509svid(request).await }
                    },
                )
                .await?
                .into_inner();
            match response.results.into_iter().next().and_then(|r| r.result) {
                Some(x509svid_result::Result::Svid(svid)) => Ok(svid.cert_chain),
                Some(x509svid_result::Result::Error(err)) => {
                    Err(Status::new(tonic::Code::from(err.code), err.message))
                }
                None => Err(Status::internal("server sent no result")),
            }
        })
    }

    fn new_jwt<'a>(
        &'a self,
        entry_id: &'a str,
        audiences: &'a [String],
        values: &'a TemplateValues,
    ) -> BoxFuture<'a, Result<NewJwtsvidResponse, Status>> {
        Box::pin(async move {
            let request = NewJwtsvidRequest {
                entry_id: entry_id.to_owned(),
                audiences: audiences.to_vec(),
                template_values: values.to_map(),
            };
            Ok(self
                .call_within(
                    "NewJWTSVID",
                    self.timeouts().workload_signing,
                    |mut client| {
                        let request = request.clone();
                        async move { client.new_jwtsvid(request).await }
                    },
                )
                .await?
                .into_inner())
        })
    }

    fn reachable_again(&self) -> Option<watch::Receiver<u64>> {
        Some(ServerConnection::reachable_again(self))
    }
}

/// A fresh P-256 workload key, generated off the runtime: (PKCS#8 DER, SPKI DER).
pub async fn new_workload_key() -> Result<(Vec<u8>, Vec<u8>), String> {
    tokio::task::spawn_blocking(|| {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map(|key| {
                (
                    key.serialize_der(),
                    rcgen::PublicKeyData::subject_public_key_info(&key),
                )
            })
            .map_err(|err| format!("key generation: {err}"))
    })
    .await
    .map_err(|err| format!("key generation: {err}"))?
}
