//! The members of a `.tar.gz` input, read in order with memory bounded by a few fixed caps.
//!
//! The `tar` crate's own iterator reads a GNU long name (`L`), long link (`K`) or PAX header
//! (`x`) into memory whole, at the size the archive declares (issue 23: a 14 MB archive whose
//! long name claimed 3 GB ran out of memory). Here headers are decoded with the crate's
//! [`tar::Header`], but these extension bodies are read only when they declare at most
//! [`MAX_NAME_BYTES`] (names) or [`MAX_PAX_BYTES`] (PAX records); member bodies are streamed.
//! Names follow the crate's rules: a GNU long name, else a PAX `path`, else the header's
//! (ustar prefix included); a PAX `size` overrides the next header's, and the extended sparse
//! headers of a GNU sparse member are stepped over.
//!
//! Byte offsets in errors count the decompressed tar stream.
//!
//! Not here: which members are data files, decompression (see `input`), writing archives.

use std::io::{self, Read};

/// Longest GNU long name or long link accepted, in bytes (Linux's PATH_MAX is 4096).
pub(crate) const MAX_NAME_BYTES: u64 = 8 << 10;
/// Longest PAX extended header accepted, in bytes (its records: a path, times, xattrs).
pub(crate) const MAX_PAX_BYTES: u64 = 1 << 20;

const BLOCK: u64 = 512;

/// One member's header, after any extension headers were applied to it.
#[derive(Debug)]
pub(crate) struct Member {
    /// Its name, lossily UTF-8, as `tar::Entry::path` gives it.
    pub name: String,
    pub kind: tar::EntryType,
}

/// The members of a tar stream, one at a time; [`Members::body`] reads the current one's.
pub(crate) struct Members<R> {
    inner: R,
    /// Bytes read from `inner` so far: the offset named in errors.
    offset: u64,
    /// Unread bytes of the current member's body, and the padding after it.
    body_left: u64,
    padding: u64,
    done: bool,
}

/// Extension headers seen for the member that follows them.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: bool,
    pax: Option<Vec<u8>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && !self.long_link && self.pax.is_none()
    }
}

