//! Tests of the systemd attestor: the fixture trees under `tests/fixtures/` (a `cgroup`
//! file, optional `invocation_ids` lines `<unified|legacy> <unit cgroup> <id|malformed|gone>`
//! served by a fake cgroupfs, and the `expected` selectors or `error: <text>`), the
//! restart race of SECURITY.md §3.4 item 44, and real processes in real cgroups with
//! real `trusted.invocation_id` attributes where the machine allows.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_plugin_sdk::testing::{
    TestCgroup, expected, fake_proc, fixture_cases, pin, reap, spawn_sleep, strings,
};

use super::*;

const ID: &str = "0123456789abcdef0123456789abcdef";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fake cgroupfs: answers from a table, records the calls, and can run a hook (to
/// simulate a restart) while "reading the attribute".
#[derive(Default)]
struct FakeIds {
    table: HashMap<(Hierarchy, String), String>,
    calls: Mutex<Vec<(Hierarchy, String)>>,
    hook: Option<Box<dyn Fn() + Send + Sync>>,
}

impl fmt::Debug for FakeIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FakeIds")
    }
}

impl FakeIds {
    fn from_file(path: &Path) -> Self {
        let mut table = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let mut parts = line.splitn(3, ' ');
                let hierarchy = match parts.next().unwrap() {
                    "unified" => Hierarchy::Unified,
                    "legacy" => Hierarchy::Legacy,
                    other => panic!("bad hierarchy {other}"),
                };
                let cgroup = parts.next().unwrap().to_owned();
                let value = parts.next().unwrap().to_owned();
                table.insert((hierarchy, cgroup), value);
            }
        }
        Self {
            table,
            ..Self::default()
        }
    }
}

impl InvocationIds for Arc<FakeIds> {
    fn invocation_id(
        &self,
        hierarchy: Hierarchy,
        unit_cgroup: &str,
    ) -> Result<Option<String>, AttestError> {
        self.calls
            .lock()
            .unwrap()
            .push((hierarchy, unit_cgroup.to_owned()));
        if let Some(hook) = &self.hook {
            hook();
        }
        match self
            .table
            .get(&(hierarchy, unit_cgroup.to_owned()))
            .map(String::as_str)
        {
            None => Ok(None),
            Some("gone") => Err(AttestError::Failed(
                "the unit's cgroup no longer exists (unit stopped or restarted)".into(),
            )),
            Some(value) => invocation::parse_id(value.as_bytes())
                .map(Some)
                .ok_or_else(|| AttestError::Failed("invocation id attribute is malformed".into())),
        }
    }
}

fn attestor(ids: Arc<FakeIds>, require: bool) -> SystemdAttestor {
    SystemdAttestor::with_invocation_ids(
        SystemdAttestorConfig {
            require_invocation_id: require,
            ..SystemdAttestorConfig::default()
        },
        Box::new(ids),
    )
}

#[test]
fn fixture_trees() {
    let child = spawn_sleep();
    let cases = fixture_cases(&fixtures());
    assert!(cases.len() >= 20, "{cases:?}");
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy();
        let ids = Arc::new(FakeIds::from_file(&case.join("invocation_ids")));
        let a = attestor(Arc::clone(&ids), false);
        assert_eq!(a.name(), "systemd");
        let root = fake_proc(&child, &std::fs::read(case.join("cgroup")).unwrap());
        let got = a.attest(&pin(&child, root.path())).map(|s| strings(&s));
        match (expected(case), got) {
            (Ok(want), Ok(got)) => assert_eq!(got, want, "{name}"),
            (Err(want), Err(err)) => assert!(err.to_string().contains(&want), "{name}: {err}"),
            (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
        }
        // The attribute is only looked up once a unit was found, and only for it.
        assert!(ids.calls.lock().unwrap().len() <= 1, "{name}");
    }
    reap(child);
}

