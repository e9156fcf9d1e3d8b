//! JWT-SVIDs end to end: a separate process using the `spiffe` crate fetches a token,
//! has the agent validate it and verifies it offline against the JWT bundle; the
//! server's audience and TTL policy; request validation of the Workload API's JWT calls
//! (SECURITY.md §3.1 items 3, 4, 5, 12); every hostile token of §3.8 (items 72-80)
//! against the agent's ValidateJWTSVID, each one signed with the server's own JWT key so
//! that only the defect under test is wrong; key rotation reaching an open bundle
//! stream; the agent's token cache; and the CLI commands for all of it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{self as sig, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use tessera_agent::RunningAgent;
use tessera_agent::cli::with_header;
use tessera_proto::admin::{
    CreateEntryRequest, HealthRequest, RotateJwtAuthorityRequest, UpdateEntryRequest,
};
use tessera_proto::types::{Entry, Selector};
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509svidRequest,
};
use tessera_tests::{Harness, my_uid, wait_until};
use tokio::io::AsyncBufReadExt;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{
    CliOutput, arg, product_command, raw_workload_client, run_product, run_with_stdin,
    run_workload, workload_bin,
};

const WORKLOAD: &str = "spiffe://example.org/workload/jwt";
const SERVER: &str = "tessera-server";
const AGENT: &str = "tessera-agent";

// ---------------------------------------------------------------------------------------
// Setup

/// A server, one synced agent, and helpers around them.
struct Setup {
    h: Harness,
    agent: RunningAgent,
    agent_id: String,
}

/// An entry for this process's uid (parent and selectors are filled in by `create`).
fn entry(spiffe_id: &str) -> Entry {
    Entry {
        spiffe_id: spiffe_id.to_owned(),
        selectors: vec![Selector {
            r#type: "unix".into(),
            value: format!("uid:{}", my_uid()),
        }],
        ..Entry::default()
    }
}

impl Setup {
    async fn start() -> Self {
        Self::start_with("").await
    }

    async fn start_with(server_extra: &str) -> Self {
        let h = Harness::start_with(server_extra).await;
        let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
        let agent_id = agent.agent_id().to_string();
        Self { h, agent, agent_id }
    }

    fn socket(&self) -> &std::path::Path {
        self.agent.socket_path()
    }

    /// Creates `entry` under this agent and waits until the agent knows it.
    async fn create(&self, mut entry: Entry) -> Entry {
        entry.parent_id = self.agent_id.clone();
        let created = self
            .h
            .admin()
            .await
            .create_entry(CreateEntryRequest { entry: Some(entry) })
            .await
            .unwrap()
            .into_inner();
        self.wait_entry(&created).await;
        created
    }

    /// Waits until the agent holds `entry` at its revision.
    async fn wait_entry(&self, entry: &Entry) {
        let (id, revision) = (entry.id.clone(), entry.revision);
        let agent = &self.agent;
        wait_until("entry reached the agent", Duration::from_secs(10), || {
            agent
                .snapshot()
                .entries
                .get(&id)
                .is_some_and(|e| e.revision == revision)
        })
        .await;
    }

    /// JWT-SVIDs signed by the server so far (admin Health).
    async fn jwt_signed(&self) -> u64 {
        self.h
            .admin()
            .await
            .health(HealthRequest {})
            .await
            .unwrap()
            .into_inner()
            .jwt_svids_signed
    }

    async fn client(&self) -> SpiffeWorkloadApiClient<Channel> {
        raw_workload_client(self.socket()).await
    }

    /// FetchJWTSVID through the raw client.
    async fn fetch(
        &self,
        audiences: &[&str],
        spiffe_id: &str,
    ) -> Result<JwtsvidResponse, tonic::Status> {
        self.client()
            .await
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: audiences.iter().map(|a| (*a).to_owned()).collect(),
                spiffe_id: spiffe_id.to_owned(),
            }))
            .await
            .map(tonic::Response::into_inner)
    }

    /// The one token FetchJWTSVID returns for `audiences`.
    async fn token(&self, audiences: &[&str]) -> String {
        let response = self.fetch(audiences, "").await.unwrap();
        assert_eq!(response.svids.len(), 1, "{response:?}");
        response.svids[0].svid.clone()
    }

    /// ValidateJWTSVID through the raw client.
    async fn validate(
        &self,
        audience: &str,
        token: &str,
    ) -> Result<ValidateJwtsvidResponse, tonic::Status> {
        validate_with(&mut self.client().await, audience, token).await
    }

    /// The current JWKS the agent serves for its trust domain (first message of
    /// FetchJWTBundles).
    async fn jwks(&self) -> Value {
        let mut stream = self
            .client()
            .await
            .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await
            .unwrap()
            .into_inner();
        let message = stream.message().await.unwrap().unwrap();
        let bytes = message
            .bundles
            .get("spiffe://example.org")
            .unwrap_or_else(|| panic!("no bundle for example.org: {:?}", message.bundles.keys()));
        serde_json::from_slice(bytes).unwrap()
    }

    async fn stop(self) {
        self.agent.stop().await.unwrap();
        drop(self.h);
    }
}

async fn validate_with(
    client: &mut SpiffeWorkloadApiClient<Channel>,
    audience: &str,
    token: &str,
) -> Result<ValidateJwtsvidResponse, tonic::Status> {
    client
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: audience.to_owned(),
            svid: token.to_owned(),
        }))
        .await
        .map(tonic::Response::into_inner)
}

/// The decoded (unverified) header and claims of a compact token.
fn decode(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a compact JWS");
    let part =
        |p: &str| -> Value { serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap() };
    (part(parts[0]), part(parts[1]))
}

/// A claims `Struct` as JSON.
fn struct_json(value: &prost_types::Struct) -> Value {
    fn one(value: &prost_types::Value) -> Value {
        use prost_types::value::Kind;
        match &value.kind {
            None | Some(Kind::NullValue(_)) => Value::Null,
            Some(Kind::BoolValue(b)) => json!(b),
            Some(Kind::NumberValue(n)) => json!(n),
            Some(Kind::StringValue(s)) => json!(s),
            Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(one).collect()),
            Some(Kind::StructValue(s)) => struct_json(s),
        }
    }
    Value::Object(
        value
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), one(v)))
            .collect(),
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// Forging tokens with the server's own key

/// Signs arbitrary compact tokens with the server's JWT key (read from the disk key
/// manager's `keys/jwt-<kid>.key`, PKCS#8 DER), so a test token differs from a good one only
/// in the defect under test.
struct Forger {
    kid: String,
    key: sig::EcdsaKeyPair,
    rng: aws_lc_rs::rand::SystemRandom,
}

/// The order n of P-256.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