fn bad(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<R: Read> Members<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            body_left: 0,
            padding: 0,
            done: false,
        }
    }

    /// The next member (the rest of the current one's body is skipped), or None at the end of
    /// the archive (two zero blocks, or the end of the stream at a header).
    pub(crate) fn next_member(&mut self) -> io::Result<Option<Member>> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.body_left + self.padding)?;
        self.body_left = 0;
        self.padding = 0;
        let mut pending = Pending::default();
        loop {
            let at = self.offset;
            let mut header = tar::Header::new_old();
            if !self.read_block(header.as_mut_bytes())? || header.as_bytes().iter().all(|&b| b == 0)
            {
                self.done = true;
                if !pending.is_empty() {
                    return Err(bad(format!(
                        "tar extension header before byte offset {at} describes a member \
                         that is not there"
                    )));
                }
                return Ok(None);
            }
            check_sum(&header, at)?;
            let kind = header.entry_type();
            let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
            let mut size = header
                .entry_size()
                .map_err(|e| bad(format!("tar header at byte offset {at}: {e}")))?;
            let extension = recognized
                && (kind.is_gnu_longname()
                    || kind.is_gnu_longlink()
                    || kind.is_pax_local_extensions());
            // As the crate: a PAX size describes the next member, not an extension header.
            let extension_type = kind.is_gnu_longname()
                || kind.is_gnu_longlink()
                || kind.is_pax_local_extensions()
                || kind.is_pax_global_extensions();
            if !extension_type {
                if let Some(pax_size) = pending.pax.as_deref().and_then(pax_size) {
                    size = pax_size;
                }
            }
            let what = if kind.is_gnu_longname() {
                "GNU long name"
            } else if kind.is_gnu_longlink() {
                "GNU long link"
            } else {
                "PAX extended header"
            };
            if extension {
                let (max, twice) = if kind.is_gnu_longname() {
                    (MAX_NAME_BYTES, pending.long_name.is_some())
                } else if kind.is_gnu_longlink() {
                    (MAX_NAME_BYTES, pending.long_link)
                } else {
                    (MAX_PAX_BYTES, pending.pax.is_some())
                };
                if twice {
                    return Err(bad(format!(
                        "tar header at byte offset {at}: a second {what} for the same member"
                    )));
                }
                if size > max {
                    return Err(bad(format!(
                        "tar header at byte offset {at}: {what} of {size} bytes (mla reads at \
                         most {max})"
                    )));
                }
                let mut body = vec![0; size as usize];
                self.read_exact(&mut body)?;
                self.skip(padding_of(size))?;
                if kind.is_gnu_longname() {
                    pending.long_name = Some(body);
                } else if kind.is_gnu_longlink() {
                    pending.long_link = true;
                } else {
                    pending.pax = Some(body);
                }
                continue;
            }
            // GNU sparse members list more of their map in blocks before their data.
            if header
                .as_gnu()
                .is_some_and(|g| kind.is_gnu_sparse() && g.is_extended())
            {
                let mut ext = [0u8; BLOCK as usize];
                loop {
                    if !self.read_block(&mut ext)? {
                        return Err(eof(self.offset));
                    }
                    // `isextended` of a GnuExtSparseHeader: after 21 entries of 24 bytes.
                    if ext[504] != 1 {
                        break;
                    }
                }
            }
            let name = match (&pending.long_name, &pending.pax) {
                (Some(long), _) => long.strip_suffix(&[0]).unwrap_or(long).to_vec(),
                (None, Some(pax)) => {
                    pax_path(pax).unwrap_or_else(|| header.path_bytes().into_owned())
                }
                (None, None) => header.path_bytes().into_owned(),
            };
            self.body_left = size;
            self.padding = padding_of(size);
            return Ok(Some(Member {
                name: String::from_utf8_lossy(&name).into_owned(),
                kind,
            }));
        }
    }

    /// The current member's body (what [`Members::next_member`] returned last).
    pub(crate) fn body(&mut self) -> Body<'_, R> {
        Body { members: self }
    }

    /// Fill a whole block; false when the stream ended before its first byte.
    fn read_block(&mut self, block: &mut [u8]) -> io::Result<bool> {
        let mut got = 0;
        while got < block.len() {
            match self.inner.read(&mut block[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(eof(self.offset)),
                Ok(n) => {
                    got += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() || self.read_block(buf)? {
            Ok(())
        } else {
            Err(eof(self.offset))
        }
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.offset += copied;
        if copied < n {
            return Err(eof(self.offset));
        }
        Ok(())
    }
}

/// The body of the current member; ends where the member does.
pub(crate) struct Body<'a, R> {
    members: &'a mut Members<R>,
}

impl<R: Read> Read for Body<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let m = &mut *self.members;
        let want = buf
            .len()
            .min(usize::try_from(m.body_left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = m.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(eof(m.offset));
        }
        m.offset += n as u64;
        m.body_left -= n as u64;
        Ok(n)
    }
}

fn eof(offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the archive ends inside a member, at byte offset {offset}"),
    )
}

