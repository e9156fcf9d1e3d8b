//! Tests of the cgroup attestor: the fixture trees under `tests/fixtures/` (each a
//! `cgroup` file and the `expected` selectors or `error: <text>`), served as the
//! `/proc/<pid>/cgroup` of a real pinned child through a fixture proc root, and real
//! processes in real cgroups where the machine allows.

use std::path::{Path, PathBuf};

use tessera_plugin_sdk::testing::{
    TestCgroup, expected, fake_proc, fixture_cases, pin, reap, spawn_sleep,
};

use super::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn fixture_trees() {
    let child = spawn_sleep();
    let attestor = CgroupAttestor::new(CgroupAttestorConfig::default());
    assert_eq!(attestor.name(), "cgroup");
    let cases = fixture_cases(&fixtures());
    assert!(cases.len() >= 10, "{cases:?}");
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy();
        let root = fake_proc(&child, &std::fs::read(case.join("cgroup")).unwrap());
        let w = pin(&child, root.path());
        let got = attestor
            .attest(&w)
            .map(|s| s.iter().map(ToString::to_string).collect::<Vec<_>>());
        match (expected(case), got) {
            (Ok(want), Ok(got)) => assert_eq!(got, want, "{name}"),
            (Err(want), Err(err)) => {
                assert!(err.to_string().contains(&want), "{name}: {err}");
            }
            (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
        }
    }
    reap(child);
}

#[test]
fn errors_do_not_quote_the_path() {
    let child = spawn_sleep();
    let attestor = CgroupAttestor::default();
    for contents in [
        &b"0::/../secret-cgroup\n"[..],
        b"0::/secret-cgroup (deleted)\n",
        b"0::/secret-cgroup/../x\n",
    ] {
        let root = fake_proc(&child, contents);
        let err = attestor.attest(&pin(&child, root.path())).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
    reap(child);
}

#[test]
fn oversized_file_is_an_error() {
    let child = spawn_sleep();
    let mut big = Vec::new();
    for i in 1..=2000 {
        big.extend_from_slice(format!("{i}:c{i}:/{}\n", "a".repeat(40)).as_bytes());
    }
    big.extend_from_slice(b"0::/\n");
    assert!(big.len() > tessera_plugin_sdk::cgroup::CGROUP_FILE_LIMIT);
    let root = fake_proc(&child, &big);
    let err = CgroupAttestor::default()
        .attest(&pin(&child, root.path()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            AttestError::Workload(tessera_plugin_sdk::WorkloadError::TooLarge { .. })
        ),
        "{err:?}"
    );
    reap(child);
}

#[test]
fn missing_file_is_an_error_not_an_absent_selector() {
    let child = spawn_sleep();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(child.id().to_string())).unwrap();
    let err = CgroupAttestor::default()
        .attest(&pin(&child, root.path()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            AttestError::Workload(tessera_plugin_sdk::WorkloadError::Io { .. })
        ),
        "{err:?}"
    );
    reap(child);
}

#[test]
fn config_has_no_keys() {
    let c: CgroupAttestorConfig = toml::from_str("").unwrap();
    assert_eq!(c, CgroupAttestorConfig::default());
    assert!(toml::from_str::<CgroupAttestorConfig>("path = \"/\"").is_err());
}

/// The real `/proc`: the selector is the unified line of the child's own cgroup file
/// (on this machine `0::/`, a hybrid host).
#[test]
fn real_process() {
    let child = spawn_sleep();
    let w = pin(&child, Path::new("/proc"));
    let got = CgroupAttestor::default().attest(&w).unwrap();
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    match text.lines().find_map(|l| l.strip_prefix("0::")) {
        Some(path) => {
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].to_string(), format!("cgroup:path:{path}"));
            if path == "/" {
                assert_eq!(got[0].to_string(), "cgroup:path:/");
            }
        }
        None => assert!(got.is_empty(), "{got:?}"),
    }
    reap(child);
}

/// A child moved into a fresh cgroup of the real unified hierarchy (needs root and a
/// writable cgroup2 mount; skipped otherwise).
#[test]
fn real_process_in_a_created_cgroup() {
    let Some(cg) = TestCgroup::create(&["tessera-cgtest.slice", "tessera-cgtest-x.service"]) else {
        eprintln!("skipped: needs root and a writable cgroup2 mount");
        return;
    };
    let child = spawn_sleep();
    cg.add(&child);
    let w = pin(&child, Path::new("/proc"));
    let got = CgroupAttestor::default().attest(&w).unwrap();
    assert_eq!(
        got.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [format!("cgroup:path:{}", cg.path())]
    );
    reap(child);
}
