//! Reading `torch.save` files into named tensors: litgpt's `lit_model.pth` (a state dict, or a
//! training checkpoint whose `model` entry is one) and Hugging Face's `pytorch_model.bin`.
//!
//! The file is a zip archive: `<name>/data.pkl`, a Python pickle, and one record
//! `<name>/data/<key>` per storage. The pickle is run on a small machine that knows what a
//! saved state dict holds: dicts (`collections.OrderedDict` too, its `_metadata` dropped),
//! lists, tuples, strings, numbers, and tensors rebuilt by `torch._utils._rebuild_tensor_v2`
//! from a persistent storage id. Any other object becomes an opaque value, which is an error
//! only where a tensor is needed. Nothing is executed. (libtorch's own unpickler turns
//! `OrderedDict`, which every `model.state_dict()` is, into None.)
//!
//! Not here: what the names mean (interop/import.rs).

use crate::error::BadInput;
use anyhow::{anyhow, bail, Context};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;
use tch::{Kind, Tensor};

/// A tensor of the pickle: where its data is and how it is viewed.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    key: String,
    kind: Kind,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A float's value is never needed (no tensor is built from one).
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// `module.name` of a GLOBAL.
    Global(String),
    Storage {
        key: String,
        kind: Kind,
    },
    Tensor(TensorRef),
    /// An object mla does not need (optimizer state, a class instance, …).
    Opaque,
}

fn int(v: &Value) -> anyhow::Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(i64::from(*b)),
        other => bail!("expected an integer, found {other:?}"),
    }
}

fn ints(v: &Value) -> anyhow::Result<Vec<i64>> {
    match v {
        Value::Tuple(items) => items.iter().map(int).collect(),
        Value::List(items) => items.borrow().iter().map(int).collect(),
        other => bail!("expected a tuple of integers, found {other:?}"),
    }
}

/// The tch kind of a `torch.<X>Storage` class name.
fn storage_kind(class: &str) -> anyhow::Result<Kind> {
    Ok(match class.rsplit('.').next().unwrap_or(class) {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => bail!("storage type {other} is not supported"),
    })
}

