//! Tests of the unix attestor against real child processes (run as root here; the
//! tests that depend on root skip themselves otherwise).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_plugin_sdk::testing::{
    pin_as, reap, sleep_binary, spawn, spawn_sleep, wait_until_exec,
};
use tessera_plugin_sdk::workload::pidfd_open;

use super::*;

fn sha256_hex(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data))
}

fn values(selectors: &[Selector]) -> Vec<String> {
    assert!(selectors.iter().all(|s| s.kind() == "unix"));
    selectors.iter().map(|s| s.value().to_owned()).collect()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn wait_dead(w: &Workload) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.is_alive().unwrap() {
        assert!(Instant::now() < deadline, "child did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn attests_a_running_process() {
    let me_uid = nix::unistd::geteuid().as_raw();
    let me_gid = nix::unistd::getegid().as_raw();
    let child = spawn_sleep();
    let w = pin_as(&child, me_uid, me_gid);
    let attestor = UnixAttestor::new(UnixAttestorConfig::default());
    assert_eq!(attestor.name(), "unix");
    let got = values(&attestor.attest(&w).unwrap());

    assert!(got.contains(&format!("uid:{me_uid}")), "{got:?}");
    assert!(got.contains(&format!("gid:{me_gid}")), "{got:?}");
    if is_root() {
        assert!(got.contains(&"user:root".to_owned()), "{got:?}");
        assert!(got.contains(&"group:root".to_owned()), "{got:?}");
    }
    let sleep = sleep_binary();
    assert!(
        got.contains(&format!("path:{}", sleep.display())),
        "{got:?}"
    );
    assert!(
        got.contains(&format!("sha256:{}", sha256_hex(&sleep))),
        "{got:?}"
    );

    // Supplementary groups mirror the Groups: line.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let groups_line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    for g in groups_line["Groups:".len()..].split_whitespace() {
        assert!(got.contains(&format!("supplementary_gid:{g}")), "{got:?}");
    }
    assert_eq!(
        got.iter()
            .filter(|v| v.starts_with("supplementary_gid:"))
            .count(),
        groups_line["Groups:".len()..].split_whitespace().count()
    );

    // A second attestation hits the hash cache and gives the same answer.
    assert_eq!(attestor.hasher.cached_len(), 1);
    assert_eq!(values(&attestor.attest(&w).unwrap()), got);
    assert_eq!(attestor.hasher.cached_len(), 1);
    reap(child);
}

#[test]
fn credentials_must_match_the_socket() {
    let me_uid = nix::unistd::geteuid().as_raw();
    let me_gid = nix::unistd::getegid().as_raw();
    let child = spawn_sleep();
    let attestor = UnixAttestor::new(UnixAttestorConfig::default());

    let w = pin_as(&child, me_uid.wrapping_add(1), me_gid);
    let err = attestor.attest(&w).unwrap_err();
    assert!(
        matches!(err, AttestError::CredentialMismatch { field: "euid", .. }),
        "{err:?}"
    );
    let w = pin_as(&child, me_uid, me_gid.wrapping_add(1));
    let err = attestor.attest(&w).unwrap_err();
    assert!(
        matches!(err, AttestError::CredentialMismatch { field: "egid", .. }),
        "{err:?}"
    );
    reap(child);
}

#[test]
fn attests_another_users_process_by_its_effective_ids() {
    if !is_root() {
        eprintln!("skipped: needs root to start a process as another user");
        return;
    }
    // std's `Command::groups` is unstable: use util-linux setpriv when present.
    let child = match which("setpriv") {
        Ok(setpriv) => spawn(
            Command::new(setpriv)
                .args([
                    "--reuid=65534",
                    "--regid=65533",
                    "--groups=65533,12345",
                    "--",
                ])
                .arg(sleep_binary())
                .arg("30"),
        ),
        Err(()) => {
            eprintln!("skipped: no setpriv");
            return;
        }
    };
    wait_until_exec(&child, "sleep");
    let w = pin_as(&child, 65534, 65533);
    let attestor = UnixAttestor::new(UnixAttestorConfig::default());
    let got = values(&attestor.attest(&w).unwrap());
    assert!(got.contains(&"uid:65534".to_owned()), "{got:?}");
    assert!(got.contains(&"gid:65533".to_owned()), "{got:?}");
    assert!(
        got.contains(&"supplementary_gid:12345".to_owned()),
        "{got:?}"
    );
    assert!(
        got.contains(&"supplementary_gid:65533".to_owned()),
        "{got:?}"
    );
    // Names only where NSS knows them.
    let has_user = User::from_uid(Uid::from_raw(65534)).unwrap().is_some();
    assert_eq!(
        got.iter().any(|v| v.starts_with("user:")),
        has_user,
        "{got:?}"
    );
    let g12345 = Group::from_gid(Gid::from_raw(12345)).unwrap();
    assert_eq!(
        got.iter().any(|v| v.starts_with("supplementary_group:")),
        g12345.is_some() || Group::from_gid(Gid::from_raw(65533)).unwrap().is_some()
    );
    // The root-owned socket view would be a mismatch.
    let w = pin_as(&child, 0, 0);
    assert!(matches!(
        attestor.attest(&w),
        Err(AttestError::CredentialMismatch { .. })
    ));
    reap(child);
}

#[test]
fn deleted_executable_has_a_hash_but_no_path() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sleepy");
    std::fs::copy(sleep_binary(), &copy).unwrap();
    let child = spawn(Command::new(&copy).arg("30"));
    wait_until_exec(&child, "sleepy");
    std::fs::remove_file(&copy).unwrap();
    let w = pin_as(
        &child,
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let link = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
    assert!(link.to_string_lossy().ends_with(" (deleted)"), "{link:?}");

    let attestor = UnixAttestor::new(UnixAttestorConfig::default());
    let got = values(&attestor.attest(&w).unwrap());
    assert!(!got.iter().any(|v| v.starts_with("path:")), "{got:?}");
    assert!(
        got.contains(&format!("sha256:{}", sha256_hex(&sleep_binary()))),
        "{got:?}"
    );
    // Deleted executables are never cached.
    assert_eq!(attestor.hasher.cached_len(), 0);
    reap(child);
}

/// SECURITY.md §3.3 item 29: a new file renamed over the path after exec. The hash is
/// the running image's, and the path (whose inode is gone) no longer matches.
#[test]
fn file_renamed_over_the_path_does_not_change_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sleepy");
    std::fs::copy(sleep_binary(), &copy).unwrap();
    let child = spawn(Command::new(&copy).arg("30"));
    wait_until_exec(&child, "sleepy");
    let impostor = dir.path().join("impostor");
    std::fs::write(&impostor, b"#!/bin/sh\necho not the running image\n").unwrap();
    std::fs::rename(&impostor, &copy).unwrap();
    let w = pin_as(
        &child,
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let attestor = UnixAttestor::new(UnixAttestorConfig::default());
    let got = values(&attestor.attest(&w).unwrap());
    assert!(
        got.contains(&format!("sha256:{}", sha256_hex(&sleep_binary()))),
        "{got:?}"
    );
    assert!(
        !got.contains(&format!("sha256:{}", sha256_hex(&copy))),
        "{got:?}"
    );
    assert!(!got.iter().any(|v| v.starts_with("path:")), "{got:?}");
    reap(child);
}

#[test]
fn memfd_executable_has_a_hash_but_no_path() {
    let Ok(python) = which("python3") else {
        eprintln!("skipped: no python3");
        return;
    };
    let sleep = sleep_binary();
    let script = format!(
        "import os; fd = os.memfd_create('sleepy'); \
         os.write(fd, open('{}', 'rb').read()); \
         os.execve(fd, ['sleep', '30'], {{}})",
        sleep.display()
    );
    let child = spawn(Command::new(python).arg("-c").arg(script));
    wait_until_exec(&child, "/memfd:");
    let w = pin_as(
        &child,
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let attestor = UnixAttestor::new(UnixAttestorConfig::default());
    let got = values(&attestor.attest(&w).unwrap());
    assert!(!got.iter().any(|v| v.starts_with("path:")), "{got:?}");
    assert!(
        got.contains(&format!("sha256:{}", sha256_hex(&sleep))),
        "{got:?}"
    );
    reap(child);
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

#[test]
fn binary_over_the_limit_gets_no_hash_selector() {
    let child = spawn_sleep();
    let w = pin_as(
        &child,
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let size = std::fs::metadata(sleep_binary()).unwrap().len();

    let attestor = UnixAttestor::new(UnixAttestorConfig {
        max_binary_size: size - 1,
        ..Default::default()
    });
    let got = values(&attestor.attest(&w).unwrap());
    assert!(!got.iter().any(|v| v.starts_with("sha256:")), "{got:?}");
    assert!(got.iter().any(|v| v.starts_with("uid:")), "{got:?}");
    assert!(got.iter().any(|v| v.starts_with("path:")), "{got:?}");
    assert!(matches!(
        attestor.hasher.hash(&w, true),
        Err(AttestError::BinaryTooLarge { size: s, limit }) if (s, limit) == (size, size - 1)
    ));
    assert_eq!(attestor.hasher.cached_len(), 0);

    // Exactly at the limit is fine.
    let attestor = UnixAttestor::new(UnixAttestorConfig {
        max_binary_size: size,
        ..Default::default()
    });
    let got = values(&attestor.attest(&w).unwrap());
    assert!(got.iter().any(|v| v.starts_with("sha256:")));
    reap(child);
}

#[test]
fn zombie_fails_attestation() {
    let mut child = spawn_sleep();
    let w = pin_as(
        &child,
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    child.kill().unwrap();
    wait_dead(&w);
    // Still a zombie: /proc/<pid> exists, status is readable, exe is not.
    assert!(Path::new(&format!("/proc/{}/status", child.id())).exists());
    let attestor = UnixAttestor::new(UnixAttestorConfig::default());
    let err = attestor.attest(&w).unwrap_err();
    assert!(
        matches!(
            err,
            AttestError::Workload(WorkloadError::Io { .. } | WorkloadError::ProcessExited)
        ),
        "{err:?}"
    );
    child.wait().unwrap();
    // Reaped: still an error, and the pidfd says exited.
    assert!(!w.is_alive().unwrap());
    assert!(attestor.attest(&w).is_err());
}

#[test]
fn exited_process_is_not_alive_and_cannot_be_pinned() {
    let mut child = spawn(&mut Command::new("true"));
    let pid = i32::try_from(child.id()).unwrap();
    let pidfd = pidfd_open(pid).unwrap();
    child.wait().unwrap();
    assert!(matches!(
        Workload::pin(pid, 0, 0, pidfd, false, Path::new("/proc")),
        Err(WorkloadError::ProcessExited)
    ));

    let mut child = spawn_sleep();
    let w = pin_as(
        &child,
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    assert!(w.is_alive().unwrap());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!w.is_alive().unwrap());
}

/// Starts `unshare --mount <sleep> 30` and waits until it runs `sleep` in its new mount
/// namespace; `None` (with the reason printed) when `unshare` is missing or fails.
fn spawn_in_new_mount_namespace() -> Option<std::process::Child> {
    let Ok(unshare) = which("unshare") else {
        eprintln!("skipped: no unshare");
        return None;
    };
    let mut child = match Command::new(unshare)
        .arg("--mount")
        .arg(sleep_binary())
        .arg("30")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("skipped: cannot run unshare: {e}");
            return None;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            eprintln!("skipped: unshare --mount failed ({status}): {}", err.trim());
            return None;
        }
        let ns_differs = std::fs::read_link(format!("/proc/{}/ns/mnt", child.id())).ok()
            != std::fs::read_link("/proc/self/ns/mnt").ok();
        let runs_sleep = std::fs::read_link(format!("/proc/{}/exe", child.id()))
            .is_ok_and(|l| l.to_string_lossy().contains("sleep"));
        if ns_differs && runs_sleep {
            return Some(child);
        }
        assert!(Instant::now() < deadline, "unshare did not exec sleep");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SECURITY.md §3.3 item 36: the `exe` path of a process in another mount namespace is
/// a path in another filesystem view, so it yields no `path` selector; a process in the
/// agent's namespace running the same binary does get one. Hash and ids stay.
#[test]
fn other_mount_namespace_gets_no_path_selector() {
    let Some(other) = spawn_in_new_mount_namespace() else {
        return;
    };
    let same = spawn_sleep();
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let attestor = UnixAttestor::new(UnixAttestorConfig::default());
    let sleep = sleep_binary();
    let hash = format!("sha256:{}", sha256_hex(&sleep));

    let got = values(&attestor.attest(&pin_as(&other, uid, gid)).unwrap());
    assert!(!got.iter().any(|v| v.starts_with("path:")), "{got:?}");
    assert!(got.contains(&hash), "{got:?}");
    assert!(got.contains(&format!("uid:{uid}")), "{got:?}");
    assert!(got.contains(&format!("gid:{gid}")), "{got:?}");

    let got = values(&attestor.attest(&pin_as(&same, uid, gid)).unwrap());
    assert!(
        got.contains(&format!("path:{}", sleep.display())),
        "{got:?}"
    );
    assert!(got.contains(&hash), "{got:?}");
    reap(other);
    reap(same);
}

#[test]
fn exe_path_rules() {
    assert_eq!(exe_path(b"/usr/bin/x"), Some("/usr/bin/x"));
    assert_eq!(exe_path(b"/usr/bin/x (deleted)"), None);
    assert_eq!(exe_path(b"/memfd:x (deleted)"), None);
    assert_eq!(exe_path(b"/memfd:x"), None);
    assert_eq!(exe_path(b"relative"), None);
    assert_eq!(exe_path(b""), None);
    assert_eq!(exe_path(b"/usr/bin/\xff"), None);
}

#[test]
fn unrepresentable_values_are_left_out() {
    let mut out = Vec::new();
    push(&mut out, "path:/tmp/a\nb");
    push(&mut out, &format!("path:/{}", "a".repeat(2000)));
    assert!(out.is_empty());
    push(&mut out, "uid:0");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].to_string(), "unix:uid:0");
}
