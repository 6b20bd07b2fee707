//! A local out_dir that never follows a symbolic link below its root (issue 23): object_store's
//! `LocalFileSystem` does the I/O, behind a layer that checks every path first, and opening
//! the few files mla writes into an out_dir outside object_store (lock file, metrics).
//!
//! `LocalFileSystem` follows links everywhere: its listing walks into a linked directory and its
//! deletes then remove what the link points to, so `out_dir/step-00000001 -> /some/dir` made the
//! start-up clean-up of crashed saves empty `/some/dir`. Below the root, [`NoFollowFs`] treats a
//! link (or a FIFO, socket, device) as an opaque leaf object:
//! * **listed** at its own path, never descended into (no loops, no walk of `/`);
//! * **deleted** as the link itself (`unlink` never follows the last component);
//! * **never read**: a read of it, or of any path through a linked directory, is `NotFound`
//!   with the reason, so a linked manifest makes its step invisible, as a missing one does;
//! * **never written through**: a write whose parent directories include a link fails.
//!
//! The root itself may be a link (the user named it); it is resolved once, when opened.
//! The checks are `lstat`s of each component before the operation, not `openat` chains: they
//! stop links that are planted or left behind, not an adversary who can swap a directory for a
//! link in the instant between the check and the call (README "Security").
//!
//! Not here: the manifest protocol (`store.rs`), leases (`lease.rs`).

use std::io;
use std::path::{Component, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::{Path, PathPart};
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

const STORE: &str = "LocalFileSystem";

/// What an operation does with the last component of its path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    /// Read it: it must be a regular file (or missing: the read reports that).
    Read,
    /// Replace or remove the entry itself (rename onto it, unlink it): any kind will do.
    Replace,
}

/// Why a path is refused: the first component below the root that is not what it must be.
#[derive(Debug)]
struct Refused {
    path: PathBuf,
    what: &'static str,
    target: Option<PathBuf>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is {}", self.path.display(), self.what)?;
        if let Some(t) = &self.target {
            write!(f, " (to {})", t.display())?;
        }
        f.write_str(": mla never follows links in an out_dir (README \"Security\")")
    }
}

impl std::error::Error for Refused {}

/// The kind of a directory entry, from `lstat` (never following a link).
fn kind_of(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file (a FIFO, socket or device)"
    }
}

/// `LocalFileSystem` at `root` that never follows a link below `root` (module header).
#[derive(Debug, Clone)]
pub(crate) struct NoFollowFs {
    inner: LocalFileSystem,
    /// Canonical root (the out_dir with its own links resolved).
    root: PathBuf,
}

impl std::fmt::Display for NoFollowFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoFollow({})", self.inner)
    }
}

impl NoFollowFs {
    /// Open the existing directory `dir`.
    pub(crate) fn new(dir: &std::path::Path, fsync: bool) -> object_store::Result<Self> {
        let inner = LocalFileSystem::new_with_prefix(dir)?
            .with_automatic_cleanup(true)
            .with_fsync(fsync);
        let root = std::fs::canonicalize(dir).map_err(|source| object_store::Error::Generic {
            store: STORE,
            source: Box::new(source),
        })?;
        Ok(NoFollowFs { inner, root })
    }

