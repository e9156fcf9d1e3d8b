//! Which systemd units a cgroup path names, decided by whole path component the way
//! systemd's own `cg_path_get_unit()` / `cg_path_get_user_unit()` do.
//!
//! The system unit is the first component after the leading chain of `.slice`
//! components; everything below a unit's cgroup belongs to that unit (a service with
//! `Delegate=yes` can create sub-cgroups with any name there), so deeper components are
//! never read as system units. Below `user@<uid>.service` the same rule gives the user
//! manager's slices and unit. Each component is first unescaped as systemd's
//! `cg_unescape()` does (one leading `_` dropped); unit-name escaping such as `\x2d` is
//! part of the unit name and kept.

use tessera_plugin_sdk::cgroup::CgroupPath;

/// Longest unit name (`UNIT_NAME_MAX` minus the NUL).
const UNIT_NAME_MAX: usize = 255;

/// Unit types that own cgroups with processes in them (slices hold only other cgroups).
const PROCESS_UNIT_SUFFIXES: &[&str] = &[".service", ".scope", ".socket", ".mount", ".swap"];

/// The systemd view of one cgroup path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Units {
    /// Innermost slice of the leading slice chain (`-.slice` when the unit is directly
    /// below the root).
    pub(crate) slice: String,
    /// The system manager's unit.
    pub(crate) unit: String,
    /// How many path components lead to the unit's own cgroup (it included).
    pub(crate) unit_depth: usize,
    /// The user manager's unit, for processes below `user@<uid>.service`.
    pub(crate) user_unit: Option<String>,
}

/// The units of `path`, or `None` when it is not inside a systemd unit (e.g. `/`,
/// `/docker/<id>`, a process directly in a slice).
pub(crate) fn units(path: &CgroupPath) -> Option<Units> {
    let components: Vec<&str> = path.components().map(cg_unescape).collect();
    let (slice, unit_index) = skip_slices(&components, 0);
    let unit = components
        .get(unit_index)
        .copied()
        .filter(|c| is_process_unit(c))?;
    let user_unit = if is_user_manager(unit) {
        let (_, user_index) = skip_slices(&components, unit_index + 1);
        components
            .get(user_index)
            .copied()
            .filter(|c| is_process_unit(c))
            .map(str::to_owned)
    } else {
        None
    };
    Some(Units {
        slice: slice.to_owned(),
        unit: unit.to_owned(),
        unit_depth: unit_index + 1,
        user_unit,
    })
}

/// From `start`, skips `.slice` components; returns the innermost one (`-.slice` when
/// none) and the index of the first component that is not a slice.
fn skip_slices<'a>(components: &[&'a str], start: usize) -> (&'a str, usize) {
    let mut slice = "-.slice";
    let mut index = start;
    while let Some(&c) = components.get(index) {
        if !is_slice(c) {
            break;
        }
        slice = c;
        index += 1;
    }
    (slice, index)
}

/// systemd's `cg_unescape()`: a component that could clash with a kernel file name or
/// starts with `_` was created with one extra leading `_`.
fn cg_unescape(component: &str) -> &str {
    component.strip_prefix('_').unwrap_or(component)
}

fn is_slice(name: &str) -> bool {
    is_unit_name(name) && name.ends_with(".slice")
}

