//! The cgroup membership of a pinned process: a typed parse of `/proc/<pid>/cgroup`
//! ([`CgroupFile`]) for cgroup v1, v2 and hybrid hosts, and cgroup paths split by
//! component ([`CgroupPath`]).
//!
//! It owns the syntax only. Which selectors a path yields (a systemd unit, a container id)
//! is decided by the attestor plugins, always by whole path component and never by
//! substring (SECURITY.md §3.4 item 40).
//!
//! Format (see `cgroups(7)`): one line per hierarchy, `hierarchy-ID:controller-list:path`.
//! The cgroup v2 (unified) hierarchy is the line `0::<path>`; a v1 hierarchy has a
//! non-zero id and a comma-separated list of controllers and `name=` labels
//! (`9:name=systemd:/`). A hybrid host has both. The path is relative to the *reader's*
//! cgroup namespace: a process outside it shows leading `..` components
//! (`0::/../../kubepods/...`), which [`CgroupPath::is_namespace_relative`] flags; the
//! attestors refuse such paths rather than guess.
//!
//! The parser is strict, since a file that does not look like the kernel's may have been
//! forged or mangled: it rejects empty files, missing final newlines, duplicate
//! hierarchy ids, a controller in two hierarchies, empty, `.` or trailing components, and
//! `..` after a normal component. Cgroup names cannot contain a newline on current
//! kernels; the duplicate checks also catch a name that injects a fake line on old ones.

use std::fmt;

use crate::workload::{Workload, WorkloadError};

/// Largest `/proc/<pid>/cgroup` accepted, in bytes. Each line's path is at most
/// `PATH_MAX` (4096) bytes and a host has at most a few dozen hierarchies.
pub const CGROUP_FILE_LIMIT: usize = 64 * 1024;

/// Suffix the kernel appends to a cgroup v2 path whose cgroup was removed (seen for
/// exiting processes).
const DELETED_SUFFIX: &str = " (deleted)";

/// Why a cgroup file or path is not in the kernel's format. Messages never quote paths
/// (they are selector values, SECURITY.md §2 rule 10).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// The file has no lines.
    #[error("the cgroup file is empty")]
    Empty,
    /// The file is not UTF-8.
    #[error("the cgroup file is not UTF-8")]
    NotUtf8,
    /// The last line has no terminating newline (truncated).
    #[error("the cgroup file does not end with a newline")]
    Truncated,
    /// A line does not have the `id:controllers:path` shape.
    #[error("line {line} of the cgroup file is malformed: {reason}")]
    MalformedLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two lines have the same hierarchy id.
    #[error("hierarchy {0} appears twice in the cgroup file")]
    DuplicateHierarchy(u32),
    /// A controller (or `name=` label) appears in two hierarchies.
    #[error("a controller appears in two hierarchies of the cgroup file")]
    DuplicateController,
    /// A path is not absolute, or has an empty, `.`, or misplaced `..` component.
    #[error("malformed cgroup path: {0}")]
    MalformedPath(&'static str),
}

impl From<CgroupError> for WorkloadError {
    fn from(err: CgroupError) -> Self {
        WorkloadError::Malformed(format!("cgroup file ({err})"))
    }
}

/// Which cgroup hierarchies a process's file shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CgroupMode {
    /// Only v1 hierarchies (legacy hosts).
    V1,
    /// Only the unified `0::` line (pure cgroup v2).
    V2,
    /// v1 hierarchies and the unified line (hybrid hosts).
    Hybrid,
}

/// An absolute cgroup path as the kernel prints it, split by `/` into components.
///
/// `/` has no components. A path seen from another cgroup namespace starts with one or
/// more `..` components ([`Self::parent_components`]); `..` anywhere else, `.`, and empty
/// components (`//`, trailing `/`) are rejected, since the kernel never prints them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CgroupPath {
    text: String,
    parents: usize,
}

impl CgroupPath {
    /// Parses an absolute cgroup path.
    pub fn parse(text: &str) -> Result<Self, CgroupError> {
        let rest = text
            .strip_prefix('/')
            .ok_or(CgroupError::MalformedPath("not absolute"))?;
        let mut parents = 0;
        if !rest.is_empty() {
            let mut seen_normal = false;
            for component in rest.split('/') {
                match component {
                    "" => return Err(CgroupError::MalformedPath("empty component")),
                    "." => return Err(CgroupError::MalformedPath("`.` component")),
                    ".." if seen_normal => {
                        return Err(CgroupError::MalformedPath("`..` after a name"));
                    }
                    ".." => parents += 1,
                    _ => seen_normal = true,
                }
            }
        }
        Ok(Self {
            text: text.to_owned(),
            parents,
        })
    }