    /// The file-system path of `location` after checking every component below the root: the
    /// parents must be real directories (or missing), the leaf as `leaf` says. Returns the
    /// path, or why it is refused.
    fn check(&self, location: &Path, leaf: Leaf) -> object_store::Result<Result<PathBuf, Refused>> {
        let full = self.inner.path_to_filesystem(location)?;
        let Ok(rel) = full.strip_prefix(&self.root) else {
            return Ok(Ok(full)); // not below the root: object_store refuses such paths anyway
        };
        let parts: Vec<Component<'_>> = rel.components().collect();
        let mut p = self.root.clone();
        for (i, part) in parts.iter().enumerate() {
            p.push(part);
            let last = i + 1 == parts.len();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                break; // missing from here on: the operation creates it or reports it missing
            };
            let refused = |what| Refused {
                target: m
                    .file_type()
                    .is_symlink()
                    .then(|| std::fs::read_link(&p).ok())
                    .flatten(),
                path: p.clone(),
                what,
            };
            if !last && !m.is_dir() {
                // `is_dir` of lstat is false for a link to a directory.
                return Ok(Err(refused(kind_of(&m))));
            }
            if last && leaf == Leaf::Read && !m.is_file() {
                return Ok(Err(refused(kind_of(&m))));
            }
        }
        Ok(Ok(full))
    }

    /// `check` for an operation that must not go ahead when refused: the refusal as
    /// `NotFound` (nothing of that name is inside the out_dir).
    fn checked(&self, location: &Path, leaf: Leaf) -> object_store::Result<PathBuf> {
        self.check(location, leaf)?
            .map_err(|refused| object_store::Error::NotFound {
                path: location.to_string(),
                source: Box::new(refused),
            })
    }

    /// `check` for a write: a refusal is an error that says why.
    fn checked_write(&self, location: &Path) -> object_store::Result<PathBuf> {
        self.check(location, Leaf::Replace)?
            .map_err(|refused| object_store::Error::Generic {
                store: STORE,
                source: Box::new(refused),
            })
    }

    /// Delete one object: the entry itself, whatever it is (a link is unlinked, never
    /// followed), except a real directory (not an object) or a path through a link
    /// (nothing of that name inside the out_dir): both `NotFound`.
    async fn delete_one(&self, location: Path) -> object_store::Result<Path> {
        let full = self.checked(&location, Leaf::Replace)?;
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: format!("{} is a directory, not an object", full.display()).into(),
            }),
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&full).unwrap_or_default();
                tracing::warn!(
                    "{} is a symbolic link in the out_dir (to {}): removed the link, not what it points to",
                    full.display(),
                    target.display()
                );
                self.inner.delete(&location).await.map(|()| location)
            }
            _ => self.inner.delete(&location).await.map(|()| location),
        }
    }

    /// Walk `start` (a real directory below the root) without following links: every
    /// non-directory entry as an object, staging files of uploads in progress left out.
    fn walk(
        root: &std::path::Path,
        start: PathBuf,
        prefix: Path,
    ) -> Vec<object_store::Result<ObjectMeta>> {
        let mut out = Vec::new();
        let mut dirs = vec![(start, prefix)];
        while let Some((dir, at)) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if dir == root || e.kind() != io::ErrorKind::NotFound => {
                    out.push(Err(io_error(&dir, e)));
                    continue;
                }
                Err(_) => continue, // removed while listing
            };
            for entry in entries {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        out.push(Err(io_error(&dir, e)));
                        continue;
                    }
                };
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    continue; // not UTF-8: no object mla writes has such a name
                };
                let location = at.clone().join(PathPart::from(name));
                // DirEntry::metadata is lstat: a link is described, not followed.
                let Ok(m) = entry.metadata() else {
                    continue; // removed while listing
                };
                if m.is_dir() {
                    dirs.push((entry.path(), location));
                } else if !is_staging_name(name) {
                    out.push(Ok(object_meta(location, &m)));
                }
            }
        }
        out
    }
}

fn io_error(path: &std::path::Path, e: io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: format!("listing {}: {e}", path.display()).into(),
    }
}

fn object_meta(location: Path, m: &std::fs::Metadata) -> ObjectMeta {
    use std::os::unix::fs::MetadataExt;
    let last_modified = m
        .modified()
        .map(chrono::DateTime::<chrono::Utc>::from)
        .unwrap_or_default();
    ObjectMeta {
        location,
        last_modified,
        size: m.len(),
        // As LocalFileSystem forms it: inode, modification time and size.
        e_tag: Some(format!(
            "{:x}-{:x}-{:x}",
            m.ino(),
            last_modified.timestamp_micros(),
            m.len()
        )),
        version: None,
    }
}

