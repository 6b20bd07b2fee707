//! Just enough of Thrift's compact protocol to read the sizes in a Parquet page header before
//! the `parquet` crate does: the crate allocates a page's declared compressed and uncompressed
//! sizes (up to 2 GiB each) before reading it, so `parquet.rs` walks a column chunk's headers
//! with this first and refuses sizes past its limits.
//!
//! Reference: the Thrift compact protocol spec (thrift/doc/specs/thrift-compact-protocol.md) and
//! `PageHeader` in parquet-format's `parquet.thrift`. Every length read is checked against the
//! bytes the caller allows before anything is skipped; nothing is allocated from a length.
//!
//! Not here: the file footer (the crate reads and checks it), writing Thrift.

use std::io::{self, Read};

/// Field and element types of the compact protocol.
const BOOL_TRUE: u8 = 1;
const BOOL_FALSE: u8 = 2;
const BYTE: u8 = 3;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const DOUBLE: u8 = 7;
const BINARY: u8 = 8;
const LIST: u8 = 9;
const SET: u8 = 10;
const MAP: u8 = 11;
const STRUCT: u8 = 12;
const UUID: u8 = 13;

/// Nesting deeper than this is refused (a page header nests three levels).
const MAX_DEPTH: u32 = 32;

/// What `parquet.rs` needs of a `PageHeader`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageHeader {
    /// `PageType`: 0 data, 1 index, 2 dictionary, 3 data v2.
    pub kind: i32,
    pub uncompressed_size: i32,
    pub compressed_size: i32,
    /// The values' `Encoding` of a data page (v1 or v2).
    pub encoding: Option<i32>,
    /// Bytes the header itself takes.
    pub header_bytes: u64,
}

/// A compact-protocol reader that fails past `limit` bytes.
pub(crate) struct Compact<R> {
    inner: R,
    read: u64,
    limit: u64,
}

fn bad(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<R: Read> Compact<R> {
    pub(crate) fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            read: 0,
            limit,
        }
    }

    /// Bytes read so far.
    pub(crate) fn position(&self) -> u64 {
        self.read
    }

    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8];
        self.bytes(&mut b)?;
        Ok(b[0])
    }

    fn bytes(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let n = buf.len() as u64;
        if self.read + n > self.limit {
            return Err(bad(format!(
                "page header longer than the {} bytes it may take",
                self.limit
            )));
        }
        self.inner.read_exact(buf)?;
        self.read += n;
        Ok(())
    }

    fn skip_bytes(&mut self, n: u64) -> io::Result<()> {
        if self.read.saturating_add(n) > self.limit {
            return Err(bad(format!(
                "page header longer than the {} bytes it may take",
                self.limit
            )));
        }
        let skipped = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.read += skipped;
        if skipped < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// An unsigned LEB128 varint of at most 10 bytes.
    pub(crate) fn varint(&mut self) -> io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad("varint longer than 10 bytes".into()))
    }

    fn zigzag(&mut self) -> io::Result<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn i32(&mut self) -> io::Result<i32> {
        let v = self.zigzag()?;
        i32::try_from(v).map_err(|_| bad(format!("{v} does not fit an i32 field")))
    }

    /// The next field of a struct: (id, type), or None at its stop byte.
    pub(crate) fn field(&mut self, last_id: &mut i16) -> io::Result<Option<(i16, u8)>> {
        let b = self.byte()?;
        if b == 0 {
            return Ok(None);
        }
        let ty = b & 0x0f;
        let delta = i16::from(b >> 4);
        let id = if delta == 0 {
            i16::try_from(self.zigzag()?).map_err(|_| bad("field id out of range".into()))?
        } else {
            last_id.saturating_add(delta)
        };
        *last_id = id;
        Ok(Some((id, ty)))
    }

    /// Skip one value of type `ty` (in a struct: a bool's value is in its type).
    pub(crate) fn skip(&mut self, ty: u8, depth: u32) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(bad("page header nested too deeply".into()));
        }
        match ty {
            BOOL_TRUE | BOOL_FALSE => Ok(()),
            BYTE => self.byte().map(drop),
            I16 | I32 | I64 => self.varint().map(drop),
            DOUBLE => self.skip_bytes(8),
            UUID => self.skip_bytes(16),
            BINARY => {
                let n = self.varint()?;
                self.skip_bytes(n)
            }
            LIST | SET => {
                let b = self.byte()?;
                let elem = b & 0x0f;
                let n = match b >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                for _ in 0..n {
                    self.skip_element(elem, depth + 1)?;
                }
                Ok(())
            }
            MAP => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kv = self.byte()?;
                for _ in 0..n {
                    self.skip_element(kv >> 4, depth + 1)?;
                    self.skip_element(kv & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            STRUCT => {
                let mut last = 0;
                while let Some((_, t)) = self.field(&mut last)? {
                    self.skip(t, depth + 1)?;
                }
                Ok(())
            }
            other => Err(bad(format!("unknown Thrift type {other}"))),
        }
    }

    /// Skip a list, set or map element: a bool there takes a byte.
    fn skip_element(&mut self, ty: u8, depth: u32) -> io::Result<()> {
        match ty {
            BOOL_TRUE | BOOL_FALSE => self.byte().map(drop),
            other => self.skip(other, depth),
        }
    }
}

