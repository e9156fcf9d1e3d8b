//! `tessera-test-workload`: a workload for the scenario tests, talking to the agent
//! only through the Rust `spiffe` crate's Workload API client, as a real SPIFFE client
//! would. It prints one JSON line per result and never panics on a server answer.
//!
//! Usage: `tessera-test-workload fetch SOCKET` or
//! `tessera-test-workload watch SOCKET COUNT`.

use std::process::ExitCode;

use futures::StreamExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use serde_json::json;
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};

fn error_kind(err: &WorkloadApiError) -> &'static str {
    let text = format!("{err:?}");
    if matches!(err, WorkloadApiError::NoIdentityIssued) {
        "no_identity"
    } else if matches!(err, WorkloadApiError::PermissionDenied(_)) {
        "permission_denied"
    } else if err.is_invalid_argument() {
        "invalid_argument"
    } else if text.contains("Unavailable") {
        "unavailable"
    } else {
        "other"
    }
}

/// Checks every SVID: its chain verifies against the bundle of its trust domain for
/// client and server auth, and its private key matches its certificate.
fn describe(context: &X509Context) -> Result<serde_json::Value, String> {
    let mut svids = Vec::new();
    for svid in context.svids() {
        let td = svid.spiffe_id().trust_domain();
        let bundle = context
            .bundle_set()
            .get(td)
            .ok_or_else(|| format!("no bundle for {td}"))?;
        let anchors: Vec<_> = bundle
            .authorities()
            .iter()
            .map(|a| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(a.as_bytes()))
                    .map(|t| t.to_owned())
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| e.to_string())?;
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            leaf.verify_for_usage(
                algs.all,
                &anchors,
                &chain[1..],
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .map_err(|e| format!("chain does not verify: {e}"))?;
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        let signing =
            rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing)
            .keys_match()
            .map_err(|e| format!("key does not match: {e}"))?;
        let serial = tessera_plugin_sdk::x509::serial_of_certificate(&chain[0])
            .map_err(|e| e.to_string())?;
        svids.push(json!({
            "spiffe_id": svid.spiffe_id().to_string(),
            "serial": serial,
            "hint": svid.hint(),
            "chain_verified": true,
        }));
    }
    Ok(json!({ "ok": true, "svids": svids }))
}

fn print(value: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn failure(err: &WorkloadApiError) -> serde_json::Value {
    json!({ "ok": false, "kind": error_kind(err), "error": err.to_string() })
}

async fn run(args: &[String]) -> Result<(), String> {
    let (mode, socket) = match args {
        [mode, socket, ..] => (mode.as_str(), socket.as_str()),
        _ => return Err("usage: tessera-test-workload fetch|watch SOCKET [COUNT]".into()),
    };
    let client = match WorkloadApiClient::connect_to(format!("unix://{socket}")).await {
        Ok(client) => client,
        Err(err) => {
            print(&failure(&err));
            return Ok(());
        }
    };
    match mode {
        "fetch" => {
            let outcome = match client.fetch_x509_context().await {
                Ok(context) => describe(&context)
                    .unwrap_or_else(|e| json!({ "ok": false, "kind": "invalid", "error": e })),
                Err(err) => failure(&err),
            };
            print(&outcome);
        }
        "watch" => {
            let count: usize = args.get(2).and_then(|c| c.parse().ok()).unwrap_or(1);
            let mut stream = match client.stream_x509_contexts().await {
                Ok(stream) => stream,
                Err(err) => {
                    print(&failure(&err));
                    return Ok(());
                }
            };
            let mut seen = 0;
            while seen < count {
                match stream.next().await {
                    Some(Ok(context)) => {
                        print(&describe(&context).unwrap_or_else(
                            |e| json!({ "ok": false, "kind": "invalid", "error": e }),
                        ));
                        seen += 1;
                    }
                    Some(Err(err)) => {
                        print(&failure(&err));
                        return Ok(());
                    }
                    None => {
                        print(&json!({ "ok": false, "kind": "ended", "error": "stream ended" }));
                        return Ok(());
                    }
                }
            }
        }
        other => return Err(format!("unknown mode {other}")),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::from(64)
        }
    }
}