/// Run the pickle `bytes` and return its value.
fn unpickle(bytes: &[u8]) -> anyhow::Result<Value> {
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> anyhow::Result<&[u8]> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| anyhow!("truncated at byte {at}"))?;
        let s = &bytes[*at..end];
        *at = end;
        Ok(s)
    };
    let le = |b: &[u8]| {
        b.iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
    };
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| anyhow!("stack underflow"));
    let pop_mark = |stack: &mut Vec<Value>, marks: &mut Vec<usize>| -> anyhow::Result<Vec<Value>> {
        let m = marks.pop().ok_or_else(|| anyhow!("no MARK"))?;
        if m > stack.len() {
            bail!("MARK beyond the stack");
        }
        Ok(stack.split_off(m))
    };
    loop {
        let pos = at;
        let op = take(&mut at, 1)?[0];
        match op {
            0x80 => {
                take(&mut at, 1)?; // PROTO
            }
            0x95 => {
                take(&mut at, 8)?; // FRAME
            }
            b'.' => return pop(&mut stack), // STOP
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Value::Dict(Rc::default())),
            b']' => stack.push(Value::List(Rc::default())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(take(&mut at, 4)?.try_into()?);
                stack.push(Value::Int(i64::from(v)));
            }
            b'K' => stack.push(Value::Int(i64::from(take(&mut at, 1)?[0]))),
            b'M' => stack.push(Value::Int(le(take(&mut at, 2)?) as i64)),
            0x8a => {
                let n = take(&mut at, 1)?[0] as usize;
                let b = take(&mut at, n)?;
                if n > 8 {
                    bail!("integer of {n} bytes at byte {pos}");
                }
                let mut v = le(b) as i64;
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n); // two's complement
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                take(&mut at, 8)?;
                stack.push(Value::Float);
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => le(take(&mut at, 4)?),
                    0x8c => u64::from(take(&mut at, 1)?[0]),
                    _ => le(take(&mut at, 8)?),
                } as usize;
                let s = std::str::from_utf8(take(&mut at, n)?)
                    .with_context(|| format!("string at byte {pos}"))?;
                stack.push(Value::Str(s.to_string()));
            }
            b'C' | b'B' => {
                let n = if op == b'C' {
                    u64::from(take(&mut at, 1)?[0])
                } else {
                    le(take(&mut at, 4)?)
                } as usize;
                take(&mut at, n)?;
                stack.push(Value::Opaque); // raw bytes: not part of a state dict's tensors
            }
            b'q' | b'r' | 0x94 => {
                let id = match op {
                    b'q' => u32::from(take(&mut at, 1)?[0]),
                    b'r' => le(take(&mut at, 4)?) as u32,
                    _ => memo.len() as u32,
                };
                let top = stack
                    .last()
                    .ok_or_else(|| anyhow!("memo of an empty stack"))?;
                memo.insert(id, top.clone());
            }
            b'h' | b'j' => {
                let id = if op == b'h' {
                    u32::from(take(&mut at, 1)?[0])
                } else {
                    le(take(&mut at, 4)?) as u32
                };
                let v = memo
                    .get(&id)
                    .ok_or_else(|| anyhow!("memo {id} unknown at byte {pos}"))?;
                stack.push(v.clone());
            }
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    bail!("stack underflow at byte {pos}");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![pop(&mut stack)?]
                } else {
                    pop_mark(&mut stack, &mut marks)?
                };
                match stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().extend(items),
                    Some(Value::Opaque) => {}
                    _ => bail!("APPEND to a non-list at byte {pos}"),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack, &mut marks)?
                };
                if items.len() % 2 != 0 {
                    bail!("odd SETITEMS at byte {pos}");
                }
                match stack.last() {
                    Some(Value::Dict(d)) => {
                        let mut d = d.borrow_mut();
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    Some(Value::Opaque) => {}
                    _ => bail!("SETITEM on a non-dict at byte {pos}"),
                }
            }
            b'c' => {
                let mut line = || -> anyhow::Result<String> {
                    let rest = &bytes[at..];
                    let n = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| anyhow!("unterminated GLOBAL at byte {pos}"))?;
                    let s = String::from_utf8_lossy(&rest[..n]).into_owned();
                    at += n + 1;
                    Ok(s)
                };
                let module = line()?;
                let name = line()?;
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(format!("{m}.{n}"))),
                    _ => bail!("STACK_GLOBAL of non-strings at byte {pos}"),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent(&pid).with_context(|| format!("storage at byte {pos}"))?);
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(
                    reduce(&callable, args).with_context(|| format!("object at byte {pos}"))?,
                );
            }
            b'b' => {
                pop(&mut stack)?; // BUILD's state: an OrderedDict's _metadata, an object's dict
            }
            _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {pos}"),
        }
    }
}

/// A BINPERSID of torch.save: ('storage', <storage class>, key, location, numel).
fn persistent(pid: &Value) -> anyhow::Result<Value> {
    let Value::Tuple(items) = pid else {
        bail!("persistent id {pid:?} is not a tuple");
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(class), Value::Str(key), ..] if tag == "storage" => {
            Ok(Value::Storage {
                key: key.clone(),
                kind: storage_kind(class)?,
            })
        }
        _ => bail!("persistent id {pid:?} is not a storage"),
    }
}

/// The few callables a state dict needs; anything else is opaque.
fn reduce(callable: &Value, args: Value) -> anyhow::Result<Value> {
    let Value::Global(name) = callable else {
        return Ok(Value::Opaque);
    };
    let args = match args {
        Value::Tuple(a) => a,
        _ => return Ok(Value::Opaque),
    };
    Ok(match name.as_str() {
        "collections.OrderedDict" if args.is_empty() => Value::Dict(Rc::default()),
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            let [Value::Storage { key, kind }, offset, shape, stride, ..] = args.as_slice() else {
                bail!("{name}{args:?}: not (storage, offset, size, stride, …)");
            };
            Value::Tensor(TensorRef {
                key: key.clone(),
                kind: *kind,
                offset: int(offset)?,
                shape: ints(shape)?,
                stride: ints(stride)?,
            })
        }
        "torch._utils._rebuild_parameter" => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => t,
            _ => Value::Opaque,
        },
        _ => Value::Opaque,
    })
}

