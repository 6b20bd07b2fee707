//! Where prepared datasets live: two small traits, [`ShardSink`] (write objects) and
//! [`ShardSource`] (read them, with random access for the loader), and [`LocalDir`], the
//! local-directory implementation of both.
//!
//! Not here: object stores (`remote.rs` implements both traits over the storage crate, against
//! the contract written on each method).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::DataError;

/// Destination of a prepared dataset. Objects are flat names (`index.json`, `train-00000.bin`).
pub trait ShardSink: Send + Sync {
    /// Store `bytes` as `name`, replacing any previous object. Atomic: a reader sees the old
    /// object, no object, or all of the new one, never a prefix.
    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), DataError>;
    /// Whether `name` exists.
    fn exists(&self, name: &str) -> Result<bool, DataError>;
    /// Delete `name`; deleting a missing object is not an error.
    fn remove(&self, name: &str) -> Result<(), DataError>;
    /// Where `name` is (a path or URL), for messages.
    fn location(&self, name: &str) -> PathBuf;
}

/// Random access to one stored object.
pub trait RandomAccess: Send + Sync {
    /// Object size in bytes.
    fn len(&self) -> u64;
    /// Whether the object is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from `offset`; reading past the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DataError>;
    /// sha256 of the whole object, lowercase hex. The default reads it in 1 MiB pieces; remote
    /// objects stream it in one request (and may remember it per object version).
    fn sha256(&self) -> Result<String, DataError> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < self.len() {
            let n = (self.len() - offset).min(buf.len() as u64) as usize;
            self.read_exact_at(&mut buf[..n], offset)?;
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        Ok(hex::encode(hasher.finalize()))
    }
    /// True when every read is a network round trip: callers with several independent reads
    /// (the windows of a micro-batch) should issue them concurrently.
    fn latency_bound(&self) -> bool {
        false
    }
}

/// Source of a prepared dataset.
pub trait ShardSource: Send + Sync {
    /// The whole object (used for the index).
    fn read(&self, name: &str) -> Result<Vec<u8>, DataError>;
    /// Random access to an object (used for shards).
    fn open(&self, name: &str) -> Result<Box<dyn RandomAccess>, DataError>;
    /// Where `name` is (a path or URL), for messages.
    fn location(&self, name: &str) -> PathBuf;
}

/// A dataset in a local directory: one file per object.
#[derive(Clone, Debug)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl ShardSink for LocalDir {
    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), DataError> {
        std::fs::create_dir_all(&self.root).map_err(|e| DataError::io(&self.root, e))?;
        let path = self.root.join(name);
        let tmp = self.root.join(format!(".{name}.partial"));
        let write = || -> std::io::Result<()> {
            // A new file, never through an entry of that name left or planted there.
            let _ = std::fs::remove_file(&tmp);
            let mut f = File::options().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            DataError::io(&path, e)
        })
    }

    fn exists(&self, name: &str) -> Result<bool, DataError> {
        let path = self.root.join(name);
        path.try_exists().map_err(|e| DataError::io(path, e))
    }

    fn remove(&self, name: &str) -> Result<(), DataError> {
        let path = self.root.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataError::io(path, e)),
            _ => Ok(()),
        }
    }

    fn location(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

struct LocalFile {
    file: File,
    len: u64,
    path: PathBuf,
}

impl RandomAccess for LocalFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DataError> {
        read_exact_at(&self.file, buf, offset).map_err(|e| DataError::io(&self.path, e))
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

impl ShardSource for LocalDir {
    fn read(&self, name: &str) -> Result<Vec<u8>, DataError> {
        let path = self.root.join(name);
        std::fs::read(&path).map_err(|e| DataError::io(path, e))
    }

    fn open(&self, name: &str) -> Result<Box<dyn RandomAccess>, DataError> {
        let path = self.root.join(name);
        let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let len = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
        Ok(Box::new(LocalFile { file, len, path }))
    }

    fn location(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_dir_put_is_visible_whole_and_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path().join("sub"));
        store.put("a.bin", b"hello").unwrap();
        store.put("a.bin", b"world!").unwrap();
        assert_eq!(ShardSource::read(&store, "a.bin").unwrap(), b"world!");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["a.bin"]);
        let f = store.open("a.bin").unwrap();
        let mut buf = [0u8; 3];
        f.read_exact_at(&mut buf, 2).unwrap();
        assert_eq!(&buf, b"rld");
        assert!(f.read_exact_at(&mut buf, 5).is_err());
        store.remove("a.bin").unwrap();
        store.remove("a.bin").unwrap();
        assert!(!store.exists("a.bin").unwrap());
    }
}
