//! Process housekeeping: pid file, privilege dropping and the open files
//! limit.

use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

/// A pid file, removed when dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's id to `path`.
    pub fn create(path: &Path) -> Result<PidFile, String> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    /// Removes the file unless another process (a successor after a live
    /// takeover) has written its own id into it since.
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|s| s.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Resolved `proc-user` / `proc-group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: Option<Uid>,
    pub gid: Option<Gid>,
}

/// Looks up `proc-user` and `proc-group` (names or numbers). A user without
/// a group runs with the user's primary group. A number needs no passwd
/// entry (a `FROM scratch` image has no `/etc/passwd`): without one, the
/// group is `proc-group`, else the same number.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Identity, String> {
    let user: Option<(Uid, Option<Gid>)> = match user {
        None => None,
        Some(u) => Some(match u.parse::<u32>() {
            // No entry, or no passwd file at all (ENOENT): the number as is.
            Ok(n) => match User::from_uid(Uid::from_raw(n)) {
                Ok(Some(entry)) => (entry.uid, Some(entry.gid)),
                _ => (Uid::from_raw(n), None),
            },
            Err(_) => {
                let entry = User::from_name(u)
                    .map_err(|e| format!("proc-user {u}: {e}"))?
                    .ok_or_else(|| format!("proc-user: no user named '{u}'"))?;
                (entry.uid, Some(entry.gid))
            }
        }),
    };
    let gid = match group {
        Some(g) => Some(match g.parse::<u32>() {
            Ok(n) => Gid::from_raw(n),
            Err(_) => {
                Group::from_name(g)
                    .map_err(|e| format!("proc-group {g}: {e}"))?
                    .ok_or_else(|| format!("proc-group: no group named '{g}'"))?
                    .gid
            }
        }),
        None => user.map(|(uid, gid)| gid.unwrap_or(Gid::from_raw(uid.as_raw()))),
    };
    Ok(Identity {
        uid: user.map(|(uid, _)| uid),
        gid,
    })
}

/// Switches to `id` for good: supplementary groups, group, then user. Call
/// after every port is bound and every key read, before any thread starts.
pub fn drop_privileges(id: Identity) -> Result<(), String> {
    if let Some(gid) = id.gid
        && gid != nix::unistd::getegid()
    {
        nix::unistd::setgroups(&[gid])
            .map_err(|e| format!("cannot drop supplementary groups: {e}"))?;
        nix::unistd::setgid(gid).map_err(|e| format!("cannot switch to group {gid}: {e}"))?;
    }
    if let Some(uid) = id.uid
        && uid != nix::unistd::geteuid()
    {
        nix::unistd::setuid(uid).map_err(|e| format!("cannot switch to user {uid}: {e}"))?;
        // Make sure there is no way back.
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() && !uid.is_root() {
            return Err("privileges could be regained after dropping them".to_string());
        }
    }
    Ok(())
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit,
/// as coturn does at start. Every UDP allocation holds a relay socket and
/// every TCP or TLS client a connection, so a shell's usual soft limit of
/// 1024 would turn Allocates into 508 after about a thousand of them,
/// whatever the hard limit allows. (The systemd unit sets both limits with
/// `LimitNOFILE`.) An unlimited hard limit is taken as the kernel's
/// ceiling, `/proc/sys/fs/nr_open`. Returns the soft limit before and
/// after, in open files.
///
/// # Errors
/// The `getrlimit`/`setrlimit` error; the limit is then left as it was.
pub fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = hard.min(ceiling);
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    Ok((soft, target.max(soft)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers() {
        let root = resolve(Some("root"), None).unwrap();
        assert_eq!(root.uid, Some(Uid::from_raw(0)));
        assert_eq!(root.gid, Some(Gid::from_raw(0)));
        assert_eq!(resolve(Some("0"), Some("0")).unwrap(), root);
        // A number without a passwd entry: that user, the same group number.
        let nobody = resolve(Some("4000123"), None).unwrap();
        assert_eq!(nobody.uid, Some(Uid::from_raw(4000123)));
        assert_eq!(nobody.gid, Some(Gid::from_raw(4000123)));
        let with_group = resolve(Some("4000123"), Some("65534")).unwrap();
        assert_eq!(with_group.gid, Some(Gid::from_raw(65534)));
        assert!(
            resolve(Some("no-such-user-here"), None)
                .unwrap_err()
                .contains("no user named")
        );
        assert!(
            resolve(None, Some("no-such-group-here"))
                .unwrap_err()
                .contains("no group named")
        );
        assert_eq!(
            resolve(None, None).unwrap(),
            Identity {
                uid: None,
                gid: None
            }
        );
    }

    #[test]
    fn pid_file_is_written_and_removed() {
        let path = std::env::temp_dir().join(format!("turnserver-pid-{}", std::process::id()));
        let pid = PidFile::create(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(pid);
        assert!(!path.exists());
    }
}
