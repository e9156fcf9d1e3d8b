//! SPIFFE federation for tessera: what crosses a trust domain boundary.
//!
//! - [`SpiffeBundle`]: the trust material of one trust domain, read from and written as
//!   the SPIFFE bundle document (SPIFFE Trust Domain and Bundle spec §4) or read from
//!   PEM.
//! - [`server`]: the bundle endpoint server (Federation spec §5), with the `https_web`
//!   and `https_spiffe` TLS configurations.
//! - [`client`]: one bounded fetch of a foreign bundle endpoint with either profile.
//! - [`policy`]: when to poll again and whether a fetched bundle replaces the stored one.
//! - [`svid`]: X509-SVID verification against the bundle of the SVID's own trust domain.
//!
//! It owns no storage, configuration or scheduling loop: the server stores federation
//! relationships and bundles, runs the poll loop with [`RefreshPolicy`] and
//! [`should_store`], and distributes the result; the agent only consumes bundles.
//! A bundle is always bound to the trust domain the caller names, never to what a
//! document says, and bundles of different trust domains are never merged.

pub mod bundle;
pub mod client;
pub mod policy;
pub mod server;
pub mod svid;

pub use bundle::{BundleError, MAX_BUNDLE_SIZE, SpiffeBundle};
pub use client::{
    FetchError, FetchLimits, FetchedBundle, Profile, UrlError, check_endpoint_url, fetch_bundle,
    read_pem_certificates,
};
pub use policy::{Decision, RefreshPolicy, should_store};
pub use server::{
    BundleSource, ServeLimits, ServerConfigError, https_spiffe_server_config,
    https_web_server_config, https_web_server_config_from_files, serve, serve_with_limits,
};
pub use svid::{SvidError, verify_x509_svid};
