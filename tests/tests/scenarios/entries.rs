//! Registration entries through the admin API: SPIFFE ID parsing at the boundary
//! (SECURITY.md §3.6 items 52-60: reject, never normalise), selectors, TTLs and DNS
//! names, duplicates and unknown ids, and who may call the admin API at all.

use tessera_proto::admin::admin_client::AdminClient;
use tessera_proto::admin::{
    CreateEntryRequest, DeleteEntryRequest, GetEntryRequest, ListEntriesRequest,
};
use tessera_proto::types::{Entry, Selector};
use tessera_tests::Harness;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{CliOutput, arg, product_command, run_command};

/// A node alias as parent: entries need no attested agent to exist.
const PARENT: &str = "spiffe://example.org/node/a";

fn selector(text: &str) -> Selector {
    let (kind, value) = text.split_once(':').unwrap_or((text, ""));
    Selector {
        r#type: kind.to_owned(),
        value: value.to_owned(),
    }
}

/// An entry for `spiffe_id` under `parent_id` with one valid selector.
fn entry(parent_id: &str, spiffe_id: &str) -> Entry {
    Entry {
        spiffe_id: spiffe_id.to_owned(),
        parent_id: parent_id.to_owned(),
        selectors: vec![selector("unix:uid:1000")],
        ..Entry::default()
    }
}

async fn create(admin: &mut AdminClient<Channel>, entry: Entry) -> Result<Entry, tonic::Status> {
    admin
        .create_entry(CreateEntryRequest { entry: Some(entry) })
        .await
        .map(tonic::Response::into_inner)
}

#[track_caller]
fn assert_refused(result: Result<Entry, tonic::Status>, code: Code, fragment: &str, what: &str) {
    match result {
        Ok(entry) => panic!("{what}: accepted as {entry:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(
                status.message().contains(fragment),
                "{what}: message {:?} lacks {fragment:?}",
                status.message()
            );
        }
    }
}