#[async_trait]
impl ObjectStore for NoFollowFs {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.checked_write(location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.checked_write(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.checked(location, Leaf::Read)?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.checked(location, Leaf::Read)?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let this = Arc::new(self.clone());
        locations
            .then(move |location| {
                let this = Arc::clone(&this);
                async move { this.delete_one(location?).await }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let prefix = prefix.cloned().unwrap_or_default();
        let start = if prefix.as_ref().is_empty() {
            Ok(Ok(self.root.clone()))
        } else {
            self.check(&prefix, Leaf::Replace)
        };
        let root = self.root.clone();
        let listed = async move {
            let start = match start {
                Ok(Ok(start)) => start,
                Ok(Err(_)) => return Vec::new(), // through a link: nothing of ours below it
                Err(e) => return vec![Err(e)],
            };
            match std::fs::symlink_metadata(&start) {
                Ok(m) if m.is_dir() => {}
                _ => return Vec::new(), // missing, a file or a link: no objects below it
            }
            if tokio::runtime::Handle::try_current().is_err() {
                return NoFollowFs::walk(&root, start, prefix);
            }
            tokio::task::spawn_blocking(move || NoFollowFs::walk(&root, start, prefix))
                .await
                .unwrap_or_else(|e| {
                    vec![Err(object_store::Error::Generic {
                        store: STORE,
                        source: Box::new(e),
                    })]
                })
        };
        stream::once(listed).flat_map(stream::iter).boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let prefix = prefix.cloned().unwrap_or_default();
        let start = if prefix.as_ref().is_empty() {
            self.root.clone()
        } else {
            match self.check(&prefix, Leaf::Replace)? {
                Ok(p) => p,
                Err(_) => return Ok(empty_listing()),
            }
        };
        let mut out = empty_listing();
        if !is_real_dir(&start) {
            return Ok(out); // missing, a file or a link: no objects below it
        }
        let Ok(entries) = std::fs::read_dir(&start) else {
            return Ok(out);
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(m) = entry.metadata() else { continue };
            let location = prefix.clone().join(PathPart::from(name));
            if m.is_dir() {
                out.common_prefixes.push(location);
            } else if !is_staging_name(name) {
                out.objects.push(object_meta(location, &m));
            }
        }
        Ok(out)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.checked(from, Leaf::Read)?;
        self.checked_write(to)?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.checked(from, Leaf::Replace)?;
        self.checked_write(to)?;
        self.inner.rename_opts(from, to, options).await
    }
}

fn empty_listing() -> ListResult {
    ListResult {
        common_prefixes: Vec::new(),
        objects: Vec::new(),
        extensions: Default::default(),
    }
}

/// How [`open_file`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read and write, created when missing, never truncated (the lock file).
    ReadWrite,
    /// Append, created when missing (metrics that a resumed run continues).
    Append,
    /// A new file; an existing entry of that name (a link included) is an error.
    CreateNew,
}

/// Open `dir/name` (`name` one plain component) without following a link at `name`, and
/// refuse anything but a regular file there: a link planted at `out_dir/.mla-lock` or
/// `out_dir/metrics.jsonl` must not make mla truncate or append to what it points to.
/// `dir` itself must be a real directory when it is below an out_dir (see [`create_dir`]).
/// Every error names the file.
pub fn open_file(dir: &std::path::Path, name: &str, mode: OpenMode) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    let path = dir.join(name);
    let mut o = std::fs::OpenOptions::new();
    match mode {
        OpenMode::ReadWrite => o.read(true).write(true).create(true),
        OpenMode::Append => o.append(true).create(true),
        OpenMode::CreateNew => o.write(true).create_new(true),
    };
    // O_NOFOLLOW: a link as the last component fails with ELOOP instead of being followed;
    // O_NONBLOCK: a FIFO planted there does not hang the open (refused just below).
    let file = match o
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            let target = std::fs::read_link(&path).unwrap_or_default();
            return Err(io::Error::other(format!(
                "{} is a symbolic link (to {}): mla never follows links in an out_dir; remove it",
                path.display(),
                target.display()
            )));
        }
        Err(e) => {
            // A FIFO without a reader refuses a non-blocking writer (ENXIO): say what it is.
            return Err(match std::fs::symlink_metadata(&path) {
                Ok(m) if !m.is_file() => not_regular(&path, &m),
                _ => named(&path, e),
            });
        }
    };
    let m = file.metadata().map_err(|e| named(&path, e))?;
    if !m.is_file() {
        return Err(not_regular(&path, &m));
    }
    // Back to blocking I/O for the regular file.
    set_blocking(&file).map_err(|e| named(&path, e))?;
    Ok(file)
}

