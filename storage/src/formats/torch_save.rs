//! `torch.save` archives: litgpt's `lit_model.pth` (a state dict, or a training checkpoint whose
//! `model` entry is one) and Hugging Face's `pytorch_model.bin`, read into a checked
//! [`StateDict`]: the storages' bytes and, per name, a view of one of them whose extent has
//! been checked against it.
//!
//! The archive is a zip: `<name>/data.pkl` (a pickle, see `pickle.rs`), `<name>/byteorder`
//! (optional, `little`) and one record `<name>/data/<key>` per storage. Hostile archives
//! (issue 23): exactly one `data.pkl` and no two entries of one name (which pickle loads must
//! not depend on a hash order), a record must hold exactly what its storage needs and no more
//! than its header says, and all records together at most [`Limits::max_expansion`] × the
//! archive's size (a deflated record cannot unpack 1000:1).
//!
//! Not here: building tensors from the views (the trainer's `interop`), what the names mean.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use super::pickle::{self, kind, Pickle, Value};
use super::{extent, numel, Dtype, FormatError, Limits};

/// One storage of the archive: its dtype and bytes (little-endian elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    pub key: String,
    pub dtype: Dtype,
    pub bytes: Vec<u8>,
}

impl Storage {
    /// Elements of the storage.
    pub fn numel(&self) -> i64 {
        (self.bytes.len() / self.dtype.size()) as i64
    }
}

/// A named tensor: a view (`offset`, `shape`, `stride`, in elements) of `storages[storage]`,
/// checked to lie inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorView {
    pub name: String,
    pub storage: usize,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
}

/// The tensors of a state dict, in file order, and the storages they view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateDict {
    pub storages: Vec<Storage>,
    pub tensors: Vec<TensorView>,
}

/// Read the `torch.save` file `path`.
pub fn read_file(path: &Path, limits: &Limits) -> Result<StateDict, FormatError> {
    let what = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| FormatError::new(&what, e.to_string()))?;
    let size = file
        .metadata()
        .map_err(|e| FormatError::new(&what, e.to_string()))?
        .len();
    read(std::io::BufReader::new(file), size, &what, limits)
}

/// Read a `torch.save` archive of `archive_bytes` bytes from `reader`; `what` names it in
/// errors.
pub fn read<R: Read + Seek>(
    reader: R,
    archive_bytes: u64,
    what: &str,
    limits: &Limits,
) -> Result<StateDict, FormatError> {
    let bad = |problem: String| FormatError::new(what, problem);
    let mut zip = zip::ZipArchive::new(reader).map_err(|_| {
        bad(
            "not a torch.save zip archive (files saved by torch < 1.6 are not read; load and \
             save it again with a newer torch)"
                .into(),
        )
    })?;
    if zip.has_duplicate_names() {
        return Err(bad(
            "holds two entries of one name: which one is meant is ambiguous".into(),
        ));
    }
    let prefix = pickle_prefix(&zip).map_err(&bad)?;
    check_byteorder(&mut zip, &prefix).map_err(&bad)?;
    let pkl = format!("{prefix}data.pkl");
    let bytes = read_entry(
        &mut zip,
        &pkl,
        limits.max_pickle_bytes,
        "MLA_LIMIT_PICKLE_BYTES",
    )
    .map_err(&bad)?;
    let p = pickle::parse(&bytes, limits).map_err(|e| bad(format!("{pkl}: {e}")))?;
    drop(bytes);
    let named = named_tensors(&p).map_err(&bad)?;
    let budget = archive_bytes.saturating_mul(limits.max_expansion);
    let (storages, index) = read_storages(&mut zip, &prefix, &p, &named, budget).map_err(&bad)?;
    let tensors = views(&p, named, &storages, &index).map_err(&bad)?;
    Ok(StateDict { storages, tensors })
}

/// `<name>/` of the one `<name>/data.pkl` (or `` for a top-level `data.pkl`).
fn pickle_prefix<R: Read + Seek>(zip: &zip::ZipArchive<R>) -> Result<String, String> {
    let mut pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .collect();
    pickles.sort_unstable();
    match pickles.as_slice() {
        [] => Err("no data.pkl in the archive".into()),
        [one] => Ok(one.trim_end_matches("data.pkl").to_string()),
        many => Err(format!(
            "holds {} pickles ({}): which one is the model is ambiguous",
            many.len(),
            many.join(", ")
        )),
    }
}

