//! `tessera-test-workload`: a workload for the scenario tests, talking to the agent
//! only through the Rust `spiffe` crate's Workload API client, as a real SPIFFE client
//! would. It prints one JSON line per result and never panics on a server answer.
//!
//! Usage: `tessera-test-workload fetch SOCKET`,
//! `tessera-test-workload watch SOCKET COUNT`,
//! `tessera-test-workload fetch-jwt SOCKET [--spiffe-id=ID] AUDIENCE...` (every JWT-SVID
//! of the caller, each verified offline with `JwtSvid::parse_and_validate` against the
//! JWT bundles fetched from the agent),
//! `tessera-test-workload validate-jwt SOCKET AUDIENCE TOKEN` (through the agent) or
//! `tessera-test-workload jwt-bundles SOCKET [COUNT]` (COUNT updates of the JWT bundle
//! stream; 1 by default).

use std::process::ExitCode;

use futures::StreamExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use serde_json::json;
use spiffe::{JwtBundleSet, JwtSvid, SpiffeId, WorkloadApiClient, WorkloadApiError, X509Context};

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
    Ok(json!({ "ok": true, "pid": std::process::id(), "svids": svids }))
}

/// Each JWT-SVID with its claims as the `spiffe` crate parsed them, and whether it
/// verifies offline against `bundles` for its first audience.
fn describe_jwts(svids: &[JwtSvid], bundles: &JwtBundleSet) -> serde_json::Value {
    let svids: Vec<_> = svids
        .iter()
        .map(|svid| {
            let verified = match JwtSvid::parse_and_validate(
                svid.token(),
                bundles,
                &svid.audience()[..svid.audience().len().min(1)],
            ) {
                Ok(checked) if checked.spiffe_id() == svid.spiffe_id() => json!(true),
                Ok(checked) => json!(format!("verified as {}", checked.spiffe_id())),
                Err(err) => json!(err.to_string()),
            };
            json!({
                "spiffe_id": svid.spiffe_id().to_string(),
                "token": svid.token(),
                "hint": svid.hint(),
                "audience": svid.audience(),
                "kid": svid.key_id(),
                "expiry": svid.expiry().unix_timestamp(),
                "verified": verified,
            })
        })
        .collect();
    json!({ "ok": true, "svids": svids })
}

/// The JWT bundle set: per trust domain, its key ids (sorted) and the JWKs.
fn describe_jwt_bundles(bundles: &JwtBundleSet) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (td, bundle) in bundles.iter() {
        let mut keys: Vec<(String, serde_json::Value)> = bundle
            .jwt_authorities()
            .map(|a| {
                (
                    a.key_id().to_owned(),
                    serde_json::from_slice(a.jwk_json()).unwrap_or(serde_json::Value::Null),
                )
            })
            .collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        out.insert(
            td.to_string(),
            json!({
                "kids": keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>(),
                "jwks": keys.into_iter().map(|k| k.1).collect::<Vec<_>>(),
            }),
        );
    }
    json!({ "ok": true, "bundles": out })
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

/// Modes `inherit-stdin-fetch` and `inherit-stdin-watch COUNT`: the Workload API
/// connection is standard input, a socket another process connected and handed down
/// (fork + exec), so the caller the agent pinned is that process, not this one
/// (SECURITY.md §3.2 items 13-15, 21-25). Speaks through the generated client and prints
/// one JSON line per message or status: `{"ok":true,"spiffe_ids":[...],"serials":[...]}`
/// or `{"ok":false,"code":"PermissionDenied","message":...}`.
async fn inherit_stdin(mode: &str, args: &[String]) -> Result<(), String> {
    use std::os::fd::AsFd;
    use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(stream)));
    let status_line = |status: &tonic::Status| json!({ "ok": false, "code": format!("{:?}", status.code()), "message": status.message() });
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            async move {
                taken
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the inherited connection is gone"))
            }
        }))
        .await;
    let channel = match channel {
        Ok(channel) => channel,
        Err(err) => {
            print(&json!({ "ok": false, "code": "Connect", "message": format!("{err:?}") }));
            return Ok(());
        }
    };
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let count: usize = match mode {
        "fetch" => 1,
        "watch" => args.first().and_then(|c| c.parse().ok()).unwrap_or(1),
        other => return Err(format!("unknown mode inherit-stdin-{other}")),
    };
    let mut stream = match client
        .fetch_x509svid(tessera_agent::cli::with_header(
            tessera_proto::workload::X509svidRequest {},
        ))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            print(&status_line(&status));
            return Ok(());
        }
    };
    for _ in 0..count {
        match stream.message().await {
            Ok(Some(message)) => {
                let ids: Vec<_> = message.svids.iter().map(|s| s.spiffe_id.clone()).collect();
                let serials: Vec<_> = message
                    .svids
                    .iter()
                    .map(|s| {
                        x509_parser::parse_x509_certificate(&s.x509_svid)
                            .map(|(_, c)| c.raw_serial_as_string())
                            .unwrap_or_default()
                    })
                    .collect();
                print(&json!({ "ok": true, "spiffe_ids": ids, "serials": serials }));
            }
            Ok(None) => {
                print(&json!({ "ok": false, "code": "Ended", "message": "stream ended" }));
                return Ok(());
            }
            Err(status) => {
                print(&status_line(&status));
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn run(args: &[String]) -> Result<(), String> {
    if let Some(mode) = args.first().and_then(|m| m.strip_prefix("inherit-stdin-")) {
        return inherit_stdin(mode, &args[1..]).await;
    }
    let (mode, socket) = match args {
        [mode, socket, ..] => (mode.as_str(), socket.as_str()),
        _ => {
            return Err(
                "usage: tessera-test-workload fetch|watch|fetch-jwt|validate-jwt|jwt-bundles SOCKET ..."
                    .into(),
            );
        }
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
        "fetch-jwt" => {
            let mut spiffe_id = None;
            let mut audiences = Vec::new();
            for a in &args[2..] {
                match a.strip_prefix("--spiffe-id=") {
                    Some(id) => {
                        spiffe_id = Some(id.parse::<SpiffeId>().map_err(|e| e.to_string())?);
                    }
                    None => audiences.push(a.clone()),
                }
            }
            let outcome = match client
                .fetch_all_jwt_svids(&audiences, spiffe_id.as_ref())
                .await
            {
                Ok(svids) => match client.fetch_jwt_bundles().await {
                    Ok(bundles) => describe_jwts(&svids, &bundles),
                    Err(err) => failure(&err),
                },
                Err(err) => failure(&err),
            };
            print(&outcome);
        }
        "validate-jwt" => {
            let [_, _, audience, token] = args else {
                return Err("usage: validate-jwt SOCKET AUDIENCE TOKEN".into());
            };
            let outcome = match client.validate_jwt_token(audience, token).await {
                Ok(svid) => json!({
                    "ok": true,
                    "spiffe_id": svid.spiffe_id().to_string(),
                    "audience": svid.audience(),
                    "expiry": svid.expiry().unix_timestamp(),
                }),
                Err(err) => failure(&err),
            };
            print(&outcome);
        }
        "jwt-bundles" => {
            let count: usize = args.get(2).and_then(|c| c.parse().ok()).unwrap_or(1);
            let mut stream = match client.stream_jwt_bundles().await {
                Ok(stream) => stream,
                Err(err) => {
                    print(&failure(&err));
                    return Ok(());
                }
            };
            for _ in 0..count {
                match stream.next().await {
                    Some(Ok(bundles)) => print(&describe_jwt_bundles(&bundles)),
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