/// `e` with the file it is about, as the message's first words.
fn named(path: &std::path::Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn not_regular(path: &std::path::Path, m: &std::fs::Metadata) -> io::Error {
    io::Error::other(format!(
        "{} is {}, not a file mla wrote; remove it",
        path.display(),
        kind_of(m)
    ))
}

fn set_blocking(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Create the directory `dir/name` when missing (`name` one plain component) and refuse one
/// that is a link or not a directory: what mla then writes below it stays inside `dir`.
pub fn create_dir(dir: &std::path::Path, name: &str) -> io::Result<PathBuf> {
    let path = dir.join(name);
    match std::fs::create_dir(&path) {
        Ok(()) => return Ok(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(&path)?;
    if m.is_dir() {
        return Ok(path);
    }
    let target = m
        .file_type()
        .is_symlink()
        .then(|| std::fs::read_link(&path).ok())
        .flatten();
    Err(io::Error::other(
        Refused {
            path,
            what: kind_of(&m),
            target,
        }
        .to_string(),
    ))
}

/// Whether `path` is a real directory (not a link to one).
pub(crate) fn is_real_dir(path: &std::path::Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Remove the object_store staging files (`<name>#<digits>`) under `dir`, recursively;
/// returns how many. object_store's local backend writes every upload to such a file and
/// renames it into place, so one whose writer died stays forever, invisible to listings.
/// Links are never followed (`DirEntry::file_type` does not follow them); `dir` itself must
/// be a real directory (callers check).
pub(crate) fn remove_staging_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if kind.is_dir() {
            removed += remove_staging_files(&entry.path());
        } else if kind.is_file()
            && is_staging_name(&name)
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

pub(crate) fn is_staging_name(name: &str) -> bool {
    matches!(name.rsplit_once('#'), Some((base, n)) if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn open_file_refuses_links_and_fifos_and_leaves_their_targets_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        symlink(&victim, out.join(".mla-lock")).unwrap();
        for mode in [OpenMode::ReadWrite, OpenMode::Append, OpenMode::CreateNew] {
            let e = open_file(&out, ".mla-lock", mode).unwrap_err().to_string();
            assert!(
                e.contains("symbolic link") || e.contains("exists"),
                "{mode:?}: {e}"
            );
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let fifo = out.join("metrics.jsonl");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_file(&out, "metrics.jsonl", OpenMode::Append)
            .unwrap_err()
            .to_string();
        assert!(e.contains("FIFO"), "{e}");
        let mut f = open_file(&out, "new.txt", OpenMode::Append).unwrap();
        std::io::Write::write_all(&mut f, b"ok").unwrap();
        assert_eq!(std::fs::read(out.join("new.txt")).unwrap(), b"ok");
        assert!(open_file(&out, "../x", OpenMode::Append).is_err());
    }

    #[test]
    fn create_dir_refuses_a_link_to_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert!(create_dir(&out, "tensorboard").unwrap().is_dir());
        assert!(
            create_dir(&out, "tensorboard").is_ok(),
            "an existing directory is fine"
        );
        symlink(&elsewhere, out.join("logs")).unwrap();
        let e = create_dir(&out, "logs").unwrap_err().to_string();
        assert!(
            e.contains("symbolic link") && e.contains("elsewhere"),
            "{e}"
        );
    }

    #[test]
    fn staging_names_are_told_from_object_names() {
        for name in ["model.safetensors#1", "state.json#123"] {
            assert!(is_staging_name(name), "{name}");
        }
        for name in ["model.safetensors", "a#b", "#1", "x#", "x#1a"] {
            assert!(!is_staging_name(name), "{name}");
        }
    }
}