/// torch writes `byteorder` since 2.1; archives without it are little-endian.
fn check_byteorder<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    prefix: &str,
) -> Result<(), String> {
    let name = format!("{prefix}byteorder");
    if zip.index_for_name(&name).is_none() {
        return Ok(());
    }
    let order = read_entry(zip, &name, 16, "")?;
    match order.as_slice() {
        b"little" => Ok(()),
        other => Err(format!(
            "{name} says {:?}: only little-endian archives are read",
            String::from_utf8_lossy(other)
        )),
    }
}

/// The whole entry `name`, which must hold at most `max` bytes and exactly what its header
/// says (reading one byte more catches a header that understates it).
fn read_entry<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    max: u64,
    raise: &str,
) -> Result<Vec<u8>, String> {
    let entry = zip
        .by_name(name)
        .map_err(|e| format!("{name}: cannot be read ({e})"))?;
    let declared = entry.size();
    if declared > max {
        let how = if raise.is_empty() {
            String::new()
        } else {
            format!(" ({raise})")
        };
        return Err(format!(
            "{name}: {declared} bytes, more than the {max} allowed{how}"
        ));
    }
    read_exact_entry(entry, name, declared)
}

fn read_exact_entry(entry: impl Read, name: &str, declared: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(usize::try_from(declared).map_err(|e| e.to_string())?);
    entry
        .take(declared.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 != declared {
        return Err(format!(
            "{name}: holds {}{} bytes, its header says {declared}",
            bytes.len(),
            if bytes.len() as u64 > declared {
                "+"
            } else {
                ""
            }
        ));
    }
    Ok(bytes)
}

/// (name, tensor handle) of the state dict: the top dict, or its `model` entry when that is
/// a dict (litgpt's training checkpoints).
fn named_tensors(p: &Pickle) -> Result<Vec<(String, pickle::Id)>, String> {
    let root = p.root.unwrap_or(Value::None);
    let top = p
        .dict(root)
        .ok_or_else(|| format!("holds {}, not a state dict", kind(root)))?;
    let model = top.iter().find_map(|&(k, v)| {
        (p.str(k) == Some("model") && matches!(k, Value::Str(_)))
            .then(|| p.dict(v))
            .flatten()
    });
    let dict = model.unwrap_or(top);
    dict.iter()
        .map(|&(k, v)| {
            let name = match k {
                Value::Str(_) => p.str(k).unwrap_or_default(),
                other => return Err(format!("a key that is {}, not a name", kind(other))),
            };
            match v {
                Value::Tensor(t) => Ok((name.to_string(), t)),
                other => Err(format!("{name} is {}, not a tensor", kind(other))),
            }
        })
        .collect()
}

/// The records of the storages `named` uses, once each, in first-use order; and the index
/// of each pickle storage handle into them.
fn read_storages<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    prefix: &str,
    p: &Pickle,
    named: &[(String, pickle::Id)],
    budget: u64,
) -> Result<(Vec<Storage>, HashMap<pickle::Id, usize>), String> {
    let mut by_key: HashMap<&str, usize> = HashMap::new();
    let mut index = HashMap::new();
    let mut storages: Vec<Storage> = Vec::new();
    let mut total = 0u64;
    for &(_, t) in named {
        let sid = p.tensors[t as usize].storage;
        let s = &p.storages[sid as usize];
        if let Some(&i) = by_key.get(s.key.as_str()) {
            // One record read as one dtype: another would reinterpret its bytes.
            if storages[i].dtype != s.dtype || storages[i].numel() != s.numel {
                return Err(format!(
                    "storage {} is named twice with another type or size",
                    s.key
                ));
            }
            index.insert(sid, i);
            continue;
        }
        let name = format!("{prefix}data/{}", s.key);
        let expect = u64::try_from(s.numel)
            .ok()
            .and_then(|n| n.checked_mul(s.dtype.size() as u64))
            .ok_or_else(|| format!("storage {}: {} elements overflow", s.key, s.numel))?;
        total = total.saturating_add(expect);
        if total > budget {
            return Err(format!(
                "its storages would hold {total}+ bytes, more than {budget} (MLA_LIMIT_EXPANSION × the archive's size)"
            ));
        }
        let entry = zip
            .by_name(&name)
            .map_err(|_| format!("no record {name}"))?;
        if entry.size() != expect {
            return Err(format!(
                "record {name} holds {} bytes, its storage needs {expect} ({} × {:?})",
                entry.size(),
                s.numel,
                s.dtype
            ));
        }
        let bytes = read_exact_entry(entry, &name, expect)?;
        by_key.insert(s.key.as_str(), storages.len());
        index.insert(sid, storages.len());
        storages.push(Storage {
            key: s.key.clone(),
            dtype: s.dtype,
            bytes,
        });
    }
    Ok((storages, index))
}

