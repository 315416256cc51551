//! The `cgroups` setting of the `ebpf` receiver: each entry, a cgroup v2 path or a container id,
//! resolved to the cgroup id the kernel side compares and the level (depth below the hierarchy's
//! root) it sits at.
//!
//! The kernel matches a task when its ancestor at one of the configured levels
//! (`bpf_get_current_ancestor_cgroup_id`) is a configured id, so a cgroup's descendants are
//! watched too (a container's processes often sit in sub-cgroups). A cgroup v2 directory's inode
//! number is its cgroup id. Levels are counted from the hierarchy's root as the mount table
//! shows it, so tailweave must run in the host's cgroup namespace (as it must run in the host's
//! pid namespace for `pids`).

use std::io;
use std::path::{Component, Path, PathBuf};

/// Deepest level the kernel side checks (`MAX_CGROUP_LEVEL` in the C source).
pub const MAX_LEVEL: u32 = 31;
/// Directories a container-id search visits at most, and how deep it goes.
const SEARCH_MAX_DIRS: usize = 100_000;
const SEARCH_MAX_DEPTH: usize = 12;

/// A resolved `cgroups` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// The cgroup id (the directory's inode number).
    pub id: u64,
    /// Depth below the hierarchy's root (the root is 0).
    pub level: u32,
    pub path: PathBuf,
}

/// A cgroup v2 mount: where it is mounted and which directory of the hierarchy it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The mount's root within the hierarchy (`/` unless a sub-tree is bind-mounted).
    pub root: PathBuf,
    pub point: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("reading the mount table: {0}")]
    MountTable(io::Error),
    #[error("cgroup {path}: {source}")]
    Missing { path: PathBuf, source: io::Error },
    #[error("{path} is not a cgroup v2 directory (cgroup v2 is mounted at {mounts})")]
    NotCgroup2 { path: PathBuf, mounts: String },
    #[error("cgroup {path} is {level} levels deep; at most {MAX_LEVEL} are supported")]
    TooDeep { path: PathBuf, level: u32 },
    #[error("no cgroup named after container id {id} under {mounts}")]
    NoContainer { id: String, mounts: String },
    #[error("container id {id} names several cgroups: {paths}")]
    Ambiguous { id: String, paths: String },
}

/// Is the entry a container id (12 to 64 hex digits) rather than a path?
pub fn is_container_id(entry: &str) -> bool {
    (12..=64).contains(&entry.len()) && entry.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A problem with an entry that needs no look at the host (pure), for `validate_settings`.
pub fn check_entry(entry: &str) -> Option<String> {
    if entry.is_empty() {
        return Some("empty: give a cgroup v2 path or a container id".into());
    }
    if entry.contains('\0') {
        return Some("contains a NUL byte".into());
    }
    if Path::new(entry)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Some(format!("{entry:?}: `..` is not allowed in a cgroup path"));
    }
    None
}

/// The cgroup v2 mounts in `/proc/self/mountinfo` text.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = left.split_whitespace();
            let root = f.nth(3)?;
            let point = f.next()?;
            Some(Mount {
                root: PathBuf::from(unescape(root)),
                point: PathBuf::from(unescape(point)),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host's cgroup v2 mounts.
pub fn host_mounts() -> Result<Vec<Mount>, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountTable)?;
    let mounts = cgroup2_mounts(&text);
    if mounts.is_empty() {
        return Err(CgroupError::NoCgroup2);
    }
    Ok(mounts)
}

fn mount_list(mounts: &[Mount]) -> String {
    mounts
        .iter()
        .map(|m| m.point.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves one entry against the given cgroup v2 mounts: an absolute path must lie on one of
/// them, a relative path is taken below the first, a container id is searched for in all.
pub fn resolve(entry: &str, mounts: &[Mount]) -> Result<Cgroup, CgroupError> {
    let first = mounts.first().ok_or(CgroupError::NoCgroup2)?;
    if is_container_id(entry) {
        return find_container(entry, mounts);
    }
    let path = if Path::new(entry).is_absolute() {
        PathBuf::from(entry)
    } else {
        first.point.join(entry)
    };
    at_path(&path, mounts)
}

/// Resolves every entry on this host; each error is paired with the entry's index.
pub fn resolve_all(entries: &[String]) -> Vec<(usize, Result<Cgroup, CgroupError>)> {
    if entries.is_empty() {
        return Vec::new();
    }
    match host_mounts() {
        Ok(mounts) => entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, resolve(e, &mounts)))
            .collect(),
        // Every entry fails alike; io::Error is not Clone, so each gets its own copy.
        Err(e) => (0..entries.len())
            .map(|i| {
                let e = match &e {
                    CgroupError::MountTable(io) => {
                        CgroupError::MountTable(io::Error::new(io.kind(), io.to_string()))
                    }
                    _ => CgroupError::NoCgroup2,
                };
                (i, Err(e))
            })
            .collect(),
    }
}