/// The tensors of the state dict in the `torch.save` file `path`, by name in file order. A
/// dict whose `model` entry is a dict (litgpt's training checkpoints) gives that entry's.
pub fn load_state_dict(path: &Path) -> anyhow::Result<Vec<(String, Tensor)>> {
    let what = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("opening {what}"))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|_| {
        BadInput(format!(
            "{what}: not a torch.save zip archive (files saved by torch < 1.6 are not read; load \
             and save it again with a newer torch)"
        ))
    })?;
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .map(String::from)
        .ok_or_else(|| BadInput(format!("{what}: no data.pkl in the archive")))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut bytes = Vec::new();
    zip.by_name(&pkl)?.read_to_end(&mut bytes)?;
    let root = unpickle(&bytes).map_err(|e| BadInput(format!("{what}: {e:#}")))?;
    let Value::Dict(top) = root else {
        return Err(BadInput(format!("{what}: holds a {root:?}, not a state dict")).into());
    };
    let model = top.borrow().iter().find_map(|(k, v)| match (k, v) {
        (Value::Str(k), Value::Dict(d)) if k == "model" => Some(d.clone()),
        _ => None,
    });
    let dict = model.unwrap_or(top);
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::new();
    for (k, v) in dict.borrow().iter() {
        let Value::Str(name) = k else {
            return Err(BadInput(format!("{what}: a key {k:?} is not a name")).into());
        };
        let Value::Tensor(t) = v else {
            return Err(BadInput(format!("{what}: {name} is not a tensor")).into());
        };
        if !storages.contains_key(&t.key) {
            let record = format!("{prefix}data/{}", t.key);
            let mut data = Vec::new();
            zip.by_name(&record)
                .map_err(|_| BadInput(format!("{what}: no record {record}")))?
                .read_to_end(&mut data)?;
            let elt = t.kind.elt_size_in_bytes();
            if data.len() % elt != 0 {
                bail!(
                    "{what}: record {record} is not a whole number of {:?}",
                    t.kind
                );
            }
            let storage = Tensor::f_from_data_size(&data, &[(data.len() / elt) as i64], t.kind)?;
            storages.insert(t.key.clone(), storage);
        }
        let storage = &storages[&t.key];
        let view = storage
            .f_as_strided(t.shape.as_slice(), t.stride.as_slice(), Some(t.offset))
            .map_err(|e| BadInput(format!("{what}: {name}: {e}")))?;
        out.push((name.clone(), view.contiguous()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps({"a": 5, "b": (-2, 300)}, protocol=2)`, then the same cut short and with
    /// an opcode the machine does not run (EXT1).
    #[test]
    fn a_small_pickle_runs_and_broken_ones_are_errors_not_panics() {
        let good = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x05X\x01\x00\x00\x00bq\x02J\xfe\xff\xff\xffM,\x01\x86q\x03u.";
        let Value::Dict(d) = unpickle(good).unwrap() else {
            panic!("not a dict");
        };
        let d = d.borrow();
        assert!(matches!(&d[0], (Value::Str(k), Value::Int(5)) if k == "a"));
        match &d[1] {
            (Value::Str(k), Value::Tuple(t)) if k == "b" => {
                assert_eq!(ints(&Value::Tuple(t.clone())).unwrap(), [-2, 300]);
            }
            other => panic!("{other:?}"),
        }
        let e = unpickle(&good[..good.len() - 3]).unwrap_err().to_string();
        assert!(e.contains("truncated") || e.contains("underflow"), "{e}");
        let e = unpickle(b"\x80\x02\x82\x01.").unwrap_err().to_string();
        assert!(
            e.contains("unsupported pickle opcode 0x82 at byte 2"),
            "{e}"
        );
    }
}
