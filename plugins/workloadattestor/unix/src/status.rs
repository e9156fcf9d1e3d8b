//! Parsing the credential lines (`Uid:`, `Gid:`, `Groups:`) of `/proc/<pid>/status`.
//! Every other line is ignored; a missing, repeated or malformed credential line fails.

use tessera_plugin_sdk::WorkloadError;

/// The credentials of a process as the kernel reports them in `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatusCreds {
    /// Effective uid (second field of `Uid:`).
    pub(crate) euid: u32,
    /// Effective gid (second field of `Gid:`).
    pub(crate) egid: u32,
    /// Supplementary gids (`Groups:`), sorted and deduplicated.
    pub(crate) groups: Vec<u32>,
}

fn malformed(what: &str) -> WorkloadError {
    WorkloadError::Malformed(format!("status ({what})"))
}

/// Parses the `Uid:`/`Gid:` line value: real, effective, saved, filesystem.
fn parse_ids(value: &str, what: &str) -> Result<u32, WorkloadError> {
    let ids = value
        .split_ascii_whitespace()
        .map(|f| f.parse::<u32>().map_err(|_| malformed(what)))
        .collect::<Result<Vec<_>, _>>()?;
    match ids.as_slice() {
        [_real, effective, _saved, _fs] => Ok(*effective),
        _ => Err(malformed(what)),
    }
}

pub(crate) fn parse_status(status: &[u8]) -> Result<StatusCreds, WorkloadError> {
    let mut euid = None;
    let mut egid = None;
    let mut groups = None;
    for line in status.split(|&b| b == b'\n') {
        let (slot, what) = if line.starts_with(b"Uid:") {
            (0, "Uid")
        } else if line.starts_with(b"Gid:") {
            (1, "Gid")
        } else if line.starts_with(b"Groups:") {
            (2, "Groups")
        } else {
            continue;
        };
        let value = line.get(what.len() + 1..).unwrap_or_default();
        let value = std::str::from_utf8(value).map_err(|_| malformed(what))?;
        match slot {
            0 => {
                if euid.replace(parse_ids(value, what)?).is_some() {
                    return Err(malformed("repeated Uid"));
                }
            }
            1 => {
                if egid.replace(parse_ids(value, what)?).is_some() {
                    return Err(malformed("repeated Gid"));
                }
            }
            _ => {
                let mut gids = value
                    .split_ascii_whitespace()
                    .map(|f| f.parse::<u32>().map_err(|_| malformed(what)))
                    .collect::<Result<Vec<_>, _>>()?;
                gids.sort_unstable();
                gids.dedup();
                if groups.replace(gids).is_some() {
                    return Err(malformed("repeated Groups"));
                }
            }
        }
    }
    Ok(StatusCreds {
        euid: euid.ok_or_else(|| malformed("no Uid"))?,
        egid: egid.ok_or_else(|| malformed("no Gid"))?,
        groups: groups.ok_or_else(|| malformed("no Groups"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &[u8] = b"Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\n\
        Uid:\t1000\t1001\t1002\t1003\nGid:\t100\t101\t102\t103\nFDSize:\t64\n\
        Groups:\t27 4 27 100 \nNStgid:\t42\n";

    #[test]
    fn parses_real_layout() {
        let c = parse_status(REAL).unwrap();
        assert_eq!(c.euid, 1001);
        assert_eq!(c.egid, 101);
        assert_eq!(c.groups, vec![4, 27, 100]);
    }

    #[test]
    fn empty_groups_and_non_utf8_name() {
        let s = b"Name:\t\xff\xfe\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        let c = parse_status(s).unwrap();
        assert_eq!((c.euid, c.egid), (0, 0));
        assert!(c.groups.is_empty());
    }

    #[test]
    fn rejects_malformed() {
        let cases: &[&[u8]] = &[
            b"",
            b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n",
            b"Uid:\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n",
            b"Uid:\t0\tx\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n",
            b"Uid:\t0\t0\t0\t0\nUid:\t1\t1\t1\t1\nGid:\t0\t0\t0\t0\nGroups:\t\n",
            b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t1\nGroups:\t2\n",
            b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t-1\n",
            b"Uid:\t0\t4294967296\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n",
        ];
        for case in cases {
            assert!(
                parse_status(case).is_err(),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
    }
}