fn at_path(path: &Path, mounts: &[Mount]) -> Result<Cgroup, CgroupError> {
    let real = std::fs::canonicalize(path).map_err(|source| CgroupError::Missing {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = std::fs::metadata(&real).map_err(|source| CgroupError::Missing {
        path: path.to_path_buf(),
        source,
    })?;
    // The deepest mount point the path lies under (mounts can nest).
    let mount = mounts
        .iter()
        .filter_map(|m| {
            let point = std::fs::canonicalize(&m.point).unwrap_or_else(|_| m.point.clone());
            let rel = real.strip_prefix(&point).ok()?.to_path_buf();
            Some((m, rel))
        })
        .max_by_key(|(_, rel)| std::cmp::Reverse(rel.components().count()));
    let Some((mount, rel)) = mount.filter(|_| meta.is_dir()) else {
        return Err(CgroupError::NotCgroup2 {
            path: path.to_path_buf(),
            mounts: mount_list(mounts),
        });
    };
    let level = depth(&mount.root) + depth(&rel);
    if level > MAX_LEVEL {
        return Err(CgroupError::TooDeep {
            path: path.to_path_buf(),
            level,
        });
    }
    Ok(Cgroup {
        id: inode(&meta),
        level,
        path: real,
    })
}

fn depth(p: &Path) -> u32 {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count() as u32
}

#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_meta: &std::fs::Metadata) -> u64 {
    0
}

/// Container runtimes name a container's cgroup after its id (`docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `libpod-<id>`, or the bare id); a short id matches as a prefix
/// of the full one. The shallowest match wins (runtimes nest sub-cgroups inside); two at the
/// same depth are ambiguous.
fn find_container(id: &str, mounts: &[Mount]) -> Result<Cgroup, CgroupError> {
    let id_lower = id.to_ascii_lowercase();
    let mut found: Vec<(usize, PathBuf)> = Vec::new();
    let mut visited = 0usize;
    for m in mounts {
        let mut stack = vec![(m.point.clone(), 0usize)];
        while let Some((dir, d)) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for ent in rd.flatten() {
                if visited >= SEARCH_MAX_DIRS {
                    break;
                }
                if !ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    continue;
                }
                visited += 1;
                let name = ent.file_name().to_string_lossy().to_ascii_lowercase();
                let p = ent.path();
                if names_container(&name, &id_lower) {
                    found.push((d + 1, p));
                } else if d + 1 < SEARCH_MAX_DEPTH {
                    stack.push((p, d + 1));
                }
            }
        }
    }
    let Some(min) = found.iter().map(|(d, _)| *d).min() else {
        return Err(CgroupError::NoContainer {
            id: id.to_string(),
            mounts: mount_list(mounts),
        });
    };
    let mut best: Vec<PathBuf> = found
        .into_iter()
        .filter(|(d, _)| *d == min)
        .map(|(_, p)| p)
        .collect();
    if best.len() > 1 {
        best.sort();
        return Err(CgroupError::Ambiguous {
            id: id.to_string(),
            paths: best
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    at_path(&best[0], mounts)
}

/// Does a cgroup directory name carry this id as a whole hex word (the bare id, or a prefix of
/// the hex run after a `-`)?
fn names_container(name: &str, id: &str) -> bool {
    name.split(['-', '.', ':'])
        .any(|word| word.len() >= id.len() && word.starts_with(id) && is_container_id(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
37 35 0:32 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
90 30 0:31 /kubepods /var/lib/my\\040cgroups rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_mounts_and_their_roots() {
        let m = cgroup2_mounts(MOUNTINFO);
        assert_eq!(
            m,
            [
                Mount {
                    root: "/".into(),
                    point: "/sys/fs/cgroup/unified".into()
                },
                Mount {
                    root: "/kubepods".into(),
                    point: "/var/lib/my cgroups".into()
                },
            ]
        );
        assert!(cgroup2_mounts("garbage\n\n1 2 3 - cgroup2").is_empty());
    }

    #[test]
    fn entries_checked_without_the_host() {
        assert!(check_entry("").is_some());
        assert!(check_entry("/sys/fs/cgroup/../etc").is_some());
        assert!(check_entry("system.slice/nginx.service").is_none());
        assert!(is_container_id("0123456789ab"));
        assert!(!is_container_id("0123456789a"));
        assert!(!is_container_id("system.slice"));
        assert!(names_container(
            "docker-0123456789abcdef.scope",
            "0123456789ab"
        ));
        assert!(names_container("0123456789abcdef", "0123456789abcdef"));
        assert!(!names_container(
            "docker-ff0123456789abcdef.scope",
            "0123456789ab"
        ));
        assert!(!names_container("0123456789ab-x", "0123456789abcdef"));
    }

    /// A scratch directory removed on drop (the crate has no tempfile dependency).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "tw-cgroup-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A directory tree standing in for a cgroup v2 mount.
    fn fake_mount(root: &str) -> (TempDir, Vec<Mount>) {
        let dir = TempDir::new();
        let mounts = vec![Mount {
            root: root.into(),
            point: dir.path().to_path_buf(),
        }];
        (dir, mounts)
    }

    #[test]
    fn paths_resolve_to_inode_and_level() {
        let (dir, mounts) = fake_mount("/");
        let leaf = dir.path().join("system.slice/nginx.service");
        std::fs::create_dir_all(&leaf).unwrap();
        let by_rel = resolve("system.slice/nginx.service", &mounts).unwrap();
        let by_abs = resolve(leaf.to_str().unwrap(), &mounts).unwrap();
        assert_eq!(by_rel, by_abs);
        assert_eq!(by_rel.level, 2);
        assert_eq!(by_rel.id, inode(&std::fs::metadata(&leaf).unwrap()));
        assert_eq!(
            resolve(dir.path().to_str().unwrap(), &mounts)
                .unwrap()
                .level,
            0
        );
        // A bind-mounted sub-tree counts from the hierarchy's root.
        let (dir2, mounts2) = fake_mount("/kubepods/burstable");
        std::fs::create_dir(dir2.path().join("pod1")).unwrap();
        assert_eq!(resolve("pod1", &mounts2).unwrap().level, 3);

        let err = resolve("system.slice/missing.service", &mounts).unwrap_err();
        assert!(matches!(err, CgroupError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("missing.service"), "{err}");
        let outside = TempDir::new();
        let err = resolve(outside.path().to_str().unwrap(), &mounts).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        let err = resolve("cgroup.procs", &mounts).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
        assert!(matches!(resolve("x", &[]), Err(CgroupError::NoCgroup2)));
    }

    #[test]
    fn container_ids_resolve_to_the_shallowest_match() {
        let (dir, mounts) = fake_mount("/");
        let full = "4f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c";
        let scope = dir.path().join(format!("system.slice/docker-{full}.scope"));
        std::fs::create_dir_all(scope.join(full)).unwrap();
        std::fs::create_dir_all(dir.path().join("user.slice/other")).unwrap();
        let got = resolve(&full[..12], &mounts).unwrap();
        assert_eq!(got.path, std::fs::canonicalize(&scope).unwrap());
        assert_eq!(got.level, 2);
        assert_eq!(resolve(full, &mounts).unwrap().path, got.path);
        let err = resolve("aaaaaaaaaaaa", &mounts).unwrap_err();
        assert!(matches!(err, CgroupError::NoContainer { .. }), "{err}");
        std::fs::create_dir_all(
            dir.path()
                .join(format!("kubepods/cri-containerd-{full}.scope")),
        )
        .unwrap();
        let err = resolve(&full[..12], &mounts).unwrap_err();
        assert!(matches!(err, CgroupError::Ambiguous { .. }), "{err}");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\999"), "\\999");
    }
}