/// IDs no entry may carry as spiffe_id or parent_id (items 52, 54-59 and other trust
/// domains).
fn malformed_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        // 52: the trust domain must be lowercase.
        "spiffe://Example.org/foo",
        "spiffe://EXAMPLE.ORG/foo",
        // 54: scheme.
        "SPIFFE://example.org/x",
        "Spiffe://example.org/x",
        "http://example.org/x",
        "https://example.org/x",
        "spiffe:example.org/x",
        "spiffe:/example.org/x",
        "example.org/x",
        "//example.org/x",
        // 55: port, userinfo, query, fragment, IP literal.
        "spiffe://example.org:8080/x",
        "spiffe://example.org:/x",
        "spiffe://user@example.org/x",
        "spiffe://user:pw@example.org/x",
        "spiffe://example.org/x?q",
        "spiffe://example.org/x?",
        "spiffe://example.org/x#f",
        "spiffe://example.org/x#",
        "spiffe://[::1]/x",
        "spiffe://[::1]:443/x",
        // 56: dot segments, empty segments, trailing slash: never normalised.
        "spiffe://example.org/a/../b",
        "spiffe://example.org/..",
        "spiffe://example.org/./a",
        "spiffe://example.org/a/.",
        "spiffe://example.org/a/",
        "spiffe://example.org/",
        "spiffe://example.org//a",
        "spiffe://example.org/a//b",
        // 57: percent-encoding anywhere.
        "spiffe://example.org/%2e%2e",
        "spiffe://example.org/a%2Fb",
        "spiffe://example.org/%62%61%64",
        "spiffe://example%2eorg/x",
        // 58: characters outside the allowed sets.
        "spiffe://example.org/a b",
        "spiffe://example.org/a\0b",
        "spiffe://example.org/\0",
        "spiffe://example.org/caf\u{e9}",
        "spiffe://example.org/\u{1F600}",
        "spiffe://exa mple.org/x",
        "spiffe://ex\u{e4}mple.org/x",
        "spiffe://example.org/a\\b",
        "spiffe://example.org/a\nb",
        " spiffe://example.org/x",
        "spiffe://example.org/x ",
        "spiffe://example.org/x\n",
        // Empty, scheme only, no trust domain.
        "",
        "spiffe://",
        "spiffe:///x",
        // Another trust domain (also a look-alike).
        "spiffe://other.org/x",
        "spiffe://example.org.evil/x",
        "spiffe://example.or/x",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // 59: an ID of 2049 bytes, a trust domain of 256 bytes.
    let prefix = "spiffe://example.org/";
    ids.push(format!("{prefix}{}", "a".repeat(2049 - prefix.len())));
    ids.push(format!("spiffe://{}.org/x", "a".repeat(252)));
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_spiffe_ids_are_refused_as_spiffe_id_and_parent_id() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    for (i, bad) in malformed_ids().iter().enumerate() {
        assert_refused(
            create(&mut admin, entry(PARENT, bad)).await,
            Code::InvalidArgument,
            "spiffe_id",
            &format!("spiffe_id {bad:?}"),
        );
        // As parent, with a valid and unique spiffe_id.
        let child = format!("spiffe://example.org/child/{i}");
        assert_refused(
            create(&mut admin, entry(bad, &child)).await,
            Code::InvalidArgument,
            "parent_id",
            &format!("parent_id {bad:?}"),
        );
    }
    // Nothing was created along the way.
    let listed = admin
        .list_entries(ListEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty(), "{listed:?}");
    // 59: 2048 bytes is still fine.
    let prefix = "spiffe://example.org/";
    let longest = format!("{prefix}{}", "a".repeat(2048 - prefix.len()));
    let created = create(&mut admin, entry(PARENT, &longest)).await.unwrap();
    assert_eq!(created.spiffe_id, longest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_value_in_a_path_segment() {
    // Item 58, as go-spiffe tests it: each byte (bytes >= 0x80 as the code point of the
    // same value, so as UTF-8) inside a path segment. Allowed: [A-Za-z0-9._-], and `/`
    // which only splits the segment.
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    for byte in 0u8..=255 {
        let c = char::from(byte);
        let id = format!("spiffe://example.org/byte/a{c}b");
        let allowed = byte.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
        let result = create(&mut admin, entry(PARENT, &id)).await;
        if allowed {
            let created = result.unwrap_or_else(|s| panic!("byte {byte:#04x} refused: {s:?}"));
            assert_eq!(created.spiffe_id, id, "stored exactly as given");
        } else {
            assert_refused(
                result,
                Code::InvalidArgument,
                "spiffe_id",
                &format!("byte {byte:#04x}"),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_is_case_sensitive_and_never_normalised() {
    // Item 53: `/Foo` is accepted and distinct from `/foo`.
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    let upper = create(&mut admin, entry(PARENT, "spiffe://example.org/Foo"))
        .await
        .unwrap();
    let lower = create(&mut admin, entry(PARENT, "spiffe://example.org/foo"))
        .await
        .unwrap();
    assert_ne!(upper.id, lower.id);
    assert_eq!(upper.spiffe_id, "spiffe://example.org/Foo");
    assert_eq!(lower.spiffe_id, "spiffe://example.org/foo");
    // Parents are compared exactly too: a differently cased parent is another parent.
    let other_parent = create(
        &mut admin,
        entry("spiffe://example.org/node/A", "spiffe://example.org/foo"),
    )
    .await
    .unwrap();
    assert_eq!(other_parent.parent_id, "spiffe://example.org/node/A");
    let fetched = admin
        .get_entry(GetEntryRequest {
            id: upper.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, upper);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_domain_ids_and_the_reserved_prefix_are_refused() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    // Item 60: a trust domain ID is no workload identity.
    assert_refused(
        create(&mut admin, entry(PARENT, "spiffe://example.org")).await,
        Code::InvalidArgument,
        "no path",
        "trust domain ID",
    );
    // `/tessera` and everything under it belong to tessera (server and agent IDs).
    for reserved in [
        "spiffe://example.org/tessera",
        "spiffe://example.org/tessera/x",
        "spiffe://example.org/tessera/server",
        "spiffe://example.org/tessera/agent/join_token/0123456789abcdef",
    ] {
        assert_refused(
            create(&mut admin, entry(PARENT, reserved)).await,
            Code::InvalidArgument,
            "reserved",
            reserved,
        );
    }
    // The prefix is matched by segment: these are ordinary IDs.
    for fine in [
        "spiffe://example.org/tesserax",
        "spiffe://example.org/Tessera/x",
        "spiffe://example.org/x/tessera",
    ] {
        create(&mut admin, entry(PARENT, fine))
            .await
            .unwrap_or_else(|s| panic!("{fine}: {s:?}"));
    }
    // An agent ID is a valid parent.
    create(
        &mut admin,
        entry(
            "spiffe://example.org/tessera/agent/join_token/0123456789abcdef",
            "spiffe://example.org/under-agent",
        ),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_ttls_dns_names_and_hints_are_validated() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    let base = || entry(PARENT, "spiffe://example.org/w");

    assert_refused(
        admin
            .create_entry(CreateEntryRequest { entry: None })
            .await
            .map(tonic::Response::into_inner),
        Code::InvalidArgument,
        "entry is required",
        "no entry",
    );
    assert_refused(
        create(
            &mut admin,
            Entry {
                selectors: Vec::new(),
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "selector",
        "no selectors",
    );
    for bad in [
        "Unix:uid:1",
        "unix",
        "unix:",
        ":uid:1",
        "un ix:uid:1",
        "unix:uid:1\n",
        "unix:uid:\0",
    ] {
        assert_refused(
            create(
                &mut admin,
                Entry {
                    selectors: vec![selector("unix:uid:1000"), selector(bad)],
                    ..base()
                },
            )
            .await,
            Code::InvalidArgument,
            "selector",
            &format!("selector {bad:?}"),
        );
    }
    for (ttl, fragment) in [
        (-1, "negative"),
        (i64::MIN, "negative"),
        (i64::MAX, "CA lifetime"),
    ] {
        assert_refused(
            create(
                &mut admin,
                Entry {
                    x509_svid_ttl_seconds: ttl,
                    ..base()
                },
            )
            .await,
            Code::InvalidArgument,
            fragment,
            &format!("ttl {ttl}"),
        );
    }
    for bad in [
        "-a.org",
        "a-.org",
        "*.org",
        "a..b",
        "",
        "a_b.org",
        "a.org.",
        "*.*.a.org",
        "a.*.org",
        "é.org",
        "a b.org",
    ] {
        assert_refused(
            create(
                &mut admin,
                Entry {
                    dns_names: vec!["ok.example.org".into(), bad.into()],
                    ..base()
                },
            )
            .await,
            Code::InvalidArgument,
            "dns name",
            &format!("dns name {bad:?}"),
        );
    }
    let long_label = format!("{}.org", "a".repeat(64));
    assert_refused(
        create(
            &mut admin,
            Entry {
                dns_names: vec![long_label],
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "dns name",
        "64-byte label",
    );
    assert_refused(
        create(
            &mut admin,
            Entry {
                hint: "a\nb".into(),
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "hint",
        "hint with a newline",
    );
    // Nothing of the above was stored; a valid entry with all fields is.
    assert!(
        admin
            .list_entries(ListEntriesRequest {})
            .await
            .unwrap()
            .into_inner()
            .entries
            .is_empty()
    );
    let created = create(
        &mut admin,
        Entry {
            x509_svid_ttl_seconds: 600,
            dns_names: vec!["web.example.org".into(), "*.svc.example.org".into()],
            hint: "web".into(),
            ..base()
        },
    )
    .await
    .unwrap();
    assert_eq!(created.x509_svid_ttl_seconds, 600);
    assert_eq!(
        created.dns_names,
        vec!["web.example.org", "*.svc.example.org"]
    );
    assert_eq!(created.hint, "web");
    assert_eq!(created.id.len(), 32, "{created:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_unknown_ids_and_listing() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    let two = |a: &str, b: &str| Entry {
        selectors: vec![selector(a), selector(b)],
        ..entry(PARENT, "spiffe://example.org/w")
    };
    let first = create(&mut admin, two("unix:uid:1", "unix:gid:1"))
        .await
        .unwrap();
    // The same entry again, with the selectors reordered or repeated: AlreadyExists.
    for duplicate in [
        two("unix:uid:1", "unix:gid:1"),
        two("unix:gid:1", "unix:uid:1"),
        Entry {
            selectors: vec![
                selector("unix:uid:1"),
                selector("unix:gid:1"),
                selector("unix:uid:1"),
            ],
            ..entry(PARENT, "spiffe://example.org/w")
        },
    ] {
        assert_refused(
            create(&mut admin, duplicate).await,
            Code::AlreadyExists,
            "exists",
            "duplicate",
        );
    }
    // Another selector set or parent is another entry.
    let second = create(&mut admin, two("unix:uid:1", "unix:gid:2"))
        .await
        .unwrap();
    let third = create(
        &mut admin,
        Entry {
            parent_id: "spiffe://example.org/node/b".into(),
            ..two("unix:uid:1", "unix:gid:1")
        },
    )
    .await
    .unwrap();

    let mut listed: Vec<String> = admin
        .list_entries(ListEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.id)
        .collect();
    listed.sort();
    let mut expected = vec![first.id.clone(), second.id.clone(), third.id.clone()];
    expected.sort();
    assert_eq!(listed, expected);

    for unknown in ["0123456789abcdef0123456789abcdef", "", "../x", "x'; --"] {
        let status = admin
            .get_entry(GetEntryRequest { id: unknown.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "get {unknown:?}: {status:?}");
        let status = admin
            .delete_entry(DeleteEntryRequest { id: unknown.into() })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::NotFound,
            "delete {unknown:?}: {status:?}"
        );
    }

    admin
        .delete_entry(DeleteEntryRequest {
            id: second.id.clone(),
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let status = admin
            .get_entry(GetEntryRequest {
                id: second.id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    let status = admin
        .delete_entry(DeleteEntryRequest {
            id: second.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "deleting twice");
    let listed = admin
        .list_entries(ListEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|e| e.id != second.id));
    // A deleted entry can be created again (under a new id).
    let again = create(&mut admin, two("unix:uid:1", "unix:gid:2"))
        .await
        .unwrap();
    assert_ne!(again.id, second.id);
}

// ---------------------------------------------------------------------------------------
// Who may call the admin API: the CLI run as nobody (uid 65534).

const NOBODY: u32 = 65534;

async fn entry_list_as_nobody(h: &Harness) -> CliOutput {
    let mut command = product_command("tessera-server");
    command
        .args(["entry", "list", "--output", "json", "--socket"])
        .arg(arg(&h.admin_socket()))
        .uid(NOBODY)
        .gid(NOBODY);
    run_command(command).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_cannot_reach_the_private_admin_socket() {
    // Default: the socket's directory is 0700 root, so nobody's connect fails.
    let h = Harness::start().await;
    let output = entry_list_as_nobody(&h).await;
    output.expect_code(1);
    let line = output.one_stderr_line();
    assert!(
        line.contains("cannot connect to the admin socket"),
        "{line}"
    );
    assert!(output.stdout.is_empty(), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_check_refuses_a_uid_not_configured() {
    // With another admin uid configured the socket is reachable (dir 0711, socket
    // 0666), so the uid check alone refuses nobody.
    let h = Harness::start_with("admin_uids = [12345]").await;
    h.create_entry(
        PARENT,
        "spiffe://example.org/secret-name",
        &["unix:uid:1"],
        0,
    )
    .await
    .unwrap();
    let output = entry_list_as_nobody(&h).await;
    output.expect_code(1);
    let line = output.one_stderr_line();
    assert!(line.contains("PermissionDenied"), "{line}");
    assert!(
        line.contains("uid 65534 may not use the admin API"),
        "{line}"
    );
    assert!(!output.stdout.contains("secret-name"), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_admin_uid_may_list_entries() {
    let h = Harness::start_with("admin_uids = [65534]").await;
    let created = h
        .create_entry(PARENT, "spiffe://example.org/listed", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let output = entry_list_as_nobody(&h).await;
    let listed = output.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], created.id.as_str());
    assert_eq!(listed[0]["spiffe_id"], "spiffe://example.org/listed");
}

/// SECURITY.md §3.5 item 48: an admin socket configured inside a directory others can
/// enter (such as the Workload API socket directory, 0755) is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_socket_in_a_shared_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("workload-sockets");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let text = format!(
        "[server]\ntrust_domain = \"example.org\"\nbind_address = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_socket_path = \"{}\"\n",
        dir.path().join("data").display(),
        shared.join("admin.sock").display()
    );
    let config =
        tessera_server::config::ServerConfig::parse(&text, std::path::Path::new("s.toml")).unwrap();
    let err = tessera_server::start(config).await.unwrap_err().to_string();
    assert!(err.contains("its own directory"), "{err}");
    assert!(!shared.join("admin.sock").exists());
}
