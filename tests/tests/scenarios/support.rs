//! Helpers shared by the scenario modules.

use std::path::Path;

use tessera_agent::cli::with_header;
use tessera_proto::workload::X509svidRequest;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::Channel;

/// The test workload binary of this package.
pub fn workload_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tessera-test-workload"))
}

/// A raw Workload API client (our generated one), for calls the `spiffe` crate would
/// not make (missing or odd headers).
pub async fn raw_workload_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(tessera_proto::uds::connect(socket).await.unwrap())
}

/// The first X.509-SVID response for this process, as raw wire message.
pub async fn fetch_x509_raw(
    socket: &Path,
) -> Result<tessera_proto::workload::X509svidResponse, tonic::Status> {
    let mut client = raw_workload_client(socket).await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await?
        .into_inner();
    stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::aborted("stream ended"))
}
