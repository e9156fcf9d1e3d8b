//! The selector schema at entry create/update (SECURITY.md §3.6 item 62): a selector
//! must be one of the forms the workload attestors emit, so a typo (`k8s:pod_name`,
//! `unix:pid`, `unix:uid:01`) is refused with the valid forms instead of creating an
//! entry that never matches.

use tessera_plugin_sdk::selector_schema::known_forms;
use tessera_proto::admin::{GetEntryRequest, ListEntriesRequest, UpdateEntryRequest};
use tessera_proto::types::{Entry, Selector};
use tessera_tests::Harness;
use tonic::Code;

use crate::support::{arg, run_product};

const PARENT: &str = "spiffe://example.org/node/a";

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// A marker put in rejected values: no error message may contain it.
const SECRET: &str = "s3cr3t";

/// One valid selector of every form (more for some).
fn good_selectors() -> Vec<String> {
    vec![
        "unix:uid:0".into(),
        "unix:uid:4294967295".into(),
        "unix:gid:1000".into(),
        "unix:user:alice".into(),
        "unix:user:Svc_Account$".into(),
        "unix:group:www-data".into(),
        "unix:supplementary_gid:27".into(),
        "unix:supplementary_group:sudo".into(),
        "unix:path:/usr/local/bin/research-bot".into(),
        "unix:path:/opt/my app/bin/caf\u{e9}".into(),
        format!("unix:sha256:{SHA}"),
        "systemd:unit:nginx.service".into(),
        "systemd:unit:getty@tty1.service".into(),
        "systemd:user_unit:app.scope".into(),
        "systemd:slice:system.slice".into(),
        "systemd:slice:-.slice".into(),
        "systemd:invocation_id:0123456789abcdef0123456789abcdef".into(),
        "cgroup:path:/".into(),
        "cgroup:path:/system.slice/nginx.service".into(),
        format!("container:id:{SHA}"),
        "container:pod_uid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
        format!("container:image:registry.example.org:5000/team/app@sha256:{SHA}"),
        "container:name:web-1.blue_green".into(),
    ]
}

/// Rejected selectors and a fragment their message must contain.
fn bad_selectors() -> Vec<(String, &'static str)> {
    let mut bad: Vec<(String, &'static str)> = vec![
        // Unknown types: the known ones are listed.
        (
            format!("k8s:pod_name:{SECRET}"),
            "unknown selector type `k8s`; valid forms start with a known type: \
             unix, systemd, cgroup, container",
        ),
        ("docker:id:abc".into(), "unknown selector type `docker`"),
        ("unixx:uid:1".into(), "unknown selector type `unixx`"),
        // Unknown keys: the type's forms are listed.
        (
            "unix:pid:1".into(),
            "unknown unix selector `pid`; valid forms: unix:uid:<number>, unix:gid:<number>, ",
        ),
        ("unix:UID:1".into(), "unknown unix selector `UID`"),
        (format!("unix:{SECRET}/x:1"), "unknown unix selector key"),
        (
            "systemd:service:nginx.service".into(),
            "unknown systemd selector `service`; valid forms: systemd:unit:<unit>",
        ),
        ("cgroup:id:1".into(), "valid forms: cgroup:path:<path>"),
        ("container:image_id:x".into(), "unknown container selector"),
        // No KEY: part at all.
        (
            format!("unix:{SECRET}"),
            "unix selector has no KEY (the form is unix:KEY:VALUE); valid forms: unix:uid:",
        ),
        // Malformed values: the form and what the value must be.
        ("unix:uid:-1".into(), "selector unix:uid: <number> must be"),
        ("unix:uid:01".into(), "valid form: unix:uid:<number>"),
        (
            "unix:uid:4294967296".into(),
            "valid form: unix:uid:<number>",
        ),
        (
            format!("unix:uid:{SECRET}"),
            "valid form: unix:uid:<number>",
        ),
        ("unix:gid:1.0".into(), "valid form: unix:gid:<number>"),
        ("unix:user:a/b".into(), "valid form: unix:user:<name>"),
        ("unix:group:a b".into(), "valid form: unix:group:<name>"),
        (
            "unix:supplementary_gid:+27".into(),
            "valid form: unix:supplementary_gid:<number>",
        ),
        (
            "unix:supplementary_group:a:b".into(),
            "valid form: unix:supplementary_group:<name>",
        ),
        (
            format!("unix:sha256:{}", SHA.to_uppercase()),
            "64 lowercase hex digits",
        ),
        (format!("unix:sha256:{}", &SHA[..63]), "unix:sha256:<hex>"),
        (
            format!("unix:path:{SECRET}"),
            "valid form: unix:path:<path>",
        ),
        ("unix:path:/a/../b".into(), "valid form: unix:path:<path>"),
        ("unix:path:/a/./b".into(), "valid form: unix:path:<path>"),
        ("unix:path:/a//b".into(), "valid form: unix:path:<path>"),
        ("unix:path:/usr/bin/".into(), "valid form: unix:path:<path>"),
        (
            "systemd:unit:nginx".into(),
            "valid form: systemd:unit:<unit>",
        ),
        (
            "systemd:user_unit:a b.service".into(),
            "valid form: systemd:user_unit:<unit>",
        ),
        (
            "systemd:slice:nginx.service".into(),
            "valid form: systemd:slice:<slice>",
        ),
        (
            "systemd:invocation_id:0123456789ABCDEF0123456789ABCDEF".into(),
            "32 lowercase hex digits",
        ),
        ("cgroup:path:/a//b".into(), "valid form: cgroup:path:<path>"),
        ("cgroup:path:/a/..".into(), "valid form: cgroup:path:<path>"),
        (
            "cgroup:path:system.slice".into(),
            "valid form: cgroup:path:<path>",
        ),
        ("container:id:abc".into(), "valid form: container:id:<hex>"),
        ("container:id:".into(), "valid form: container:id:<hex>"),
        (
            "container:pod_uid:0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0".into(),
            "valid form: container:pod_uid:<uuid>",
        ),
        (
            format!("container:image:{SECRET} latest"),
            "valid form: container:image:<image>",
        ),
        (
            "container:name:a/b".into(),
            "valid form: container:name:<name>",
        ),
    ];
    // A long value is never echoed either.
    bad.push((
        format!("unix:path:{}", SECRET.repeat(150)),
        "valid form: unix:path:<path>",
    ));
    bad
}