fn padding_of(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// The header checksum, as tar computes it (the checksum field counted as spaces).
fn check_sum(header: &tar::Header, at: u64) -> io::Result<()> {
    let bytes = header.as_bytes();
    let sum = bytes[..148]
        .iter()
        .chain(&bytes[156..])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + 8 * 32;
    match header.cksum() {
        Ok(stored) if stored == sum => Ok(()),
        _ => Err(bad(format!(
            "tar header at byte offset {at}: checksum mismatch (not a tar archive, or corrupt)"
        ))),
    }
}

/// The PAX `path` record, as `tar::Entry::path` reads it.
fn pax_path(pax: &[u8]) -> Option<Vec<u8>> {
    tar::PaxExtensions::new(pax)
        .filter_map(|r| r.ok())
        .find(|r| r.key_bytes() == b"path")
        .map(|r| r.value_bytes().to_vec())
}

/// The PAX `size` record, as the `tar` crate reads it (none once a record does not parse).
fn pax_size(pax: &[u8]) -> Option<u64> {
    for record in tar::PaxExtensions::new(pax) {
        let record = record.ok()?;
        if record.key() != Ok("size") {
            continue;
        }
        return record.value().ok()?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 512-byte block of a header of `kind` named `name` (truncated to 100 bytes, as a raw
    /// name field holds it) declaring `size`, with its checksum.
    fn header(name: &[u8], kind: tar::EntryType, size: u64, ustar: bool) -> tar::Header {
        let mut h = if ustar {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_gnu()
        };
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_cksum();
        h
    }

    /// One PAX record: `LEN key=value\n`, LEN counting the whole record.
    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    /// Appends headers and bodies, padding each body to a block.
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn put(&mut self, h: &tar::Header, body: &[u8]) -> &mut Self {
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(body);
            self.0
                .resize(self.0.len() + padding_of(body.len() as u64) as usize, 0);
            self
        }

        fn member(&mut self, name: &str, body: &[u8]) -> &mut Self {
            let h = header(
                name.as_bytes(),
                tar::EntryType::Regular,
                body.len() as u64,
                false,
            );
            self.put(&h, body)
        }

        fn pax(&mut self, records: &[(&str, &str)], global: bool) -> &mut Self {
            let body: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
            let kind = if global {
                tar::EntryType::XGlobalHeader
            } else {
                tar::EntryType::XHeader
            };
            let h = header(b"././@PaxHeader", kind, body.len() as u64, true);
            self.put(&h, &body)
        }

        fn end(&mut self) -> Vec<u8> {
            self.0.resize(self.0.len() + 1024, 0);
            std::mem::take(&mut self.0)
        }
    }

    /// (name, is a regular file, body) of every member, as read here.
    fn ours(bytes: &[u8]) -> io::Result<Vec<(String, bool, Vec<u8>)>> {
        let mut members = Members::new(bytes);
        let mut out = Vec::new();
        while let Some(m) = members.next_member()? {
            let mut body = Vec::new();
            members.body().read_to_end(&mut body)?;
            out.push((m.name, m.kind.is_file(), body));
        }
        Ok(out)
    }

    /// The same, as the `tar` crate's own iterator reads it.
    fn theirs(bytes: &[u8]) -> io::Result<Vec<(String, bool, Vec<u8>)>> {
        let mut archive = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let name = entry.path()?.to_string_lossy().into_owned();
            let file = entry.header().entry_type().is_file();
            let mut body = Vec::new();
            entry.read_to_end(&mut body)?;
            out.push((name, file, body));
        }
        Ok(out)
    }

    #[test]
    fn member_names_and_bodies_are_the_tar_crates() {
        let long = format!("{}data00.json", "deep/".repeat(40));
        let link_target = "t/".repeat(80);
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |h: &mut tar::Header, name: &str, body: &[u8]| {
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            builder.append_data(h, name, body).unwrap();
        };
        add(&mut tar::Header::new_gnu(), "a.txt", b"one");
        // A GNU long name (`L`) and a ustar name split into prefix and name.
        add(&mut tar::Header::new_gnu(), &long, b"[{\"story\":\"x\"}]");
        add(&mut tar::Header::new_ustar(), &long, b"two");
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        add(&mut dir, "sub/", b"");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "sub/link.txt", &link_target)
            .unwrap();
        let mut bytes = builder.into_inner().unwrap();
        bytes.truncate(bytes.len() - 1024); // the end marker: more members follow
        let mut raw = Raw(bytes);
        // A PAX path, a PAX size over a size field of 0 (as Python writes members of 8 GiB and
        // more), a PAX global header, an empty member.
        raw.pax(&[("path", "pax/named/b.jsonl"), ("mtime", "1.5")], false)
            .member("short", b"{\"text\":\"b\"}\n")
            .pax(&[("size", "700")], false)
            .put(
                &header(b"sized.txt", tar::EntryType::Regular, 0, true),
                &[b'z'; 700],
            )
            .pax(&[("comment", "global")], true)
            .member("empty.txt", b"");
        // A GNU sparse member whose map continues in an extended block before its data.
        let mut sparse = header(b"holes.bin", tar::EntryType::GNUSparse, 512, false);
        let gnu = sparse.as_gnu_mut().unwrap();
        gnu.sparse[0].offset.copy_from_slice(b"00000000000\0");
        gnu.sparse[0].numbytes.copy_from_slice(b"00000001000\0");
        gnu.realsize.copy_from_slice(b"00000001000\0");
        gnu.isextended[0] = 1;
        sparse.set_cksum();
        raw.0.extend_from_slice(sparse.as_bytes());
        raw.0.extend_from_slice(&[0; 512]); // the extended block: no more entries, not extended
        raw.0.extend_from_slice(&[b's'; 512]);
        raw.member("last.txt", b"three");
        let bytes = raw.end();

        let want = theirs(&bytes).unwrap();
        let names: Vec<&str> = want.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "a.txt",
                long.as_str(),
                long.as_str(),
                "sub/",
                "sub/link.txt",
                "pax/named/b.jsonl",
                "sized.txt",
                "././@PaxHeader",
                "empty.txt",
                "holes.bin",
                "last.txt"
            ]
        );
        assert_eq!(want[6].2.len(), 700);
        let got = ours(&bytes).unwrap();
        // The sparse member's body is the crate's expanded file; its name, kind and the members
        // after it are what matter here (it is no regular file, so never read as data).
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!((&g.0, g.1), (&w.0, w.1), "member {i}");
            if w.0 != "holes.bin" {
                assert_eq!(g.2, w.2, "member {i} ({})", w.0);
            }
        }
    }

    #[test]
    fn extension_headers_declaring_more_than_their_cap_are_refused_unread() {
        for (kind, max, what) in [
            (tar::EntryType::GNULongName, MAX_NAME_BYTES, "GNU long name"),
            (tar::EntryType::GNULongLink, MAX_NAME_BYTES, "GNU long link"),
            (
                tar::EntryType::XHeader,
                MAX_PAX_BYTES,
                "PAX extended header",
            ),
        ] {
            // The cap itself passes (the member it names follows).
            let mut ok = Raw::default();
            let body = vec![b'n'; max as usize];
            ok.put(&header(b"././@LongLink", kind, max, false), &body)
                .member("a.txt", b"x");
            let got = ours(&ok.end()).unwrap();
            assert_eq!(got.len(), 1, "{what}");
            // 3 GB declared, 64 KiB present: the header alone is read, then refused.
            let mut raw = Raw::default();
            raw.put(&header(b"././@LongLink", kind, 3_000_000_000, false), &[]);
            raw.0.extend_from_slice(&[b'n'; 64 << 10]);
            let mut members = Members::new(&raw.0[..]);
            let e = members.next_member().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert_eq!(
                e.to_string(),
                format!(
                    "tar header at byte offset 0: {what} of 3000000000 bytes (mla reads at most \
                     {max})"
                )
            );
            assert_eq!(members.offset, BLOCK, "{what}: read past its header");
        }
    }

    #[test]
    fn a_cut_or_corrupt_archive_is_an_error_never_a_short_member() {
        let mut raw = Raw::default();
        raw.member("a.txt", &[b'a'; 1000]);
        let bytes = raw.end();
        let e = ours(&bytes[..700]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        let e = ours(&bad).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        // An extension header with no member after it.
        let mut raw = Raw::default();
        raw.pax(&[("path", "x.txt")], false);
        let e = ours(&raw.end()).unwrap_err();
        assert!(e.to_string().contains("describes a member"), "{e}");
    }
}