impl Forger {
    fn from_server(h: &Harness) -> Self {
        // The disk key manager keeps the active JWT key as `keys/jwt-<kid>.key`
        // (PKCS#8 DER); the kid of the key that signs is the one without a sibling
        // prepared key, so take the newest file.
        let keys = h.path("server-data/keys");
        let mut found: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&keys)
            .unwrap()
            .filter_map(|e| {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                let kid = name.strip_prefix("jwt-")?.strip_suffix(".key")?.to_owned();
                Some((e.metadata().unwrap().modified().unwrap(), kid))
            })
            .collect();
        found.sort();
        let (_, kid) = found.pop().expect("a JWT key file");
        let der = std::fs::read(keys.join(format!("jwt-{kid}.key"))).unwrap();
        let key =
            sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &der).unwrap();
        Self {
            kid,
            key,
            rng: aws_lc_rs::rand::SystemRandom::new(),
        }
    }

    /// A good header.
    fn header(&self) -> Value {
        json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" })
    }

    /// Good claims for `WORKLOAD` and audience `a`.
    fn claims() -> Value {
        let now = now_secs();
        json!({ "sub": WORKLOAD, "aud": "a", "exp": now + 300, "iat": now })
    }

    /// ES256 signature (`r || s`) over `input`.
    fn sign(&self, input: &str) -> Vec<u8> {
        self.key
            .sign(&self.rng, input.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    /// `b64(header).b64(claims).b64(ES256 signature)`, from raw JSON texts.
    fn token_raw(&self, header: &str, claims: &str) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = URL_SAFE_NO_PAD.encode(self.sign(&input));
        format!("{input}.{signature}")
    }

    fn token(&self, header: &Value, claims: &Value) -> String {
        self.token_raw(&header.to_string(), &claims.to_string())
    }

    /// `input` (already encoded header and payload) with a signature of `signature`.
    fn with_signature(input: &str, signature: &[u8]) -> String {
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Encoded header and claims (the signing input) of a good token with `header`.
    fn input(header: &Value, claims: &Value) -> String {
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    /// The public key as a JWK.
    fn jwk(&self) -> Value {
        let point = self.key.public_key().as_ref();
        json!({
            "kty": "EC", "crv": "P-256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    /// The public key as SubjectPublicKeyInfo DER.
    fn spki(&self) -> Vec<u8> {
        use aws_lc_rs::encoding::AsDer as _;
        self.key.public_key().as_der().unwrap().as_ref().to_vec()
    }
}

/// Presents each `(label, audience, token)` to the agent and collects every one that
/// is not answered `InvalidArgument`.
async fn expect_all_rejected(setup: &Setup, cases: Vec<(String, &str, String)>) -> Vec<String> {
    let mut client = setup.client().await;
    let mut wrong = Vec::new();
    for (label, audience, token) in cases {
        match validate_with(&mut client, audience, &token).await {
            Err(status) if status.code() == Code::InvalidArgument => {}
            Err(status) => wrong.push(format!(
                "{label}: {:?} ({})",
                status.code(),
                status.message()
            )),
            Ok(response) => wrong.push(format!("{label}: ACCEPTED as {}", response.spiffe_id)),
        }
    }
    wrong
}

/// A setup with the forger, after checking that the forger's untouched token is
/// accepted (so every rejection below is due to its one defect).
async fn validator() -> (Setup, Forger) {
    let setup = Setup::start().await;
    let forger = Forger::from_server(&setup.h);
    let good = forger.token(&forger.header(), &Forger::claims());
    let response = setup
        .validate("a", &good)
        .await
        .expect("the forger's good token validates");
    assert_eq!(response.spiffe_id, WORKLOAD);
    (setup, forger)
}

fn case(label: &str, token: String) -> (String, &'static str, String) {
    (label.to_owned(), "a", token)
}

// ---------------------------------------------------------------------------------------
// 1. The `spiffe` crate end to end

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_workload_fetches_validates_and_verifies_a_jwt_svid() {
    let setup = Setup::start().await;
    let mut e = entry(WORKLOAD);
    e.hint = "api".into();
    setup.create(e).await;
    let socket = arg(setup.socket()).to_owned();

    // Fetch with the spiffe crate; the child verifies it offline against the JWT bundle
    // set it fetched from the agent (`JwtSvid::parse_and_validate`).
    let answer = run_workload(&["fetch-jwt", &socket, "a"], None)
        .await
        .remove(0);
    assert_eq!(answer["ok"], true, "{answer}");
    let svids = answer["svids"].as_array().unwrap();
    assert_eq!(svids.len(), 1, "{answer}");
    let svid = &svids[0];
    assert_eq!(svid["spiffe_id"], WORKLOAD, "{answer}");
    assert_eq!(svid["hint"], "api", "{answer}");
    assert_eq!(svid["audience"], json!(["a"]), "{answer}");
    assert_eq!(svid["verified"], true, "offline verification: {answer}");
    let token = svid["token"].as_str().unwrap().to_owned();
    let kid = svid["kid"].as_str().unwrap().to_owned();

    // The agent validates it for the spiffe crate ...
    let validated = run_workload(&["validate-jwt", &socket, "a", &token], None)
        .await
        .remove(0);
    assert_eq!(validated["ok"], true, "{validated}");
    assert_eq!(validated["spiffe_id"], WORKLOAD, "{validated}");
    // ... and not for another audience.
    let refused = run_workload(&["validate-jwt", &socket, "b", &token], None)
        .await
        .remove(0);
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["kind"], "invalid_argument", "{refused}");

    // The raw answer carries the SPIFFE ID and every claim.
    let response = setup.validate("a", &token).await.unwrap();
    assert_eq!(response.spiffe_id, WORKLOAD);
    let claims = struct_json(response.claims.as_ref().expect("claims"));
    let (header, sent) = decode(&token);
    assert_eq!(claims["sub"], WORKLOAD, "{claims}");
    assert_eq!(claims["aud"], "a", "{claims}");
    for name in ["exp", "iat"] {
        assert_eq!(
            claims[name].as_f64(),
            sent[name].as_f64(),
            "{name}: {claims}"
        );
    }
    assert_eq!(claims["jti"], sent["jti"], "{claims}");
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], kid.as_str());

    // The JWT bundle the spiffe crate sees holds the token's kid, and the SDK verifies
    // the token against the raw JWKS bytes too.
    let bundles = run_workload(&["jwt-bundles", &socket], None)
        .await
        .remove(0);
    assert_eq!(bundles["ok"], true, "{bundles}");
    let bundle = bundles["bundles"]
        .get("example.org")
        .or_else(|| bundles["bundles"].get("spiffe://example.org"))
        .unwrap_or_else(|| panic!("no example.org bundle: {bundles}"));
    assert_eq!(bundle["kids"], json!([kid]), "{bundles}");
    let jwks = setup.jwks().await;
    let td = tessera_plugin_sdk::TrustDomain::new("example.org").unwrap();
    let sdk_bundle = tessera_plugin_sdk::jwt::JwtBundle::from_spiffe_bundle_json(
        td,
        jwks.to_string().as_bytes(),
    )
    .unwrap();
    let checked =
        tessera_plugin_sdk::jwt::validate(&token, "a", &sdk_bundle, SystemTime::now()).unwrap();
    assert_eq!(checked.spiffe_id.as_str(), WORKLOAD);
    setup.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. Audience policy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_outside_the_allow_list_is_denied_and_nothing_is_signed() {
    let setup = Setup::start().await;
    let mut e = entry(WORKLOAD);
    e.jwt_audiences = vec!["a".into(), "b".into()];
    setup.create(e).await;
    let before = setup.jwt_signed().await;
    let status = setup.fetch(&["c"], "").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        setup.jwt_signed().await,
        before,
        "a refused audience minted a token"
    );
    // An allowed audience works and is counted.
    let token = setup.token(&["b"]).await;
    assert_eq!(decode(&token).1["aud"], "b");
    assert_eq!(setup.jwt_signed().await, before + 1);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_second_identity_does_not_block_the_others() {
    // A workload with an unrestricted identity gets a second identity restricted to
    // audience "only-this": asking for "b" without naming an identity must still give
    // the unrestricted identity's token (and mint nothing for the restricted one).
    let setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    let mut restricted = entry("spiffe://example.org/workload/restricted");
    restricted.jwt_audiences = vec!["only-this".into()];
    setup.create(restricted).await;
    // Both identities carry "only-this".
    assert_eq!(
        setup.fetch(&["only-this"], "").await.unwrap().svids.len(),
        2
    );
    let before = setup.jwt_signed().await;
    let response = setup.fetch(&["b"], "").await;
    let minted = setup.jwt_signed().await - before;
    let response = response.unwrap_or_else(|status| {
        panic!("FetchJWTSVID for \"b\" failed ({status:?}) after minting {minted} token(s)")
    });
    let ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    assert_eq!(ids, [WORKLOAD]);
    assert_eq!(minted, 1);
    // The spiffe crate's default fetch works too.
    let answer = run_workload(&["fetch-jwt", arg(setup.socket()), "b"], None)
        .await
        .remove(0);
    assert_eq!(answer["ok"], true, "{answer}");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_audience_tokens_need_the_entry_flag() {
    let setup = Setup::start().await;
    let single = setup.create(entry(WORKLOAD)).await;
    let before = setup.jwt_signed().await;
    let status = setup.fetch(&["a", "b"], "").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(setup.jwt_signed().await, before);
    // The same audience twice is one audience.
    let token = setup.token(&["a", "a"]).await;
    assert_eq!(decode(&token).1["aud"], "a");

    let mut multi = single.clone();
    multi.jwt_multi_audience = true;
    let updated = setup
        .h
        .admin()
        .await
        .update_entry(UpdateEntryRequest { entry: Some(multi) })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.revision > single.revision);
    setup.wait_entry(&updated).await;
    let token = setup.token(&["b", "a"]).await;
    let (_, claims) = decode(&token);
    assert!(claims["aud"].is_array(), "{claims}");
    let mut aud: Vec<&str> = claims["aud"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    aud.sort_unstable();
    assert_eq!(aud, ["a", "b"]);
    // Valid for either audience.
    for audience in ["a", "b"] {
        setup.validate(audience, &token).await.unwrap();
    }
    assert_eq!(
        setup.validate("c", &token).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_ttl_comes_from_the_entry_within_the_server_maximum() {
    let setup = Setup::start_with("max_jwt_svid_ttl = \"10m\"").await;
    setup.create(entry(WORKLOAD)).await;
    // An entry asking for more than max_jwt_svid_ttl is refused when created.
    let mut too_long = entry("spiffe://example.org/workload/too-long");
    too_long.parent_id = setup.agent_id.clone();
    too_long.jwt_svid_ttl_seconds = 7200;
    let status = setup
        .h
        .admin()
        .await
        .create_entry(CreateEntryRequest {
            entry: Some(too_long),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut long = entry("spiffe://example.org/workload/long");
    long.jwt_svid_ttl_seconds = 600;
    setup.create(long).await;
    let mut short = entry("spiffe://example.org/workload/short");
    short.jwt_svid_ttl_seconds = 90;
    setup.create(short).await;
    let response = setup.fetch(&["a"], "").await.unwrap();
    assert_eq!(response.svids.len(), 3);
    for svid in &response.svids {
        let (_, claims) = decode(&svid.svid);
        let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        let expected = match svid.spiffe_id.as_str() {
            WORKLOAD => 300, // default_jwt_svid_ttl
            "spiffe://example.org/workload/long" => 600,
            _ => 90,
        };
        assert_eq!(ttl, expected, "{}", svid.spiffe_id);
    }
    setup.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Request validation (§3.1 items 3, 4, 5, 6, 12)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_jwt_svid_request_validation() {
    let setup = Setup::start().await;
    // No entry for this caller yet: PermissionDenied, not an empty list.
    let status = setup.fetch(&["a"], "").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    setup.create(entry(WORKLOAD)).await;
    let mut other = entry("spiffe://example.org/workload/nobody");
    other.selectors[0].value = "uid:65534".into();
    setup.create(other).await;
    let before = setup.jwt_signed().await;

    // Item 3: empty audience list, and an empty audience string.
    for audiences in [&[][..], &[""][..], &["a", ""][..]] {
        let status = setup.fetch(audiences, "").await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{audiences:?}: {status:?}"
        );
    }
    // Item 4: malformed spiffe_id ...
    for bad in [
        "not-an-id",
        "spiffe://Example.org/workload/jwt",
        "spiffe://example.org/workload/../jwt",
        "spiffe://example.org/workload/jwt/",
        "spiffe://example.org",
        "spiffe://example.org/workload/%6Awt",
        "https://example.org/workload/jwt",
    ] {
        let status = setup.fetch(&["a"], bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
    }
    // ... and well-formed but not this caller's (another uid's entry, or none at all).
    for foreign in [
        "spiffe://example.org/workload/nobody",
        "spiffe://example.org/workload/none",
        "spiffe://other.org/workload/jwt",
    ] {
        let status = setup.fetch(&["a"], foreign).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{foreign}: {status:?}"
        );
    }
    assert_eq!(
        setup.jwt_signed().await,
        before,
        "a refused request minted a token"
    );
    // The caller's own ID is served.
    let response = setup.fetch(&["a"], WORKLOAD).await.unwrap();
    assert_eq!(response.svids.len(), 1);
    assert_eq!(response.svids[0].spiffe_id, WORKLOAD);

    // Item 6 through the spiffe crate: a uid without entry gets no identity.
    let answer = run_workload(&["fetch-jwt", arg(setup.socket()), "a"], Some(65533))
        .await
        .remove(0);
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["kind"], "no_identity", "{answer}");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_jwt_svid_needs_audience_and_token() {
    let setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    let token = setup.token(&["a"]).await;
    for (audience, svid) in [("", token.as_str()), ("a", ""), ("", "")] {
        let status = setup.validate(audience, svid).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "({audience:?}, {:?}): {status:?}",
            svid.len()
        );
    }
    setup.validate("a", &token).await.unwrap();
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_entries_with_one_hint_never_yield_two_svids_with_that_hint() {
    let setup = Setup::start().await;
    for (id, hint) in [
        ("spiffe://example.org/workload/db-1", "db"),
        ("spiffe://example.org/workload/db-2", "db"),
        ("spiffe://example.org/workload/web", "web"),
        ("spiffe://example.org/workload/plain", ""),
    ] {
        let mut e = entry(id);
        e.hint = hint.into();
        setup.create(e).await;
    }
    let unique = |hints: Vec<String>| {
        let named: Vec<&String> = hints.iter().filter(|h| !h.is_empty()).collect();
        let mut dedup = named.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(named.len(), dedup.len(), "duplicate hints: {hints:?}");
        assert!(
            hints.iter().any(|h| h == "db") && hints.iter().any(|h| h == "web"),
            "{hints:?}"
        );
    };
    let mut client = setup.client().await;
    let x509 = tokio::time::timeout(Duration::from_secs(10), async {
        client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        x509.svids.len(),
        3,
        "{:?}",
        x509.svids.iter().map(|s| &s.spiffe_id).collect::<Vec<_>>()
    );
    unique(x509.svids.iter().map(|s| s.hint.clone()).collect());
    let jwt = setup.fetch(&["a"], "").await.unwrap();
    assert_eq!(jwt.svids.len(), 3);
    unique(jwt.svids.iter().map(|s| s.hint.clone()).collect());
    // The same identities on both APIs.
    let ids = |v: Vec<String>| {
        let mut v = v;
        v.sort();
        v
    };
    assert_eq!(
        ids(x509.svids.iter().map(|s| s.spiffe_id.clone()).collect()),
        ids(jwt.svids.iter().map(|s| s.spiffe_id.clone()).collect())
    );
    // Through the spiffe crate too.
    let answer = run_workload(&["fetch-jwt", arg(setup.socket()), "a"], None)
        .await
        .remove(0);
    assert_eq!(answer["ok"], true, "{answer}");
    unique(
        answer["svids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["hint"].as_str().unwrap_or_default().to_owned())
            .collect(),
    );
    setup.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. Hostile tokens (§3.8 items 72-80) against the agent's ValidateJWTSVID

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejects_algorithms_outside_the_allow_list() {
    let (setup, f) = validator().await;
    let claims = Forger::claims();
    let with_alg = |alg: Value| {
        let mut header = f.header();
        header["alg"] = alg;
        header
    };
    let mut cases = Vec::new();
    // alg none: with no signature, and with a valid ES256 signature.
    let none = Forger::input(&with_alg(json!("none")), &claims);
    cases.push(case("alg none, empty signature", format!("{none}.")));
    cases.push(case(
        "alg none, ES256 signature",
        Forger::with_signature(&none, &f.sign(&none)),
    ));
    let mut no_typ = with_alg(json!("none"));
    no_typ.as_object_mut().unwrap().remove("kid");
    let bare = Forger::input(&no_typ, &claims);
    cases.push(case("alg none without kid", format!("{bare}.")));
    // HS256 keyed with the public key (SPKI DER, PEM, JWK JSON): the classic confusion.
    let hs = Forger::input(&with_alg(json!("HS256")), &claims);
    let spki = f.spki();
    let pem_text = pem::encode(&pem::Pem::new("PUBLIC KEY", spki.clone()));
    for (label, secret) in [
        ("HS256 keyed with the SPKI DER", spki.clone()),
        ("HS256 keyed with the PEM", pem_text.into_bytes()),
        ("HS256 keyed with the JWK", f.jwk().to_string().into_bytes()),
    ] {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
        let tag = aws_lc_rs::hmac::sign(&key, hs.as_bytes());
        cases.push(case(label, Forger::with_signature(&hs, tag.as_ref())));
    }
    // EdDSA with a real Ed25519 signature.
    let ed = Forger::input(&with_alg(json!("EdDSA")), &claims);
    let ed_key = sig::Ed25519KeyPair::generate().unwrap();
    cases.push(case(
        "EdDSA",
        Forger::with_signature(&ed, ed_key.sign(ed.as_bytes()).as_ref()),
    ));
    // Unknown, miscased, empty, non-string and missing alg, each with a valid ES256
    // signature; and allowed algorithms that do not fit the key (ES384, RS256, PS256).
    for alg in [
        json!("ES257"),
        json!("es256"),
        json!("ES256K"),
        json!(""),
        json!(1),
        json!(null),
        json!(["ES256"]),
        json!("ES384"),
        json!("RS256"),
        json!("PS256"),
    ] {
        let input = Forger::input(&with_alg(alg.clone()), &claims);
        cases.push(case(
            &format!("alg {alg}"),
            Forger::with_signature(&input, &f.sign(&input)),
        ));
    }
    let mut missing = f.header();
    missing.as_object_mut().unwrap().remove("alg");
    cases.push(case("no alg", f.token(&missing, &claims)));
    let wrong = expect_all_rejected(&setup, cases).await;
    assert!(
        wrong.is_empty(),
        "not rejected with InvalidArgument:\n{}",
        wrong.join("\n")
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejects_missing_unknown_and_foreign_kids() {
    let (setup, f) = validator().await;
    let claims = Forger::claims();
    let mut cases = Vec::new();
    let mut header = f.header();
    header.as_object_mut().unwrap().remove("kid");
    cases.push(case("no kid", f.token(&header, &claims)));
    for kid in [
        json!(""),
        json!("0123456789abcdef0123456789abcdef"),
        json!(1),
        json!(null),
        json!([f.kid]),
    ] {
        let mut header = f.header();
        header["kid"] = kid.clone();
        cases.push(case(&format!("kid {kid}"), f.token(&header, &claims)));
    }
    // The kid of example.org's key with a subject in another trust domain.
    for sub in [
        "spiffe://other.org/workload/jwt",
        "spiffe://example.org.evil/workload/jwt",
    ] {
        let mut claims = Forger::claims();
        claims["sub"] = json!(sub);
        cases.push(case(
            &format!("kid of example.org, sub {sub}"),
            f.token(&f.header(), &claims),
        ));
    }
    // Subjects that are no workload ID.
    for sub in [
        json!("spiffe://example.org"),
        json!("spiffe://example.org/a/../b"),
        json!(""),
        json!(7),
    ] {
        let mut claims = Forger::claims();
        claims["sub"] = sub.clone();
        cases.push(case(&format!("sub {sub}"), f.token(&f.header(), &claims)));
    }
    let mut no_sub = Forger::claims();
    no_sub.as_object_mut().unwrap().remove("sub");
    cases.push(case("no sub", f.token(&f.header(), &no_sub)));
    let wrong = expect_all_rejected(&setup, cases).await;
    assert!(
        wrong.is_empty(),
        "not rejected with InvalidArgument:\n{}",
        wrong.join("\n")
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejects_missing_expired_and_future_times() {
    let (setup, f) = validator().await;
    let now = now_secs();
    let with = |name: &str, value: Value| {
        let mut claims = Forger::claims();
        claims[name] = value;
        claims
    };
    let mut no_exp = Forger::claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut cases = vec![case("no exp", f.token(&f.header(), &no_exp))];
    for (label, claims) in [
        ("expired 2 minutes ago", with("exp", json!(now - 120))),
        ("expired an hour ago", with("exp", json!(now - 3600))),
        ("exp 0", with("exp", json!(0))),
        ("exp negative", with("exp", json!(-1))),
        (
            "exp as a string",
            with("exp", json!((now + 300).to_string())),
        ),
        ("exp null", with("exp", json!(null))),
        ("nbf 2 minutes ahead", with("nbf", json!(now + 120))),
        ("iat 2 minutes ahead", with("iat", json!(now + 120))),
        ("iat a day ahead", with("iat", json!(now + 86_400))),
        ("nbf as a string", with("nbf", json!(now.to_string()))),
    ] {
        cases.push(case(label, f.token(&f.header(), &claims)));
    }
    let wrong = expect_all_rejected(&setup, cases).await;
    assert!(
        wrong.is_empty(),
        "not rejected with InvalidArgument:\n{}",
        wrong.join("\n")
    );
    // A past nbf and iat are fine.
    let mut ok = with("nbf", json!(now - 60));
    ok["iat"] = json!(now - 60);
    setup
        .validate("a", &f.token(&f.header(), &ok))
        .await
        .unwrap();
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_requires_the_audience_in_either_encoding() {
    let (setup, f) = validator().await;
    let with_aud = |aud: Value| {
        let mut claims = Forger::claims();
        claims["aud"] = aud;
        claims
    };
    let mut no_aud = Forger::claims();
    no_aud.as_object_mut().unwrap().remove("aud");
    let mut cases = vec![case("no aud", f.token(&f.header(), &no_aud))];
    for aud in [
        json!("b"),
        json!(["b"]),
        json!(["b", "c"]),
        json!([]),
        json!(""),
        json!("A"),
        json!("a "),
        json!(["a,b"]),
        json!(null),
        json!(1),
        json!([1]),
    ] {
        cases.push(case(
            &format!("aud {aud}"),
            f.token(&f.header(), &with_aud(aud.clone())),
        ));
    }
    let wrong = expect_all_rejected(&setup, cases).await;
    assert!(
        wrong.is_empty(),
        "not rejected with InvalidArgument:\n{}",
        wrong.join("\n")
    );
    // Both encodings of a matching audience are accepted.
    for aud in [json!("a"), json!(["a"]), json!(["x", "a"])] {
        let response = setup
            .validate("a", &f.token(&f.header(), &with_aud(aud.clone())))
            .await
            .unwrap_or_else(|status| panic!("aud {aud} refused: {status:?}"));
        assert_eq!(struct_json(response.claims.as_ref().unwrap())["aud"], aud);
    }
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejects_forbidden_headers_and_other_serializations() {
    let (setup, f) = validator().await;
    let claims = Forger::claims();
    let with = |name: &str, value: Value| {
        let mut header = f.header();
        header[name] = value;
        header
    };
    let mut cases = Vec::new();
    for typ in [
        json!("JWS"),
        json!("at+jwt"),
        json!("JWE"),
        json!("application/json"),
        json!(""),
        json!(1),
    ] {
        cases.push(case(
            &format!("typ {typ}"),
            f.token(&with("typ", typ.clone()), &claims),
        ));
    }
    let x5c = STANDARD.encode(setup.h.server.as_ref().unwrap().ca_certificate_der());
    for (name, value) in [
        ("crit", json!(["exp"])),
        ("crit", json!([])),
        ("jku", json!("https://attacker.example/jwks.json")),
        ("jwk", f.jwk()),
        ("x5u", json!("https://attacker.example/cert.pem")),
        ("x5c", json!([x5c])),
    ] {
        cases.push(case(
            &format!("header {name}: {value}"),
            f.token(&with(name, value.clone()), &claims),
        ));
    }
    // The attacker's own key embedded as `jwk`, and used to sign.
    let attacker = sig::EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let point = attacker.public_key().as_ref().to_vec();
    let attacker_jwk = json!({
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    let input = Forger::input(&with("jwk", attacker_jwk), &claims);
    let signature = attacker
        .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
        .unwrap();
    cases.push(case(
        "jwk of the attacker's signing key",
        Forger::with_signature(&input, signature.as_ref()),
    ));

    // JWS JSON serializations (general and flattened) of a good token.
    let good = f.token(&f.header(), &claims);
    let parts: Vec<&str> = good.split('.').collect();
    let flattened = json!({ "protected": parts[0], "payload": parts[1], "signature": parts[2] });
    cases.push(case(
        "JWS flattened JSON serialization",
        flattened.to_string(),
    ));
    let general = json!({ "payload": parts[1], "signatures": [{ "protected": parts[0], "signature": parts[2] }] });
    cases.push(case("JWS general JSON serialization", general.to_string()));
    // Two header objects, and other part counts.
    cases.push(case(
        "two headers (4 parts)",
        format!("{}.{}.{}.{}", parts[0], parts[0], parts[1], parts[2]),
    ));
    cases.push(case(
        "5 parts (JWE shape)",
        format!("{good}.{}.{}", parts[0], parts[1]),
    ));
    cases.push(case("trailing dot (4 parts)", format!("{good}.")));
    cases.push(case("2 parts", format!("{}.{}", parts[0], parts[1])));
    cases.push(case(
        "header and payload swapped",
        format!("{}.{}.{}", parts[1], parts[0], parts[2]),
    ));
    let wrong = expect_all_rejected(&setup, cases).await;
    assert!(
        wrong.is_empty(),
        "not rejected with InvalidArgument:\n{}",
        wrong.join("\n")
    );
    // typ JOSE and no typ at all are fine.
    setup
        .validate("a", &f.token(&with("typ", json!("JOSE")), &claims))
        .await
        .unwrap();
    let mut no_typ = f.header();
    no_typ.as_object_mut().unwrap().remove("typ");
    setup
        .validate("a", &f.token(&no_typ, &claims))
        .await
        .unwrap();
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejects_malformed_ecdsa_signatures() {
    let (setup, f) = validator().await;
    let input = Forger::input(&f.header(), &Forger::claims());
    let good = f.sign(&input);
    let (r, s) = good.split_at(32);
    let cat = |a: &[u8], b: &[u8]| [a, b].concat();
    let der = {
        let key = sig::EcdsaKeyPair::from_pkcs8(
            &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
            f.key.to_pkcs8v1().unwrap().as_ref(),
        )
        .unwrap();
        key.sign(&f.rng, input.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    };
    let cases = [
        ("r = 0, s = 0", vec![0u8; 64]),
        ("r = 0", cat(&[0u8; 32], s)),
        ("s = 0", cat(r, &[0u8; 32])),
        ("r = n, s = n", cat(&P256_N, &P256_N)),
        ("s = n", cat(r, &P256_N)),
        ("r = n", cat(&P256_N, s)),
        ("s = 2^256 - 1", cat(r, &[0xff; 32])),
        ("r = 2^256 - 1", cat(&[0xff; 32], s)),
        ("63 bytes (truncated)", good[..63].to_vec()),
        ("65 bytes (one extra)", cat(&good, &[0])),
        ("65 bytes (leading zero)", cat(&[0], &good)),
        ("96 bytes (ES384 size)", cat(&good, &[0u8; 32])),
        ("32 bytes (r only)", r.to_vec()),
        ("ASN.1 DER signature", der),
        ("empty", Vec::new()),
        ("flipped bit", {
            let mut bad = good.clone();
            bad[10] ^= 1;
            bad
        }),
    ]
    .into_iter()
    .map(|(label, signature)| case(label, Forger::with_signature(&input, &signature)))
    .collect();
    let wrong = expect_all_rejected(&setup, cases).await;
    assert!(
        wrong.is_empty(),
        "not rejected with InvalidArgument:\n{}",
        wrong.join("\n")
    );
    // The untouched signature passes.
    setup
        .validate("a", &Forger::with_signature(&input, &good))
        .await
        .unwrap();
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejects_duplicate_keys_huge_deep_and_badly_encoded_tokens() {
    let (setup, f) = validator().await;
    let now = now_secs();
    let kid = f.kid.clone();
    let header = format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT"}}"#);
    let claims = |extra: &str| {
        format!(
            r#"{{"sub":"{WORKLOAD}","aud":"a","exp":{},"iat":{now}{extra}}}"#,
            now + 300
        )
    };
    // The raw-text forger produces a good token from these texts.
    setup
        .validate("a", &f.token_raw(&header, &claims("")))
        .await
        .unwrap();

    let mut cases = vec![
        // Duplicate member names, each properly signed.
        case(
            "duplicate alg",
            f.token_raw(
                &format!(r#"{{"alg":"ES256","alg":"ES256","kid":"{kid}","typ":"JWT"}}"#),
                &claims(""),
            ),
        ),
        case(
            "duplicate kid",
            f.token_raw(
                &format!(r#"{{"alg":"ES256","kid":"{kid}","kid":"{kid}","typ":"JWT"}}"#),
                &claims(""),
            ),
        ),
        case(
            "duplicate alg, none last",
            f.token_raw(
                &format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT","alg":"none"}}"#),
                &claims(""),
            ),
        ),
        case(
            "duplicate sub",
            f.token_raw(&header, &claims(r#","sub":"spiffe://example.org/admin""#)),
        ),
        case(
            "duplicate sub, same value",
            f.token_raw(&header, &claims(&format!(r#","sub":"{WORKLOAD}""#))),
        ),
        case(
            "duplicate aud",
            f.token_raw(&header, &claims(r#","aud":"b""#)),
        ),
        case(
            "duplicate exp",
            f.token_raw(&header, &claims(&format!(r#","exp":{}"#, now + 86_400))),
        ),
        // Not one JSON object.
        case(
            "claims are an array",
            f.token_raw(&header, &format!("[{}]", claims(""))),
        ),
        case(
            "claims with trailing data",
            f.token_raw(&header, &format!("{} {{}}", claims(""))),
        ),
        case("header is a string", f.token_raw(r#""ES256""#, &claims(""))),
    ];
    // Deep nesting in the claims (a 200-level array, a 64-level object) and the header.
    let deep_array = format!(r#","x":{}{}"#, "[".repeat(200), "]".repeat(200));
    cases.push(case(
        "claims nested 200 deep",
        f.token_raw(&header, &claims(&deep_array)),
    ));
    let deep_object = format!(r#","x":{}1{}"#, r#"{"a":"#.repeat(64), "}".repeat(64));
    cases.push(case(
        "claims nested 64 objects deep",
        f.token_raw(&header, &claims(&deep_object)),
    ));
    let deep_header = format!(
        r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT","x":{}{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    cases.push(case(
        "header nested 100 deep",
        f.token_raw(&deep_header, &claims("")),
    ));
    // A token just over 8 KiB of claims, and a 1 MB one, both properly signed.
    let padding = |n: usize| format!(r#","pad":"{}""#, "x".repeat(n));
    cases.push(case(
        "9 KB token",
        f.token_raw(&header, &claims(&padding(9 * 1024))),
    ));
    // Under the agent's 64 KiB request limit: still the validator's refusal.
    cases.push(case(
        "40 KB token",
        f.token_raw(&header, &claims(&padding(40 * 1024))),
    ));

    // Base64url defects, each signed over the text as presented.
    let h64 = URL_SAFE_NO_PAD.encode(&header);
    let signed = |h: &str, p: &str| {
        let input = format!("{h}.{p}");
        Forger::with_signature(&input, &f.sign(&input))
    };
    // Padding: JSON texts whose encoding needs it (trailing spaces are valid JSON).
    let needs_padding = |text: String| {
        let mut text = text;
        while text.len().is_multiple_of(3) {
            text.push(' ');
        }
        text
    };
    let padded = URL_SAFE.encode(needs_padding(claims("")));
    assert!(padded.ends_with('='));
    cases.push(case("payload with = padding", signed(&h64, &padded)));
    let header_padded = URL_SAFE.encode(needs_padding(header.clone()));
    assert!(header_padded.ends_with('='));
    cases.push(case(
        "header with = padding",
        signed(&header_padded, &URL_SAFE_NO_PAD.encode(claims(""))),
    ));
    // Standard alphabet in the signature (re-sign until it has `+` or `/`).
    let input = format!("{h64}.{}", URL_SAFE_NO_PAD.encode(claims("")));
    let std_sig = loop {
        let encoded = STANDARD.encode(f.sign(&input));
        if encoded.contains('+') || encoded.contains('/') {
            break encoded.trim_end_matches('=').to_owned();
        }
    };
    cases.push(case(
        "signature in the standard alphabet",
        format!("{input}.{std_sig}"),
    ));
    // Non-canonical trailing bits: same bytes, different last character.
    let sig64 = URL_SAFE_NO_PAD.encode(f.sign(&input));
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = sig64.as_bytes()[sig64.len() - 1];
    let index = alphabet.iter().position(|&c| c == last).unwrap();
    let tweaked = format!(
        "{}{}",
        &sig64[..sig64.len() - 1],
        char::from(alphabet[index | 1])
    );
    assert_eq!(URL_SAFE_NO_PAD.decode(&sig64).unwrap().len(), 64);
    cases.push(case(
        "signature with non-zero trailing bits",
        format!("{input}.{tweaked}"),
    ));
    cases.push(case("signature with padding", format!("{input}.{sig64}==")));
    cases.push(case("space inside the payload", {
        let p = URL_SAFE_NO_PAD.encode(claims(""));
        signed(&h64, &format!("{} {}", &p[..10], &p[10..]))
    }));
    cases.push(case(
        "newline at the end",
        format!("{}\n", f.token_raw(&header, &claims(""))),
    ));
    cases.push(case(
        "invalid character in the header",
        signed(&format!("{h64}*"), &URL_SAFE_NO_PAD.encode(claims(""))),
    ));
    cases.push(case(
        "impossible length (4n+1) payload",
        signed(
            &h64,
            &format!(
                "{}A",
                URL_SAFE_NO_PAD.encode(claims("")).trim_end_matches('=')
            ),
        ),
    ));
    cases.push(case(
        "empty header",
        signed("", &URL_SAFE_NO_PAD.encode(claims(""))),
    ));
    cases.push(case("empty payload", signed(&h64, "")));
    let wrong = expect_all_rejected(&setup, cases).await;

    // 1 MB: the gRPC message is then about 1 MB; it must be refused, cheaply.
    let huge = f.token_raw(&header, &claims(&padding(1024 * 1024)));
    assert!(huge.len() > 1_000_000);
    let started = Instant::now();
    let status = setup
        .validate("a", &huge)
        .await
        .expect_err("1 MB token accepted");
    let elapsed = started.elapsed();
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
        ),
        "1 MB token: {status:?}"
    );
    // The agent's request size limit (64 KiB) refuses it before any handler runs, as
    // ResourceExhausted (SECURITY.md §3.1 item 9); smaller oversized tokens reach the
    // validator (the 9 KB and 40 KB cases above).
    eprintln!(
        "1 MB token refused with {:?}: {}",
        status.code(),
        status.message()
    );
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "1 MB request not refused by the transport limit: {status:?}"
    );
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert!(
        wrong.is_empty(),
        "not rejected with InvalidArgument:\n{}",
        wrong.join("\n")
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_without_jwt_svid_use_or_kid_are_not_used() {
    // §3.8 item 79, with the SDK's bundle parser the agent and CLI use, on the JWKS the
    // agent serves: the same key under another `use`, without `use`, or without `kid`
    // does not verify anything.
    let (setup, f) = validator().await;
    let token = f.token(&f.header(), &Forger::claims());
    // FetchJWTBundles answers callers with an identity only.
    setup.create(entry(WORKLOAD)).await;
    let jwks = setup.jwks().await;
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{jwks}");
    assert_eq!(keys[0]["use"], "jwt-svid", "{jwks}");
    assert_eq!(keys[0]["kid"], f.kid.as_str(), "{jwks}");
    let td = || tessera_plugin_sdk::TrustDomain::new("example.org").unwrap();
    let check = |doc: &Value| {
        let bundle = tessera_plugin_sdk::jwt::JwtBundle::from_spiffe_bundle_json(
            td(),
            doc.to_string().as_bytes(),
        );
        bundle.and_then(|b| tessera_plugin_sdk::jwt::validate(&token, "a", &b, SystemTime::now()))
    };
    check(&jwks).expect("the served JWKS verifies the token");
    let variant = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut doc = jwks.clone();
        edit(doc["keys"][0].as_object_mut().unwrap());
        doc
    };
    for (label, doc) in [
        (
            "use x509-svid",
            variant(&|k| {
                k.insert("use".into(), json!("x509-svid"));
            }),
        ),
        (
            "use sig",
            variant(&|k| {
                k.insert("use".into(), json!("sig"));
            }),
        ),
        (
            "no use",
            variant(&|k| {
                k.remove("use");
            }),
        ),
        (
            "no kid",
            variant(&|k| {
                k.remove("kid");
            }),
        ),
        (
            "empty kid",
            variant(&|k| {
                k.insert("kid".into(), json!(""));
            }),
        ),
    ] {
        assert!(check(&doc).is_err(), "{label}: the key was used");
    }
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_one_audience_is_refused_for_another() {
    // §3.8 item 80 with a real token from the agent.
    let setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    let token = setup.token(&["service-a"]).await;
    let status = setup.validate("service-b", &token).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Same-audience replay within the TTL is accepted (JWT-SVID spec §7.1).
    for _ in 0..2 {
        assert_eq!(
            setup.validate("service-a", &token).await.unwrap().spiffe_id,
            WORKLOAD
        );
    }
    setup.stop().await;
}

// ---------------------------------------------------------------------------------------
// 5. Key rotation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_key_rotation_reaches_an_open_bundle_stream() {
    let setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    let old_token = setup.token(&["a"]).await;
    let old_kid = decode(&old_token).0["kid"].as_str().unwrap().to_owned();

    // The spiffe crate's JWT bundle stream, open before the rotation.
    let mut child = tokio::process::Command::new(workload_bin())
        .args(["jwt-bundles", arg(setup.socket()), "5"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a bundle update")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap()
    };
    let kids = |update: &Value| -> Vec<String> {
        assert_eq!(update["ok"], true, "{update}");
        let bundles = update["bundles"].as_object().unwrap();
        assert_eq!(bundles.len(), 1, "{update}");
        bundles.values().next().unwrap()["kids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    let first = next().await;
    assert_eq!(kids(&first), std::slice::from_ref(&old_kid), "{first}");

    let started = Instant::now();
    let new_kid = setup
        .h
        .admin()
        .await
        .rotate_jwt_authority(RotateJwtAuthorityRequest {})
        .await
        .unwrap()
        .into_inner()
        .kid;
    assert_ne!(new_kid, old_kid);
    let deadline = started + Duration::from_secs(2);
    let update = loop {
        let update = next().await;
        if kids(&update).contains(&new_kid) {
            break update;
        }
        assert!(
            Instant::now() < deadline,
            "the new kid did not arrive within 2 s: {update}"
        );
    };
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let mut expected = vec![old_kid.clone(), new_kid.clone()];
    expected.sort();
    assert_eq!(
        kids(&update),
        expected,
        "old and new key both published: {update}"
    );

    // The token signed before the rotation still validates; a new token (another
    // audience, so not from the cache) carries the new kid and validates too.
    setup
        .validate("a", &old_token)
        .await
        .expect("pre-rotation token");
    let new_token = setup.token(&["b"]).await;
    assert_eq!(decode(&new_token).0["kid"], new_kid.as_str());
    setup
        .validate("b", &new_token)
        .await
        .expect("post-rotation token");
    // The key file holds the new key.
    assert_eq!(Forger::from_server(&setup.h).kid, new_kid);
    drop(child);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_minted_right_after_a_rotation_validates_at_once() {
    // A workload that fetches a token after a rotation and has it validated at once (or
    // verifies it against the JWT bundle it just fetched) must not see an unknown kid.
    let setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    // Each rotation publishes the next key and waits a second before signing with it;
    // three rotations show the ordering without a minute of test time.
    let mut failures = Vec::new();
    for i in 0..3 {
        setup
            .h
            .admin()
            .await
            .rotate_jwt_authority(RotateJwtAuthorityRequest {})
            .await
            .unwrap();
        let audience = format!("aud-{i}");
        let token = setup.token(&[&audience]).await;
        if let Err(status) = setup.validate(&audience, &token).await {
            failures.push(format!(
                "rotation {i}: {:?} {}",
                status.code(),
                status.message()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 3 fresh tokens did not validate:\n{}",
        failures.len(),
        failures.join("\n")
    );
    setup.stop().await;
}

/// The JWT kids of the server's bundle (admin GetBundle).
async fn published_kids(h: &Harness) -> Vec<String> {
    let bundle = h
        .admin()
        .await
        .get_bundle(tessera_proto::admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut kids: Vec<String> = bundle.jwt_authorities.into_iter().map(|a| a.kid).collect();
    kids.sort();
    kids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_jwt_key_stays_published_across_a_server_restart() {
    let mut setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    let old_token = setup.token(&["a"]).await;
    let old_kid = decode(&old_token).0["kid"].as_str().unwrap().to_owned();
    let new_kid = setup
        .h
        .admin()
        .await
        .rotate_jwt_authority(RotateJwtAuthorityRequest {})
        .await
        .unwrap()
        .into_inner()
        .kid;
    let mut both = vec![old_kid.clone(), new_kid.clone()];
    both.sort();
    assert_eq!(published_kids(&setup.h).await, both);
    setup.h.stop_server().await;
    setup.h.start_server().await;
    assert_eq!(published_kids(&setup.h).await, both, "after restart");
    // The agent reconnects and still validates the old token; new tokens use the new key.
    let new_token = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(response) = setup.fetch(&["b"], "").await {
                break response.svids[0].svid.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the agent serves again after the server restart");
    assert_eq!(decode(&new_token).0["kid"], new_kid.as_str());
    setup
        .validate("a", &old_token)
        .await
        .expect("token of the retired key");
    setup
        .validate("b", &new_token)
        .await
        .expect("token of the new key");
    setup.stop().await;
}

// ---------------------------------------------------------------------------------------
// 6. The agent's token cache

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_fetches_reuse_the_cached_token() {
    let setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    let before = setup.jwt_signed().await;
    let first = setup.token(&["a"]).await;
    let second = setup.token(&["a"]).await;
    assert_eq!(
        first, second,
        "the second fetch was not served from the cache"
    );
    assert_eq!(setup.jwt_signed().await, before + 1);
    // Concurrent callers share one signing round trip.
    let tokens = futures::future::join_all((0..8).map(|_| setup.token(&["c"]))).await;
    assert!(
        tokens.windows(2).all(|w| w[0] == w[1]),
        "concurrent fetches got different tokens"
    );
    assert_eq!(setup.jwt_signed().await, before + 2);
    // Another audience is another token.
    let other = setup.token(&["b"]).await;
    assert_ne!(other, first);
    assert_eq!(setup.jwt_signed().await, before + 3);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_token_is_replaced_after_half_its_life() {
    // max_jwt_svid_ttl 2s: the token is reused for 1 s, then a new one is minted.
    let setup = Setup::start_with("default_jwt_svid_ttl = \"2s\"\nmax_jwt_svid_ttl = \"2s\"").await;
    setup.create(entry(WORKLOAD)).await;
    let before = setup.jwt_signed().await;
    let first = setup.token(&["a"]).await;
    // iat/exp are whole seconds: wait past the half-life measured from iat.
    let (_, claims) = decode(&first);
    let half = UNIX_EPOCH + Duration::from_secs(claims["iat"].as_u64().unwrap() + 1);
    let wait =
        half.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(50);
    tokio::time::sleep(wait).await;
    let second = setup.token(&["a"]).await;
    assert_ne!(first, second, "a token past half its life was reused");
    assert_eq!(setup.jwt_signed().await, before + 2);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_changes_are_not_bypassed_by_the_token_cache() {
    let setup = Setup::start().await;
    let created = setup.create(entry(WORKLOAD)).await;
    let token = setup.token(&["a"]).await;
    // Narrow the allow-list to "b": the cached token for "a" must not be served.
    let mut narrowed = created.clone();
    narrowed.jwt_audiences = vec!["b".into()];
    let updated = setup
        .h
        .admin()
        .await
        .update_entry(UpdateEntryRequest {
            entry: Some(narrowed),
        })
        .await
        .unwrap()
        .into_inner();
    setup.wait_entry(&updated).await;
    let status = setup.fetch(&["a"], "").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_ne!(setup.token(&["b"]).await, token);
    // Deleted: nothing is served any more, cached or not.
    setup
        .h
        .admin()
        .await
        .delete_entry(tessera_proto::admin::DeleteEntryRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap();
    let agent = &setup.agent;
    wait_until(
        "deletion reached the agent",
        Duration::from_secs(10),
        || !agent.snapshot().entries.contains_key(&created.id),
    )
    .await;
    let status = setup.fetch(&["b"], "").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audiences_are_refused_before_anything_is_signed() {
    let setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    let before = setup.jwt_signed().await;
    let long = "x".repeat(257);
    let many: Vec<String> = (0..33).map(|i| format!("aud-{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut multi = entry("spiffe://example.org/workload/multi");
    multi.jwt_multi_audience = true;
    setup.create(multi).await;
    for (label, audiences) in [
        ("control character", vec!["a\nb"]),
        ("NUL", vec!["a\0"]),
        ("257 bytes", vec![long.as_str()]),
        ("33 audiences", many),
    ] {
        let status = setup
            .fetch(&audiences, "spiffe://example.org/workload/multi")
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{label}: {status:?}");
    }
    assert_eq!(
        setup.jwt_signed().await,
        before,
        "a refused request minted a token"
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_refuses_jwt_svids_for_entries_of_other_agents() {
    use crate::support::{attested_agent, node_client};
    use tessera_proto::node::NewJwtsvidRequest;
    let setup = Setup::start().await;
    let served = setup.create(entry(WORKLOAD)).await;
    let (intruder, _) = attested_agent(&setup.h, None).await;
    let mut client = node_client(&setup.h, Some(&intruder));
    let before = setup.jwt_signed().await;
    for entry_id in [served.id.as_str(), "0123456789abcdef0123456789abcdef"] {
        let status = client
            .new_jwtsvid(NewJwtsvidRequest {
                entry_id: entry_id.to_owned(),
                audiences: vec!["a".into()],
                template_values: Default::default(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{entry_id}: {status:?}");
    }
    assert_eq!(setup.jwt_signed().await, before);
    setup.stop().await;
}

// ---------------------------------------------------------------------------------------
// 7. CLI

/// Runs `tessera-server ARGS --socket <admin socket>`.
async fn admin_cli(h: &Harness, args: &[&str]) -> CliOutput {
    let socket = h.admin_socket();
    let mut all = args.to_vec();
    all.extend(["--socket", arg(&socket)]);
    run_product(SERVER, &all).await
}

fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_entry_jwt_fields_create_show_update() {
    let setup = Setup::start().await;
    let uid = format!("unix:uid:{}", my_uid());
    let out = admin_cli(
        &setup.h,
        &[
            "entry",
            "create",
            "--parent-id",
            &setup.agent_id,
            "--spiffe-id",
            WORKLOAD,
            "--selector",
            &uid,
            "--jwt-ttl",
            "2m",
            "--jwt-audience",
            "a",
            "--jwt-audience",
            "b",
        ],
    )
    .await;
    out.expect_code(0);
    let id = out.stdout.trim_end().to_owned();
    assert!(is_lower_hex(&id, 32), "{id:?}");
    let shown = admin_cli(&setup.h, &["entry", "show", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(shown["jwt_svid_ttl_seconds"], 120, "{shown}");
    assert_eq!(shown["jwt_audiences"], json!(["a", "b"]), "{shown}");
    assert_eq!(shown["jwt_multi_audience"], false, "{shown}");
    let text = admin_cli(&setup.h, &["entry", "show", &id]).await;
    text.expect_code(0);
    assert!(text.stdout.contains("2m"), "{}", text.stdout);

    let updated = admin_cli(
        &setup.h,
        &[
            "entry",
            "update",
            &id,
            "--jwt-multi-audience",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(updated["jwt_multi_audience"], true, "{updated}");
    assert!(
        updated["revision"].as_u64().unwrap() > shown["revision"].as_u64().unwrap(),
        "{updated}"
    );
    // Everything else is kept.
    for field in [
        "spiffe_id",
        "parent_id",
        "selectors",
        "jwt_svid_ttl_seconds",
        "jwt_audiences",
        "created_revision",
    ] {
        assert_eq!(updated[field], shown[field], "{field}");
    }
    let shown_again = admin_cli(&setup.h, &["entry", "show", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(shown_again, updated);
    let off = admin_cli(
        &setup.h,
        &[
            "entry",
            "update",
            &id,
            "--jwt-multi-audience=false",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(off["jwt_multi_audience"], false, "{off}");

    // Unknown id: a failure (1), NotFound.
    let out = admin_cli(
        &setup.h,
        &[
            "entry",
            "update",
            "0123456789abcdef0123456789abcdef",
            "--jwt-multi-audience",
        ],
    )
    .await;
    out.expect_code(1);
    assert!(out.one_stderr_line().contains("NotFound"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bundle_spiffe_format_and_jwt_key_rotation() {
    let h = Harness::start().await;
    let ca = h.server.as_ref().unwrap().ca_certificate_der();
    let doc = |out: CliOutput| -> (Vec<Value>, Vec<Value>) {
        let doc = out.json();
        let keys = doc["keys"]
            .as_array()
            .unwrap_or_else(|| panic!("no keys: {doc}"))
            .clone();
        let (x509, jwt): (Vec<Value>, Vec<Value>) =
            keys.into_iter().partition(|k| k["use"] == "x509-svid");
        assert!(jwt.iter().all(|k| k["use"] == "jwt-svid"), "{doc}");
        (x509, jwt)
    };
    let (x509, jwt) = doc(admin_cli(&h, &["bundle", "show", "--format", "spiffe"]).await);
    assert_eq!(x509.len(), 1, "{x509:?}");
    let x5c = x509[0]["x5c"].as_array().unwrap();
    assert_eq!(x5c.len(), 1);
    assert_eq!(STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(), ca);
    assert_eq!(jwt.len(), 1, "{jwt:?}");
    let old_kid = jwt[0]["kid"].as_str().unwrap().to_owned();
    assert_eq!(old_kid, Forger::from_server(&h).kid);

    let out = admin_cli(&h, &["authority", "rotate-jwt-key"]).await;
    out.expect_code(0);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    let new_kid = out.stdout.trim_end().to_owned();
    assert!(is_lower_hex(&new_kid, 32), "{new_kid:?}");
    assert_ne!(new_kid, old_kid);
    let (x509, jwt) = doc(admin_cli(&h, &["bundle", "show", "--format", "spiffe"]).await);
    assert_eq!(x509.len(), 1);
    let mut kids: Vec<&str> = jwt.iter().map(|k| k["kid"].as_str().unwrap()).collect();
    kids.sort_unstable();
    let mut expected = vec![old_kid.as_str(), new_kid.as_str()];
    expected.sort_unstable();
    assert_eq!(kids, expected);
    let json = admin_cli(&h, &["authority", "rotate-jwt-key", "--output", "json"])
        .await
        .json();
    assert!(is_lower_hex(json["kid"].as_str().unwrap(), 32), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_agent_fetch_validate_jwt_and_watch() {
    let setup = Setup::start().await;
    setup.create(entry(WORKLOAD)).await;
    let socket = arg(setup.socket()).to_owned();

    let out = run_product(
        AGENT,
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--socket",
            &socket,
        ],
    )
    .await;
    out.expect_code(0);
    let mut lines = out.stdout.lines();
    assert_eq!(
        lines.next(),
        Some(format!("token({WORKLOAD}):").as_str()),
        "{}",
        out.stdout
    );
    let token = lines.next().unwrap().trim().to_owned();
    assert_eq!(decode(&token).1["sub"], WORKLOAD);

    let json = run_product(
        AGENT,
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--socket",
            &socket,
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let svids = json["svids"].as_array().unwrap();
    assert_eq!(svids.len(), 1, "{json}");
    assert_eq!(svids[0]["spiffe_id"], WORKLOAD);
    assert_eq!(svids[0]["token"], token.as_str(), "cached token");

    // Validate with the token on stdin.
    let mut command = product_command(AGENT);
    command.args([
        "api",
        "validate",
        "jwt",
        "--audience",
        "a",
        "--socket",
        &socket,
    ]);
    let out = run_with_stdin(command, &format!("{token}\n")).await;
    out.expect_code(0);
    assert!(out.stdout.contains(WORKLOAD), "{}", out.stdout);
    let mut command = product_command(AGENT);
    command.args([
        "api",
        "validate",
        "jwt",
        "--audience",
        "a",
        "--socket",
        &socket,
        "--output",
        "json",
    ]);
    let json = run_with_stdin(command, &token).await.json();
    assert_eq!(json["spiffe_id"], WORKLOAD, "{json}");
    assert_eq!(json["claims"]["aud"], "a", "{json}");
    // Wrong audience: exit 1, InvalidArgument.
    let mut command = product_command(AGENT);
    command.args([
        "api",
        "validate",
        "jwt",
        "--audience",
        "b",
        "--socket",
        &socket,
    ]);
    let out = run_with_stdin(command, &token).await;
    out.expect_code(1);
    assert!(
        out.one_stderr_line().contains("InvalidArgument"),
        "{}",
        out.stderr
    );
    // --token works too.
    run_product(
        AGENT,
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "a",
            "--token",
            &token,
            "--socket",
            &socket,
        ],
    )
    .await
    .expect_code(0);

    // watch --count 1: one JSON line with the SVID.
    let out = run_product(
        AGENT,
        &[
            "api", "watch", "--count", "1", "--output", "json", "--socket", &socket,
        ],
    )
    .await;
    out.expect_code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stdout);
    let update: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(update["svids"][0]["spiffe_id"], WORKLOAD, "{update}");
    setup.stop().await;
}
