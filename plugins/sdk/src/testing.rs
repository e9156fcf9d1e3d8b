//! Test support shared by the plugins' tests (compiled only with the `testing` feature,
//! which the plugins enable in their `[dev-dependencies]`): real child processes pinned
//! as [`Workload`]s, fake proc roots, the fixture `expected` files, and cgroups created
//! in the real unified hierarchy.
//!
//! Every helper panics on failure: a broken fixture is a failed test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::selector::Selector;
use crate::workload::{Workload, pidfd_open};

/// The `sleep` binary, with symlinks resolved (what `/proc/<pid>/exe` will name).
pub fn sleep_binary() -> PathBuf {
    std::fs::canonicalize("/usr/bin/sleep")
        .or_else(|_| std::fs::canonicalize("/bin/sleep"))
        .unwrap()
}

/// Spawns `cmd` with stdin from `/dev/null`, retrying while the kernel says ETXTBSY (a
/// freshly written binary can still be open for writing in a sibling test's forked
/// child).
pub fn spawn(cmd: &mut Command) -> Child {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cmd.stdin(Stdio::null()).spawn() {
            Ok(child) => return child,
            Err(e)
                if e.raw_os_error() == Some(Errno::ETXTBSY as i32) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawn: {e}"),
        }
    }
}

/// Waits until the `exe` link of `child` names `expected_exe` (`spawn` can return
/// before the kernel has switched the link and the command name).
pub fn wait_until_exec(child: &Child, expected_exe: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let link = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
        if link.to_string_lossy().contains(expected_exe) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "child did not exec {expected_exe}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns `sleep 30` and waits until the exec is complete.
pub fn spawn_sleep() -> Child {
    let child = spawn(Command::new(sleep_binary()).arg("30"));
    wait_until_exec(&child, "sleep");
    child
}

/// Kills `child` (if it still runs) and reaps it.
pub fn reap(mut child: Child) {
    let _ = child.kill();
    child.wait().unwrap();
}

fn pin_with(child: &Child, uid: u32, gid: u32, proc_root: &Path) -> Workload {
    let pid = i32::try_from(child.id()).unwrap();
    let pidfd = pidfd_open(pid).unwrap();
    Workload::pin(pid, uid, gid, pidfd, false, proc_root).unwrap()
}

/// Pins `child` with the peer credentials `uid`/`gid`, through the real `/proc`.
pub fn pin_as(child: &Child, uid: u32, gid: u32) -> Workload {
    pin_with(child, uid, gid, Path::new("/proc"))
}

/// Pins `child` (peer credentials root:root) with `proc_root` as the procfs mount.
pub fn pin(child: &Child, proc_root: &Path) -> Workload {
    pin_with(child, 0, 0, proc_root)
}

/// A proc root whose `<pid of child>/cgroup` is `contents`.
pub fn fake_proc(child: &Child, contents: &[u8]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(child.id().to_string());
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("cgroup"), contents).unwrap();
    root
}

/// The selectors as `kind:value` strings.
pub fn strings(selectors: &[Selector]) -> Vec<String> {
    selectors.iter().map(ToString::to_string).collect()
}

/// The fixture cases: the entries of `dir`, sorted.
pub fn fixture_cases(dir: &Path) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    cases
}

/// The `expected` file of a fixture case without comments and blank lines:
/// `Ok(selectors)`, or `Err(error text)` for a first line `error: <text>`.
pub fn expected(case: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(case.join("expected")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    if let Some(err) = lines.first().and_then(|l| l.strip_prefix("error: ")) {
        return Err(err.to_owned());
    }
    Ok(lines.iter().map(|l| (*l).to_owned()).collect())
}

/// Nested directories created in the unified cgroup hierarchy for one test, removed
/// (deepest first) on drop. Names starting with `tessera-` get the test process's pid,
/// so parallel runs do not collide.
#[derive(Debug)]
pub struct TestCgroup {
    dirs: Vec<PathBuf>,
    names: Vec<String>,
}

impl TestCgroup {
    /// Creates `names` as nested cgroups below the cgroup2 mount, or `None` when not
    /// root, there is no cgroup2 mount, or it is not writable.
    pub fn create(names: &[&str]) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let mount = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| {
                nix::sys::statfs::statfs(p)
                    .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            })?;
        let pid = std::process::id();
        let mut dir = mount;
        let mut me = Self {
            dirs: Vec::new(),
            names: Vec::new(),
        };
        for name in names {
            let name = name.replacen("tessera-", &format!("tessera{pid}-"), 1);
            dir = dir.join(&name);
            std::fs::create_dir(&dir).ok()?;
            me.dirs.push(dir.clone());
            me.names.push(name);
        }
        Some(me)
    }

    /// The directory of the cgroup at `level` (0 is the outermost).
    pub fn dir(&self, level: usize) -> &Path {
        &self.dirs[level]
    }

    /// The name of the cgroup at `level`, as created.
    pub fn name(&self, level: usize) -> &str {
        &self.names[level]
    }

    /// The path of the deepest cgroup relative to the mount, as `/proc/<pid>/cgroup`
    /// shows it.
    pub fn path(&self) -> String {
        self.names.iter().map(|n| format!("/{n}")).collect()
    }

    /// Moves `child` into the deepest cgroup.
    pub fn add(&self, child: &Child) {
        let procs = self.dirs.last().unwrap().join("cgroup.procs");
        std::fs::write(procs, child.id().to_string()).unwrap();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