/// Read a `PageHeader` (its type and sizes; every other field skipped) from at most `limit`
/// bytes of `r`.
pub(crate) fn read_page_header(r: impl Read, limit: u64) -> io::Result<PageHeader> {
    let mut c = Compact::new(r, limit);
    let mut h = PageHeader::default();
    let (mut kind, mut uncompressed, mut compressed) = (None, None, None);
    let mut last = 0;
    while let Some((id, ty)) = c.field(&mut last)? {
        match (id, ty) {
            (1, I32) => kind = Some(c.i32()?),
            (2, I32) => uncompressed = Some(c.i32()?),
            (3, I32) => compressed = Some(c.i32()?),
            // DataPageHeader.encoding is its field 2, DataPageHeaderV2's its field 4.
            (5, STRUCT) => h.encoding = struct_i32(&mut c, 2)?,
            (8, STRUCT) => h.encoding = struct_i32(&mut c, 4)?,
            (_, ty) => c.skip(ty, 1)?,
        }
    }
    match (kind, uncompressed, compressed) {
        (Some(k), Some(u), Some(c)) => {
            h.kind = k;
            h.uncompressed_size = u;
            h.compressed_size = c;
        }
        _ => return Err(bad("page header without its type or sizes".into())),
    }
    h.header_bytes = c.position();
    Ok(h)
}

/// The i32 field `wanted` of the struct being read (the rest skipped).
fn struct_i32<R: Read>(c: &mut Compact<R>, wanted: i16) -> io::Result<Option<i32>> {
    let mut found = None;
    let mut last = 0;
    while let Some((id, ty)) = c.field(&mut last)? {
        if id == wanted && ty == I32 {
            found = Some(c.i32()?);
        } else {
            c.skip(ty, 2)?;
        }
    }
    Ok(found)
}

/// Where the values of the field at `path` lie in `bytes` (a struct): `path` names a field id
/// per level, descending through structs and lists of structs. For tests that patch files.
#[cfg(test)]
pub(crate) fn field_spans(bytes: &[u8], path: &[i16]) -> Vec<std::ops::Range<usize>> {
    fn walk<R: Read>(c: &mut Compact<R>, path: &[i16], out: &mut Vec<std::ops::Range<usize>>) {
        let mut last = 0;
        while let Some((id, ty)) = c.field(&mut last).unwrap() {
            if id != path[0] {
                c.skip(ty, 1).unwrap();
            } else if path.len() == 1 {
                let from = c.position() as usize;
                c.skip(ty, 1).unwrap();
                out.push(from..c.position() as usize);
            } else if ty == STRUCT {
                walk(c, &path[1..], out);
            } else {
                assert_eq!(ty, LIST, "field {id} is neither a struct nor a list");
                let b = c.byte().unwrap();
                assert_eq!(b & 0x0f, STRUCT, "field {id} is no list of structs");
                let n = match b >> 4 {
                    15 => c.varint().unwrap(),
                    n => u64::from(n),
                };
                for _ in 0..n {
                    walk(c, &path[1..], out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&mut Compact::new(bytes, bytes.len() as u64), path, &mut out);
    out
}

/// `value` zigzag-encoded as a varint of exactly `len` bytes (padded with continuation bits,
/// which decoders accept): patches a field in place.
#[cfg(test)]
pub(crate) fn padded_zigzag(value: i64, len: usize) -> Vec<u8> {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        let more = if i + 1 < len { 0x80 } else { 0 };
        out.push((v & 0x7f) as u8 | more);
        v >>= 7;
    }
    assert_eq!(v, 0, "{value} does not fit in {len} varint bytes");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_zigzag_and_field_deltas_decode() {
        // type DATA_PAGE (0), uncompressed 300, compressed 150, a crc, a nested struct
        // (data_page_header {num_values 3, encoding 0, ...}) with a list<binary> field and a
        // bool inside, then stop.
        let bytes = [
            0x15, 0x00, // field 1 i32: 0
            0x15, 0xd8, 0x04, // field 2 i32: zigzag 600 = 300
            0x15, 0xac, 0x02, // field 3 i32: zigzag 300 = 150
            0x15, 0x02, // field 4 i32 (crc): 1
            0x1c, // field 5 struct
            0x15, 0x06, // num_values 3
            0x15, 0x00, // encoding 0
            0x19, 0x28, 0x01, b'a', 0x00, // field 3 list<binary>: 2 elements, "a", ""
            0x11, // field 4 bool true
            0x00, // end of data_page_header
            0x00, // stop
        ];
        let h = read_page_header(&bytes[..], 64).unwrap();
        assert_eq!(
            h,
            PageHeader {
                kind: 0,
                uncompressed_size: 300,
                compressed_size: 150,
                encoding: Some(0),
                header_bytes: bytes.len() as u64,
            }
        );
        // The same header refused when it may take fewer bytes than it does.
        let e = read_page_header(&bytes[..], 10).unwrap_err();
        assert!(e.to_string().contains("longer than the 10 bytes"), "{e}");
        // A binary field declaring 2^40 bytes is refused, not skipped through.
        let huge = [0x18, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0x00];
        let e = read_page_header(&huge[..], 1 << 20).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}