#[test]
fn invocation_id_is_read_from_the_unit_cgroup_of_the_right_hierarchy() {
    let child = spawn_sleep();
    let ids = Arc::new(FakeIds::default());
    let root = fake_proc(
        &child,
        b"0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n",
    );
    attestor(Arc::clone(&ids), false)
        .attest(&pin(&child, root.path()))
        .unwrap();
    assert_eq!(
        *ids.calls.lock().unwrap(),
        [(
            Hierarchy::Unified,
            "/user.slice/user-1000.slice/user@1000.service".to_owned()
        )]
    );
    reap(child);
}

#[test]
fn require_invocation_id() {
    let child = spawn_sleep();
    let root = fake_proc(&child, b"0::/system.slice/nginx.service\n");
    let w = pin(&child, root.path());
    let err = attestor(Arc::new(FakeIds::default()), true)
        .attest(&w)
        .unwrap_err();
    assert!(err.to_string().contains("require_invocation_id"), "{err}");
    // Without the setting the other selectors are reported.
    let got = attestor(Arc::new(FakeIds::default()), false)
        .attest(&w)
        .unwrap();
    assert_eq!(
        strings(&got),
        ["systemd:unit:nginx.service", "systemd:slice:system.slice"]
    );
    // A process in no unit needs no invocation id.
    let root = fake_proc(&child, b"0::/\n");
    assert!(
        attestor(Arc::new(FakeIds::default()), true)
            .attest(&pin(&child, root.path()))
            .unwrap()
            .is_empty()
    );
    reap(child);
}

/// SECURITY.md §3.4 item 44: the unit is restarted (the process moves to the new
/// instance's cgroup, or leaves) while the attribute is read: attestation fails.
#[test]
fn restart_during_the_attribute_read_fails() {
    let child = spawn_sleep();
    let root = fake_proc(&child, b"0::/system.slice/nginx.service\n");
    let file = root.path().join(child.id().to_string()).join("cgroup");
    let mut ids = FakeIds::default();
    ids.table.insert(
        (Hierarchy::Unified, "/system.slice/nginx.service".to_owned()),
        ID.to_owned(),
    );
    let moved = file.clone();
    ids.hook = Some(Box::new(move || {
        std::fs::write(&moved, b"0::/system.slice/other.service\n").unwrap();
    }));
    let err = attestor(Arc::new(ids), false)
        .attest(&pin(&child, root.path()))
        .unwrap_err();
    assert!(
        err.to_string().contains("changed during attestation"),
        "{err}"
    );
    reap(child);
}

/// The process exits while the attribute is read: attestation fails.
#[test]
fn exit_during_the_attribute_read_fails() {
    let child = spawn_sleep();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let root = fake_proc(&child, b"0::/system.slice/nginx.service\n");
    let w = pin(&child, root.path());
    let mut ids = FakeIds::default();
    ids.table.insert(
        (Hierarchy::Unified, "/system.slice/nginx.service".to_owned()),
        ID.to_owned(),
    );
    ids.hook = Some(Box::new(move || {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
    }));
    let err = attestor(Arc::new(ids), false).attest(&w).unwrap_err();
    assert!(
        matches!(err, AttestError::Workload(WorkloadError::ProcessExited)),
        "{err:?}"
    );
    reap(child);
}