    /// The path exactly as the kernel printed it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True for `/` (the root of the reader's cgroup namespace).
    pub fn is_root(&self) -> bool {
        self.text == "/"
    }

    /// Every component in order, leading `..` included (none for `/`).
    pub fn components(&self) -> impl Iterator<Item = &str> + '_ {
        self.text
            .get(1..)
            .unwrap_or_default()
            .split('/')
            .filter(|c| !c.is_empty())
    }

    /// The number of leading `..` components: non-zero when the process's cgroup is
    /// outside the reader's cgroup namespace.
    pub fn parent_components(&self) -> usize {
        self.parents
    }

    /// True when the path is relative to the reader's cgroup namespace and leaves it
    /// (`/../..`): the absolute position of the cgroup is unknown.
    pub fn is_namespace_relative(&self) -> bool {
        self.parents > 0
    }

    /// True when the path ends with ` (deleted)`: either the kernel marked the cgroup
    /// as removed (an exiting process) or a cgroup is named that way. Ambiguous, so
    /// attestors treat it as a failure.
    pub fn maybe_deleted(&self) -> bool {
        self.text.ends_with(DELETED_SUFFIX)
    }

    /// The path made of the first `n` components (`/` for 0); `None` when there are
    /// fewer than `n` components.
    pub fn prefix(&self, n: usize) -> Option<String> {
        let components: Vec<&str> = self.components().take(n).collect();
        if components.len() < n {
            return None;
        }
        Some(format!("/{}", components.join("/")))
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One line of the cgroup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupEntry {
    /// The hierarchy id: 0 for the unified (v2) hierarchy.
    pub hierarchy_id: u32,
    /// The controllers and `name=` labels bound to the hierarchy (empty for v2).
    pub controllers: Vec<String>,
    /// The process's cgroup in that hierarchy.
    pub path: CgroupPath,
}

impl CgroupEntry {
    /// True for the unified (cgroup v2) line `0::<path>`.
    pub fn is_unified(&self) -> bool {
        self.hierarchy_id == 0
    }
}

/// The parsed `/proc/<pid>/cgroup` of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupFile {
    entries: Vec<CgroupEntry>,
}

impl CgroupFile {
    /// Reads and parses `cgroup` of the pinned process (at most [`CGROUP_FILE_LIMIT`]
    /// bytes, through the pinned directory fd). Read errors and a malformed file are
    /// errors.
    pub fn read(workload: &Workload) -> Result<Self, WorkloadError> {
        let bytes = workload.read_proc_file("cgroup", CGROUP_FILE_LIMIT)?;
        Ok(Self::parse(&bytes)?)
    }

    /// Parses the contents of a cgroup file.
    pub fn parse(bytes: &[u8]) -> Result<Self, CgroupError> {
        if bytes.is_empty() {
            return Err(CgroupError::Empty);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| CgroupError::NotUtf8)?;
        let body = text.strip_suffix('\n').ok_or(CgroupError::Truncated)?;
        let mut entries: Vec<CgroupEntry> = Vec::new();
        for (index, line) in body.split('\n').enumerate() {
            let entry = parse_line(line, index + 1)?;
            if entries.iter().any(|e| e.hierarchy_id == entry.hierarchy_id) {
                return Err(CgroupError::DuplicateHierarchy(entry.hierarchy_id));
            }
            if entry
                .controllers
                .iter()
                .any(|c| entries.iter().any(|e| e.controllers.contains(c)))
            {
                return Err(CgroupError::DuplicateController);
            }
            entries.push(entry);
        }
        Ok(Self { entries })
    }

    /// Every line, in file order.
    pub fn entries(&self) -> &[CgroupEntry] {
        &self.entries
    }

    /// Which hierarchies the file shows.
    pub fn mode(&self) -> CgroupMode {
        let unified = self.entries.iter().any(CgroupEntry::is_unified);
        let legacy = self.entries.iter().any(|e| !e.is_unified());
        match (unified, legacy) {
            (true, false) => CgroupMode::V2,
            (true, true) => CgroupMode::Hybrid,
            // `parse` refuses empty files, so this is v1 only.
            (false, _) => CgroupMode::V1,
        }
    }

    /// The path in the unified (v2) hierarchy, if the host has one.
    pub fn unified(&self) -> Option<&CgroupPath> {
        self.entries
            .iter()
            .find(|e| e.is_unified())
            .map(|e| &e.path)
    }