fn is_process_unit(name: &str) -> bool {
    is_unit_name(name) && PROCESS_UNIT_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// `user@<uid>.service`, the per-user service manager (a system unit).
fn is_user_manager(name: &str) -> bool {
    name.strip_prefix("user@")
        .and_then(|rest| rest.strip_suffix(".service"))
        .is_some_and(|uid| {
            !uid.is_empty()
                && uid.bytes().all(|b| b.is_ascii_digit())
                && (uid == "0" || !uid.starts_with('0'))
                && uid.parse::<u32>().is_ok()
        })
}

/// systemd's `unit_name_is_valid()` for plain and instance names (not templates):
/// 1-255 bytes of `[A-Za-z0-9:_.\-\\@]`, a non-empty prefix, a suffix after the last
/// `.`, at most one `@`, and a non-empty instance after it.
fn is_unit_name(name: &str) -> bool {
    if name.is_empty() || name.len() > UNIT_NAME_MAX {
        return false;
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-' | b'\\' | b'@'))
    {
        return false;
    }
    let Some((stem, suffix)) = name.rsplit_once('.') else {
        return false;
    };
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_lowercase()) {
        return false;
    }
    match stem.split_once('@') {
        None => !stem.is_empty(),
        Some((prefix, instance)) => {
            !prefix.is_empty() && !instance.is_empty() && !instance.contains('@')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(path: &str) -> Option<Units> {
        units(&CgroupPath::parse(path).unwrap())
    }

    #[test]
    fn system_units() {
        let u = of("/system.slice/nginx.service").unwrap();
        assert_eq!(
            u,
            Units {
                slice: "system.slice".into(),
                unit: "nginx.service".into(),
                unit_depth: 2,
                user_unit: None
            }
        );
        let u = of("/init.scope").unwrap();
        assert_eq!(
            (u.slice.as_str(), u.unit.as_str()),
            ("-.slice", "init.scope")
        );
        let u = of("/system.slice/system-getty.slice/getty@tty1.service").unwrap();
        assert_eq!(u.slice, "system-getty.slice");
        assert_eq!(u.unit, "getty@tty1.service");
        assert_eq!(u.unit_depth, 3);
        let u = of("/system.slice/foo\\x2dbar.service").unwrap();
        assert_eq!(u.unit, "foo\\x2dbar.service");
        let u = of("/user.slice/user-1000.slice/session-2.scope").unwrap();
        assert_eq!(
            (u.slice.as_str(), u.unit.as_str()),
            ("user-1000.slice", "session-2.scope")
        );
    }

    #[test]
    fn delegated_subtrees_are_not_units() {
        // A delegated service's sub-cgroups, named like units, stay part of the service.
        let u = of("/system.slice/app.service/sshd.service/payload").unwrap();
        assert_eq!(u.unit, "app.service");
        assert_eq!(u.unit_depth, 2);
        assert_eq!(u.user_unit, None);
        let u = of("/system.slice/docker-abc.scope/system.slice/nginx.service").unwrap();
        assert_eq!(u.unit, "docker-abc.scope");
    }

    #[test]
    fn user_units() {
        let u = of(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-research\\x2dbot.service",
        )
        .unwrap();
        assert_eq!(u.slice, "user-1000.slice");
        assert_eq!(u.unit, "user@1000.service");
        assert_eq!(u.unit_depth, 3);
        assert_eq!(u.user_unit.as_deref(), Some("app-research\\x2dbot.service"));
        let u = of("/user.slice/user-1000.slice/user@1000.service/init.scope").unwrap();
        assert_eq!(u.user_unit.as_deref(), Some("init.scope"));
        // The user manager's own sub-cgroups below its unit are not read as user units.
        let u = of("/user.slice/user-1000.slice/user@1000.service/app.slice/a.service/b.service")
            .unwrap();
        assert_eq!(u.user_unit.as_deref(), Some("a.service"));
        // Not a user manager: `user@x.service`, `user@01.service`.
        for p in [
            "/user.slice/user@x.service/app.slice/a.service",
            "/user.slice/user@01.service/app.slice/a.service",
        ] {
            assert_eq!(of(p).unwrap().user_unit, None, "{p}");
        }
    }

    #[test]
    fn cg_escaped_components_are_unescaped() {
        let u = of("/system.slice/_cpu.service").unwrap();
        assert_eq!(u.unit, "cpu.service");
        let u = of("/system.slice/__x.service").unwrap();
        assert_eq!(u.unit, "_x.service");
    }

    #[test]
    fn not_in_a_unit() {
        for p in [
            "/",
            "/system.slice",
            "/docker/0123",
            "/kubepods/besteffort/pod1/abc",
            "/system.slice/nginx",
            "/system.slice/nginx.target",
            "/system.slice/@x.service",
            "/system.slice/a@.service",
            "/system.slice/a@b@c.service",
            "/system.slice/a b.service",
            "/system.slice/.service",
            "/system.slice/x.Service",
        ] {
            assert_eq!(of(p), None, "{p}");
        }
        let long = format!("/{}.service", "a".repeat(250));
        assert_eq!(of(&long), None);
        let ok = format!("/{}.service", "a".repeat(247));
        assert!(of(&ok).is_some());
    }
}
