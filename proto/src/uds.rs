//! Client channels over Unix sockets, for the admin API, the Workload API CLI commands
//! and tests. Each new connection dials the socket path again.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects a gRPC channel to the Unix socket at `path` (connects eagerly, so a missing
/// socket is reported here).
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    // The URI is required by the builder but unused: the connector below dials `path`.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
}