#[test]
fn errors_do_not_quote_the_path() {
    let child = spawn_sleep();
    for contents in [
        &b"0::/../secret.slice/x.service\n"[..],
        b"0::/system.slice/secret.service (deleted)\n",
    ] {
        let root = fake_proc(&child, contents);
        let err = attestor(Arc::new(FakeIds::default()), false)
            .attest(&pin(&child, root.path()))
            .unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
    reap(child);
}

/// The real `/proc` and cgroupfs: on this machine processes are at `0::/` (no unit).
#[test]
fn real_process() {
    let child = spawn_sleep();
    let w = pin(&child, Path::new("/proc"));
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    let result = SystemdAttestor::new(SystemdAttestorConfig::default()).attest(&w);
    if text.lines().any(|l| l == "0::/") {
        assert!(result.unwrap().is_empty());
    } else {
        // Elsewhere (a real systemd host) at least the unit must be found.
        let got = strings(&result.unwrap());
        assert!(
            got.is_empty() || got.iter().any(|s| s.starts_with("systemd:unit:")),
            "{got:?}"
        );
    }
    reap(child);
}

/// A child in a unit-like cgroup created in the real unified hierarchy, with a real
/// `trusted.invocation_id` (needs root and a writable cgroup2 mount; skipped otherwise).
#[test]
fn real_unit_cgroup_with_invocation_id() {
    let Some(cg) = TestCgroup::create(&["tessera-systest.slice", "tessera-systest-x.service"])
    else {
        eprintln!("skipped: needs root and a writable cgroup2 mount");
        return;
    };
    let unit_dir = cg.dir(1);
    rustix::fs::setxattr(
        unit_dir,
        "trusted.invocation_id",
        ID.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let child = spawn_sleep();
    cg.add(&child);
    let w = pin(&child, Path::new("/proc"));
    let a = SystemdAttestor::new(SystemdAttestorConfig::default());
    let got = strings(&a.attest(&w).unwrap());
    assert_eq!(
        got,
        [
            format!("systemd:unit:{}", cg.name(1)),
            format!("systemd:slice:{}", cg.name(0)),
            format!("systemd:invocation_id:{ID}"),
        ]
    );
    // A malformed attribute fails.
    rustix::fs::setxattr(
        unit_dir,
        "trusted.invocation_id",
        b"not-an-id",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let err = a.attest(&w).unwrap_err();
    assert!(err.to_string().contains("malformed"), "{err}");
    // Without trusted.*, user.* is used while the directory belongs to root...
    rustix::fs::removexattr(unit_dir, "trusted.invocation_id").unwrap();
    let user_id = "fedcba9876543210fedcba9876543210";
    rustix::fs::setxattr(
        unit_dir,
        "user.invocation_id",
        user_id.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let got = strings(&a.attest(&w).unwrap());
    assert!(
        got.contains(&format!("systemd:invocation_id:{user_id}")),
        "{got:?}"
    );
    // ...but not once it is delegated to (owned by) another user, who could write it.
    nix::unistd::chown(unit_dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let got = strings(&a.attest(&w).unwrap());
    assert!(!got.iter().any(|s| s.contains("invocation_id")), "{got:?}");
    let strict = SystemdAttestor::new(SystemdAttestorConfig {
        require_invocation_id: true,
        ..SystemdAttestorConfig::default()
    });
    assert!(strict.attest(&w).is_err());
    reap(child);
}

/// A process in a sub-cgroup of a (delegated) unit: the unit, and its attribute, are
/// the unit's, whatever the sub-cgroup is called.
#[test]
fn real_delegated_subcgroup() {
    let Some(cg) = TestCgroup::create(&[
        "tessera-deltest.slice",
        "tessera-deltest-app.service",
        "sshd.service",
    ]) else {
        eprintln!("skipped: needs root and a writable cgroup2 mount");
        return;
    };
    for (level, id) in [(1, ID), (2, "fedcba9876543210fedcba9876543210")] {
        rustix::fs::setxattr(
            cg.dir(level),
            "trusted.invocation_id",
            id.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    let child = spawn_sleep();
    cg.add(&child);
    let w = pin(&child, Path::new("/proc"));
    let got = strings(
        &SystemdAttestor::new(SystemdAttestorConfig::default())
            .attest(&w)
            .unwrap(),
    );
    assert_eq!(
        got,
        [
            format!("systemd:unit:{}", cg.name(1)),
            format!("systemd:slice:{}", cg.name(0)),
            format!("systemd:invocation_id:{ID}"),
        ]
    );
    reap(child);
}