fn wire(text: &str) -> Selector {
    let (kind, value) = text.split_once(':').unwrap_or((text, ""));
    Selector {
        r#type: kind.to_owned(),
        value: value.to_owned(),
    }
}

#[track_caller]
fn assert_schema_refusal<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    fragment: &str,
    what: &str,
) {
    let status = match result {
        Ok(v) => panic!("{what}: accepted as {v:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    let message = status.message();
    assert!(
        message.contains(fragment),
        "{what}: message {message:?} lacks {fragment:?}"
    );
    assert!(
        message.contains("valid form"),
        "{what}: message {message:?} names no valid form"
    );
    assert!(
        !message.contains(SECRET),
        "{what}: message {message:?} echoes the value"
    );
}

#[test]
fn the_samples_cover_every_form() {
    let good = good_selectors();
    for (form, _) in known_forms() {
        let prefix = form.rsplit_once(':').unwrap().0;
        assert!(
            good.iter()
                .any(|s| s.strip_prefix(prefix).is_some_and(|v| v.starts_with(':'))),
            "no valid sample of {form}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_of_every_form_are_accepted() {
    let h = Harness::start().await;
    let good = good_selectors();
    for (i, s) in good.iter().enumerate() {
        let created = h
            .create_entry(
                PARENT,
                &format!("spiffe://example.org/sel/{i}"),
                &[s.as_str()],
                0,
            )
            .await
            .unwrap_or_else(|err| panic!("{s:?} refused: {err:?}"));
        assert_eq!(created.selectors, vec![wire(s)], "{s:?}");
    }
    // All of them in one entry.
    let all: Vec<&str> = good.iter().map(String::as_str).collect();
    let created = h
        .create_entry(PARENT, "spiffe://example.org/sel/all", &all, 0)
        .await
        .unwrap();
    assert_eq!(created.selectors.len(), good.len());

    let listed = h
        .admin()
        .await
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), good.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misspelt_or_malformed_selectors_are_refused_with_the_valid_forms() {
    let h = Harness::start().await;
    for (bad, fragment) in bad_selectors() {
        // Alone, and next to a valid selector: one bad selector refuses the entry.
        for selectors in [vec![bad.as_str()], vec!["unix:uid:1000", bad.as_str()]] {
            assert_schema_refusal(
                h.create_entry(PARENT, "spiffe://example.org/w", &selectors, 0)
                    .await,
                fragment,
                &format!("create with {selectors:?}"),
            );
        }
    }
    // Nothing was stored.
    let listed = h
        .admin()
        .await
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_with_a_bad_selector_is_refused_and_changes_nothing() {
    let h = Harness::start().await;
    let created = h
        .create_entry(PARENT, "spiffe://example.org/w", &["unix:uid:1000"], 0)
        .await
        .unwrap();
    let mut admin = h.admin().await;
    for (bad, fragment) in [
        ("k8s:pod_name:web", "unknown selector type `k8s`"),
        ("unix:pid:1", "unknown unix selector `pid`"),
        ("unix:uid:01", "valid form: unix:uid:<number>"),
    ] {
        let update = Entry {
            selectors: vec![wire("unix:uid:1000"), wire(bad)],
            ..created.clone()
        };
        assert_schema_refusal(
            admin
                .update_entry(UpdateEntryRequest {
                    entry: Some(update),
                })
                .await
                .map(tonic::Response::into_inner),
            fragment,
            &format!("update with {bad:?}"),
        );
    }
    let now = admin
        .get_entry(GetEntryRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_entry_create_with_a_typo_exits_64_with_the_valid_forms() {
    let h = Harness::start().await;
    let socket = h.admin_socket();
    for (selector, fragment) in [
        (
            "k8s:pod_name:web",
            "unknown selector type `k8s`; valid forms start with a known type: \
             unix, systemd, cgroup, container",
        ),
        (
            "unix:pid:1",
            "unknown unix selector `pid`; valid forms: unix:uid:<number>",
        ),
    ] {
        let out = run_product(
            "tessera-server",
            &[
                "entry",
                "create",
                "--parent-id",
                PARENT,
                "--spiffe-id",
                "spiffe://example.org/w",
                "--selector",
                selector,
                "--socket",
                arg(&socket),
            ],
        )
        .await;
        out.expect_code(64);
        let line = out.one_stderr_line();
        assert!(line.contains(fragment), "{selector}: {line}");
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
}