/// Each named tensor as a view checked against its storage; in all at most two tensors'
/// worth per stored byte (tied weights share a storage; a broadcast view of one element as
/// a 2^20 × 2^20 matrix does not fit).
fn views(
    p: &Pickle,
    named: Vec<(String, pickle::Id)>,
    storages: &[Storage],
    index: &HashMap<pickle::Id, usize>,
) -> Result<Vec<TensorView>, String> {
    let stored: u64 = storages.iter().map(|s| s.bytes.len() as u64).sum();
    let budget = stored.saturating_mul(2);
    let mut produced = 0u64;
    let mut out = Vec::with_capacity(named.len());
    for (name, t) in named {
        let t = &p.tensors[t as usize];
        let si = index[&t.storage];
        let s = &storages[si];
        let bad_view = || {
            format!(
                "{name}: size {:?}, stride {:?} at offset {} do not fit its storage {} of {} elements",
                t.shape, t.stride, t.offset, s.key, s.numel()
            )
        };
        let end = extent(t.offset, &t.shape, &t.stride).ok_or_else(bad_view)?;
        if end > s.numel() {
            return Err(bad_view());
        }
        let n = numel(&t.shape).ok_or_else(bad_view)?;
        produced = produced.saturating_add((n as u64).saturating_mul(s.dtype.size() as u64));
        if produced > budget {
            return Err(format!(
                "{name}: its tensors would hold {produced}+ bytes, more than twice the {stored} stored"
            ));
        }
        out.push(TensorView {
            name,
            storage: si,
            offset: t.offset,
            shape: t.shape.clone(),
            stride: t.stride.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    /// A protocol-2 pickle of `{name: _rebuild_tensor_v2(storage(key, class, numel), offset,
    /// size, stride, False, OrderedDict())}` for each tensor, as torch.save writes it.
    pub(crate) struct Tensor<'a> {
        pub name: &'a str,
        pub key: &'a str,
        pub class: &'a str,
        pub numel: u32,
        pub offset: u32,
        pub shape: &'a [u32],
        pub stride: &'a [u32],
    }

    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn int_tuple(out: &mut Vec<u8>, items: &[u32]) {
        out.push(b'(');
        for &i in items {
            out.push(b'J');
            out.extend_from_slice(&i.to_le_bytes());
        }
        out.push(b't');
    }

    pub(crate) fn state_dict_pickle(tensors: &[Tensor<'_>]) -> Vec<u8> {
        let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(".to_vec();
        for t in tensors {
            unicode(&mut p, t.name);
            p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            p.push(b'(');
            unicode(&mut p, "storage");
            p.extend_from_slice(format!("ctorch\n{}\n", t.class).as_bytes());
            unicode(&mut p, t.key);
            unicode(&mut p, "cpu");
            p.push(b'J');
            p.extend_from_slice(&t.numel.to_le_bytes());
            p.extend_from_slice(b"tQ");
            p.push(b'J');
            p.extend_from_slice(&t.offset.to_le_bytes());
            int_tuple(&mut p, t.shape);
            int_tuple(&mut p, t.stride);
            // requires_grad False, backward hooks OrderedDict(); the args tuple; the call.
            p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
        }
        p.extend_from_slice(b"u.");
        p
    }

    /// A zip of `entries` (name, bytes), stored (or deflated), as torch.save lays one out.
    pub(crate) fn archive(entries: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let method = if deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(method)
            .large_file(false);
        for (name, bytes) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn read_bytes(bytes: &[u8]) -> Result<StateDict, FormatError> {
        read(
            Cursor::new(bytes),
            bytes.len() as u64,
            "t.pth",
            &Limits::default(),
        )
    }

    fn w(name: &'static str, shape: &'static [u32], stride: &'static [u32]) -> Tensor<'static> {
        Tensor {
            name,
            key: "0",
            class: "FloatStorage",
            numel: 6,
            offset: 0,
            shape,
            stride,
        }
    }

    #[test]
    fn a_state_dict_reads_with_tied_and_transposed_views() {
        let pkl = state_dict_pickle(&[w("a", &[2, 3], &[3, 1]), w("b", &[3, 2], &[1, 3])]);
        let data = f32s(&[1., 2., 3., 4., 5., 6.]);
        let zip = archive(
            &[
                ("archive/data.pkl", &pkl),
                ("archive/byteorder", b"little"),
                ("archive/data/0", &data),
            ],
            false,
        );
        let sd = read_bytes(&zip).unwrap();
        assert_eq!(sd.storages.len(), 1, "one record, read once");
        assert_eq!(sd.storages[0].bytes, data);
        assert_eq!(sd.tensors.len(), 2);
        assert_eq!(
            (
                sd.tensors[1].shape.as_slice(),
                sd.tensors[1].stride.as_slice()
            ),
            (&[3, 2][..], &[1, 3][..])
        );
    }

    /// Issue 23, finding 4: shape (2^20, 2^20) with strides (0, 0) over a 4-byte storage is
    /// refused before anything is allocated; a view past its storage's end too.
    #[test]
    fn views_outside_or_far_larger_than_their_storage_are_refused() {
        let data = f32s(&[1.0]);
        let one = |shape, stride, offset| {
            let t = Tensor {
                numel: 1,
                offset,
                ..w("w", shape, stride)
            };
            let pkl = state_dict_pickle(&[t]);
            read_bytes(&archive(
                &[("a/data.pkl", &pkl), ("a/data/0", &data)],
                false,
            ))
        };
        let e = one(&[1 << 20, 1 << 20], &[0, 0], 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than twice the 4 stored"), "{e}");
        let e = one(&[2], &[1], 0).unwrap_err().to_string();
        assert!(e.contains("do not fit its storage 0 of 1 elements"), "{e}");
        let e = one(&[1], &[1], 1).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
        one(&[1], &[1], 0).unwrap();
        one(&[0, 7], &[7, 1], 5).unwrap(); // empty: touches nothing
    }

    /// Issue 23, finding 9: two `data.pkl`, duplicate names, records bigger or smaller than
    /// they should be, and a deflate bomb.
    #[test]
    fn ambiguous_or_oversized_archives_are_refused() {
        let pkl = state_dict_pickle(&[w("a", &[6], &[1])]);
        let data = f32s(&[0.0; 6]);
        let e = read_bytes(&archive(
            &[
                ("a/data.pkl", &pkl),
                ("b/data.pkl", &pkl),
                ("a/data/0", &data),
            ],
            false,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("2 pickles (a/data.pkl, b/data.pkl)"), "{e}");
        let short = f32s(&[0.0; 5]);
        let e = read_bytes(&archive(
            &[("a/data.pkl", &pkl), ("a/data/0", &short)],
            false,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("holds 20 bytes, its storage needs 24"), "{e}");
        let e = read_bytes(&archive(
            &[("a/data.pkl", &pkl), ("a/byteorder", b"big")],
            false,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("only little-endian"), "{e}");
        // 64 MiB of zeros deflate to ~64 KiB: far more than 4 × the archive.
        let big = Tensor {
            numel: 16 << 20,
            ..w("a", &[16 << 20], &[1])
        };
        let pkl = state_dict_pickle(&[big]);
        let zeros = vec![0u8; 64 << 20];
        let zip = archive(&[("a/data.pkl", &pkl), ("a/data/0", &zeros)], true);
        assert!(zip.len() < 1 << 20);
        let e = read_bytes(&zip).unwrap_err().to_string();
        assert!(e.contains("MLA_LIMIT_EXPANSION"), "{e}");
    }

    #[test]
    fn duplicate_entry_names_are_refused() {
        let pkl = state_dict_pickle(&[w("a", &[6], &[1])]);
        let data = f32s(&[0.0; 6]);
        let mut zip = archive(
            &[
                ("a/data.pkl", &pkl),
                ("a/data/0", &data),
                ("a/data/1", &data),
            ],
            false,
        );
        // Rename the third entry to the second's name in both headers (same length).
        for i in 0..zip.len() - 8 {
            if &zip[i..i + 8] == b"a/data/1" {
                zip[i + 7] = b'0';
            }
        }
        let e = read_bytes(&zip).unwrap_err().to_string();
        assert!(e.contains("two entries of one name"), "{e}");
    }

    #[test]
    fn non_tensors_and_junk_are_one_line_errors() {
        let e = read_bytes(b"not a zip").unwrap_err().to_string();
        assert!(e.starts_with("t.pth: not a torch.save zip archive"), "{e}");
        let list = archive(&[("a/data.pkl", b"\x80\x02]q\x00h\x00a.")], false);
        let e = read_bytes(&list).unwrap_err().to_string();
        assert_eq!(e, "t.pth: holds a list, not a state dict");
        let dict = archive(
            &[("a/data.pkl", b"\x80\x02}X\x01\x00\x00\x00aK\x01s.")],
            false,
        );
        let e = read_bytes(&dict).unwrap_err().to_string();
        assert_eq!(e, "t.pth: a is an integer, not a tensor");
    }
}