    /// The v1 hierarchy that has `controller` (e.g. `memory`, or `name=systemd` for
    /// systemd's legacy tracking hierarchy).
    pub fn hierarchy(&self, controller: &str) -> Option<&CgroupEntry> {
        self.entries
            .iter()
            .find(|e| e.controllers.iter().any(|c| c == controller))
    }

    /// The path systemd tracks the process by: the unified path when the host has a v2
    /// hierarchy (pure v2 and hybrid), else the `name=systemd` v1 hierarchy (legacy).
    pub fn systemd_path(&self) -> Option<&CgroupPath> {
        self.unified()
            .or_else(|| self.hierarchy("name=systemd").map(|e| &e.path))
    }

    /// Every path of every line, in file order.
    pub fn paths(&self) -> impl Iterator<Item = &CgroupPath> + '_ {
        self.entries.iter().map(|e| &e.path)
    }
}

fn parse_line(line: &str, number: usize) -> Result<CgroupEntry, CgroupError> {
    let malformed = |reason| CgroupError::MalformedLine {
        line: number,
        reason,
    };
    // The path may itself contain `:`: split at the first two only.
    let mut parts = line.splitn(3, ':');
    let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("expected id:controllers:path"));
    };
    if id.is_empty()
        || !id.bytes().all(|b| b.is_ascii_digit())
        || (id.len() > 1 && id.starts_with('0'))
    {
        return Err(malformed("hierarchy id is not a decimal number"));
    }
    let hierarchy_id: u32 = id
        .parse()
        .map_err(|_| malformed("hierarchy id is too large"))?;
    let controllers: Vec<String> = if controllers.is_empty() {
        Vec::new()
    } else {
        controllers
            .split(',')
            .map(|c| {
                if c.is_empty()
                    || c.bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                {
                    Err(malformed("empty or invalid controller name"))
                } else {
                    Ok(c.to_owned())
                }
            })
            .collect::<Result<_, _>>()?
    };
    if (hierarchy_id == 0) != controllers.is_empty() {
        return Err(malformed(
            "only hierarchy 0 (cgroup v2) has an empty controller list",
        ));
    }
    let mut seen = Vec::with_capacity(controllers.len());
    for c in &controllers {
        if seen.contains(&c) {
            return Err(CgroupError::DuplicateController);
        }
        seen.push(c);
    }
    let path = CgroupPath::parse(path).map_err(|err| match err {
        CgroupError::MalformedPath(reason) => malformed(reason),
        other => other,
    })?;
    Ok(CgroupEntry {
        hierarchy_id,
        controllers,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = "0::/system.slice/sshd.service\n";

    const HYBRID: &str = "\
12:pids:/system.slice/docker-0123.scope
11:cpu,cpuacct:/system.slice/docker-0123.scope
10:name=systemd:/system.slice/docker-0123.scope
0::/system.slice/docker-0123.scope
";

    const V1: &str = "\
9:name=systemd:/user.slice/user-1000.slice/session-2.scope
8:pids:/user.slice/user-1000.slice/session-2.scope
4:memory:/process_api/381d10e274e50363e527ad7375afa04a
1:cpu:/
";

    #[test]
    fn parses_pure_v2() {
        let f = CgroupFile::parse(V2.as_bytes()).unwrap();
        assert_eq!(f.mode(), CgroupMode::V2);
        assert_eq!(f.entries().len(), 1);
        let p = f.unified().unwrap();
        assert_eq!(p.as_str(), "/system.slice/sshd.service");
        assert_eq!(
            p.components().collect::<Vec<_>>(),
            ["system.slice", "sshd.service"]
        );
        assert!(!p.is_root() && !p.is_namespace_relative() && !p.maybe_deleted());
        assert_eq!(f.systemd_path(), Some(p));
        assert!(f.hierarchy("name=systemd").is_none());
    }

    #[test]
    fn parses_hybrid_and_v1() {
        let f = CgroupFile::parse(HYBRID.as_bytes()).unwrap();
        assert_eq!(f.mode(), CgroupMode::Hybrid);
        assert_eq!(f.entries().len(), 4);
        let cpu = f.hierarchy("cpuacct").unwrap();
        assert_eq!(cpu.hierarchy_id, 11);
        assert_eq!(cpu.controllers, ["cpu", "cpuacct"]);
        assert!(!cpu.is_unified());
        assert_eq!(
            f.unified().unwrap().as_str(),
            "/system.slice/docker-0123.scope"
        );
        assert_eq!(f.paths().count(), 4);

        let f = CgroupFile::parse(V1.as_bytes()).unwrap();
        assert_eq!(f.mode(), CgroupMode::V1);
        assert!(f.unified().is_none());
        assert_eq!(
            f.systemd_path().unwrap().as_str(),
            "/user.slice/user-1000.slice/session-2.scope"
        );
        assert!(f.hierarchy("cpu").unwrap().path.is_root());
    }

    #[test]
    fn root_has_no_components() {
        let f = CgroupFile::parse(b"0::/\n").unwrap();
        let p = f.unified().unwrap();
        assert!(p.is_root());
        assert_eq!(p.components().count(), 0);
        assert_eq!(p.prefix(0).unwrap(), "/");
        assert_eq!(p.prefix(1), None);
    }

    #[test]
    fn paths_may_contain_colons_and_spaces() {
        let f = CgroupFile::parse(
            b"0::/system.slice/containerd.service/kubepods-pod1.slice:cri-containerd:ab cd\n",
        )
        .unwrap();
        let p = f.unified().unwrap();
        assert_eq!(
            p.components().last().unwrap(),
            "kubepods-pod1.slice:cri-containerd:ab cd"
        );
        assert_eq!(p.prefix(2).unwrap(), "/system.slice/containerd.service");
    }

    #[test]
    fn namespace_relative_paths_are_flagged_by_component() {
        let p = CgroupPath::parse("/../../kubepods/pod1/abc").unwrap();
        assert!(p.is_namespace_relative());
        assert_eq!(p.parent_components(), 2);
        assert_eq!(
            p.components().collect::<Vec<_>>(),
            ["..", "..", "kubepods", "pod1", "abc"]
        );
        // `...` and `..x` are ordinary names, not parents.
        let p = CgroupPath::parse("/.../..x").unwrap();
        assert!(!p.is_namespace_relative());
        for bad in [
            "", "relative", "//", "/a//b", "/a/", "/./a", "/a/./b", "/a/../b", "/a/..",
        ] {
            assert!(CgroupPath::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deleted_suffix_is_flagged() {
        let f = CgroupFile::parse(b"0::/system.slice/x.service (deleted)\n").unwrap();
        assert!(f.unified().unwrap().maybe_deleted());
    }

    #[test]
    fn malformed_files_are_rejected() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"0::/\n\n", "blank line"),
            (b"0::/", "no final newline"),
            (b"\xff::/\n", "not utf-8"),
            (b"0:/\n", "two fields"),
            (b"x::/\n", "id not a number"),
            (b"-1::/\n", "negative id"),
            (b"+1:cpu:/\n", "signed id"),
            (b"01:cpu:/\n", "leading zero"),
            (b"99999999999:cpu:/\n", "id overflow"),
            (b"0:cpu:/\n", "v2 with controllers"),
            (b"3::/\n", "v1 without controllers"),
            (b"3:cpu,:/\n", "empty controller"),
            (b"3:cpu,cpu:/\n", "controller twice in a line"),
            (b"3:cpu:/\n4:cpu:/\n", "controller in two hierarchies"),
            (b"0::/a\n0::/b\n", "two unified lines"),
            (b"3:cpu:/\n3:memory:/\n", "hierarchy twice"),
            (b"0::relative\n", "relative path"),
            (b"0::/a/../b\n", "parent after a name"),
            (b"0::/a//b\n", "empty component"),
            (b"0::\n", "empty path"),
        ];
        for (input, what) in cases {
            assert!(CgroupFile::parse(input).is_err(), "{what}");
        }
        assert_eq!(CgroupFile::parse(b""), Err(CgroupError::Empty));
        assert_eq!(
            CgroupFile::parse(b"0::/\n0::/x\n"),
            Err(CgroupError::DuplicateHierarchy(0))
        );
    }

    #[test]
    fn errors_do_not_quote_paths() {
        let err = CgroupFile::parse(b"0::/secret-name/../x\n").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = WorkloadError::from(err);
        assert!(matches!(err, WorkloadError::Malformed(_)));
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn reads_a_real_process() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let pidfd = crate::workload::pidfd_open(pid).unwrap();
        let w = Workload::pin(pid, 0, 0, pidfd, false, std::path::Path::new("/proc")).unwrap();
        let parsed = CgroupFile::read(&w).unwrap();
        let direct =
            CgroupFile::parse(&std::fs::read(format!("/proc/{pid}/cgroup")).unwrap()).unwrap();
        assert_eq!(parsed, direct);
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
