//! The pickle machine for what `torch.save` writes into `data.pkl`: dicts
//! (`collections.OrderedDict` too, its `_metadata` dropped), lists, tuples, strings, numbers,
//! and tensors rebuilt by `torch._utils._rebuild_tensor_v2` from a persistent storage id. Any
//! other object becomes an opaque value, an error only where a tensor is needed. Nothing is
//! executed. (libtorch's own unpickler turns `OrderedDict`, which every `state_dict()` is,
//! into None, and reads protocol 2 only.)
//!
//! Hostile pickles (issue 23): values are small `Copy` handles into arenas (strings,
//! sequences, dicts, storages, tensors), so memoised values are shared, never copied (a
//! 425-byte pickle that doubles a tuple 40 times stays 425 bytes of work), containers nest
//! without recursion anywhere (parsing, messages, drop: a million nested tuples or a list that
//! holds itself cost nothing), and every operation adds at most one value, so
//! [`Limits::max_pickle_ops`] bounds memory. Messages name a value's kind, never its contents.
//!
//! Reference: Python's `pickletools` (opcode names and layouts), `torch/serialization.py`.

use std::collections::HashMap;

use super::{Dtype, Limits};

/// An index into one of the [`Pickle`] arenas.
pub(crate) type Id = u32;

/// Most dimensions of a tensor (torch's own limit).
pub(crate) const MAX_DIMS: usize = 64;
/// Longest `module.name` of a STACK_GLOBAL.
const MAX_GLOBAL_NAME: usize = 1024;

/// A value of the machine: a handle, cheap to copy. Containers are indexes into the arenas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A float's value is never needed (no tensor is built from one).
    Float,
    /// Raw bytes: not part of a state dict's tensors.
    Bytes,
    Str(Id),
    /// `module.name` of a GLOBAL, in the strings arena.
    Global(Id),
    List(Id),
    Tuple(Id),
    Dict(Id),
    Storage(Id),
    Tensor(Id),
    /// An object mla does not need (optimizer state, a class instance, …).
    Opaque,
}

/// A storage named by a persistent id: `('storage', torch.<X>Storage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub key: String,
    pub dtype: Dtype,
    pub numel: i64,
}

/// A tensor: a view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: Id,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
}

/// A parsed pickle: its root value and the arenas its handles point into.
#[derive(Debug, Default)]
pub(crate) struct Pickle {
    pub root: Option<Value>,
    /// Bytes the arenas and the memo have taken so far, and the most they may take
    /// ([`Limits::max_pickle_memory`]): operations that build from what exists (a string
    /// joined from two, a shape copied from a memoised tuple) cannot multiply the input.
    spent: u64,
    budget: u64,
    strings: Vec<String>,
    /// Lists and tuples.
    seqs: Vec<Vec<Value>>,
    dicts: Vec<Vec<(Value, Value)>>,
    pub storages: Vec<StorageRef>,
    pub tensors: Vec<TensorRef>,
}

impl Pickle {
    pub fn str(&self, v: Value) -> Option<&str> {
        match v {
            Value::Str(i) | Value::Global(i) => self.strings.get(i as usize).map(String::as_str),
            _ => None,
        }
    }

    /// The items of a list or tuple.
    pub fn seq(&self, v: Value) -> Option<&[Value]> {
        match v {
            Value::List(i) | Value::Tuple(i) => self.seqs.get(i as usize).map(Vec::as_slice),
            _ => None,
        }
    }

    pub fn dict(&self, v: Value) -> Option<&[(Value, Value)]> {
        match v {
            Value::Dict(i) => self.dicts.get(i as usize).map(Vec::as_slice),
            _ => None,
        }
    }

    /// A shape or stride: a tuple of at most [`MAX_DIMS`] integers (copied out, so its length
    /// is checked first).
    fn ints(&self, v: Value) -> Result<Vec<i64>, String> {
        let items = self
            .seq(v)
            .ok_or_else(|| format!("expected a tuple of integers, found {}", kind(v)))?;
        if items.len() > MAX_DIMS {
            return Err(format!("{} dimensions, more than {MAX_DIMS}", items.len()));
        }
        items
            .iter()
            .map(|&i| int(i).ok_or_else(|| format!("expected an integer, found {}", kind(i))))
            .collect()
    }

    /// Account for `bytes` more of memory; an error past the budget.
    fn charge(&mut self, bytes: usize) -> Result<(), String> {
        self.spent = self.spent.saturating_add(bytes as u64);
        if self.spent > self.budget {
            return Err(format!(
                "its values would take more than {} bytes (MLA_LIMIT_PICKLE_MEMORY)",
                self.budget
            ));
        }
        Ok(())
    }

    fn new_str(&mut self, s: String) -> Result<Value, String> {
        self.charge(24 + s.len())?;
        self.strings.push(s);
        Ok(Value::Str(last_id(&self.strings)?))
    }

    fn new_global(&mut self, name: String) -> Result<Value, String> {
        self.charge(24 + name.len())?;
        self.strings.push(name);
        Ok(Value::Global(last_id(&self.strings)?))
    }

    fn new_seq(&mut self, items: Vec<Value>, tuple: bool) -> Result<Value, String> {
        self.charge(24 + VALUE_BYTES * items.len())?;
        self.seqs.push(items);
        let id = last_id(&self.seqs)?;
        Ok(if tuple {
            Value::Tuple(id)
        } else {
            Value::List(id)
        })
    }

    fn new_dict(&mut self) -> Result<Value, String> {
        self.charge(24)?;
        self.dicts.push(Vec::new());
        Ok(Value::Dict(last_id(&self.dicts)?))
    }

    fn extend_list(&mut self, id: Id, items: Vec<Value>) -> Result<(), String> {
        self.charge(VALUE_BYTES * items.len())?;
        self.seqs[id as usize].extend(items);
        Ok(())
    }

    fn extend_dict(&mut self, id: Id, items: &[Value]) -> Result<(), String> {
        self.charge(VALUE_BYTES * items.len())?;
        let d = &mut self.dicts[id as usize];
        d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
        Ok(())
    }

    fn new_storage(&mut self, s: StorageRef) -> Result<Value, String> {
        self.charge(48 + s.key.len())?;
        self.storages.push(s);
        Ok(Value::Storage(last_id(&self.storages)?))
    }

    fn new_tensor(&mut self, t: TensorRef) -> Result<Value, String> {
        self.charge(64 + 8 * (t.shape.len() + t.stride.len()))?;
        self.tensors.push(t);
        Ok(Value::Tensor(last_id(&self.tensors)?))
    }
}

/// What one value costs in an arena or the memo (a handle and its share of the container).
const VALUE_BYTES: usize = 16;

fn last_id<T>(arena: &[T]) -> Result<Id, String> {
    Id::try_from(arena.len() - 1).map_err(|_| "more than 2^32 values".to_string())
}

fn int(v: Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(i),
        Value::Bool(b) => Some(i64::from(b)),
        _ => None,
    }
}

/// What a value is, for messages (never what it holds).
pub(crate) fn kind(v: Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) => "an integer",
        Value::Float => "a float",
        Value::Bytes => "bytes",
        Value::Str(_) => "a string",
        Value::Global(_) => "a class or function",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Dict(_) => "a dict",
        Value::Storage(_) => "a storage",
        Value::Tensor(_) => "a tensor",
        Value::Opaque => "an object",
    }
}

/// The opcodes the machine runs, as `pickletools` names them. Others are an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Proto,
    Frame,
    Stop,
    Mark,
    Pop,
    PopMark,
    Dup,
    EmptyDict,
    EmptyList,
    EmptyTuple,
    NoneValue,
    NewTrue,
    NewFalse,
    BinInt,
    BinInt1,
    BinInt2,
    Long1,
    BinFloat,
    BinUnicode,
    ShortBinUnicode,
    BinUnicode8,
    BinBytes,
    ShortBinBytes,
    BinPut,
    LongBinPut,
    Memoize,
    BinGet,
    LongBinGet,
    Tuple,
    Tuple1,
    Tuple2,
    Tuple3,
    Append,
    Appends,
    SetItem,
    SetItems,
    Global,
    StackGlobal,
    BinPersId,
    Reduce,
    NewObj,
    Build,
}

impl Op {
    fn decode(byte: u8) -> Option<Op> {
        use Op::*;
        Some(match byte {
            0x80 => Proto,
            0x95 => Frame,
            b'.' => Stop,
            b'(' => Mark,
            b'0' => Pop,
            b'1' => PopMark,
            b'2' => Dup,
            b'}' => EmptyDict,
            b']' => EmptyList,
            b')' => EmptyTuple,
            b'N' => NoneValue,
            0x88 => NewTrue,
            0x89 => NewFalse,
            b'J' => BinInt,
            b'K' => BinInt1,
            b'M' => BinInt2,
            0x8a => Long1,
            b'G' => BinFloat,
            b'X' => BinUnicode,
            0x8c => ShortBinUnicode,
            0x8d => BinUnicode8,
            b'B' => BinBytes,
            b'C' => ShortBinBytes,
            b'q' => BinPut,
            b'r' => LongBinPut,
            0x94 => Memoize,
            b'h' => BinGet,
            b'j' => LongBinGet,
            b't' => Tuple,
            0x85 => Tuple1,
            0x86 => Tuple2,
            0x87 => Tuple3,
            b'a' => Append,
            b'e' => Appends,
            b's' => SetItem,
            b'u' => SetItems,
            b'c' => Global,
            0x93 => StackGlobal,
            b'Q' => BinPersId,
            b'R' => Reduce,
            0x81 => NewObj,
            b'b' => Build,
            _ => return None,
        })
    }
}

/// The torch storage class names and their dtypes.
fn storage_dtype(class: &str) -> Option<Dtype> {
    Some(match class.rsplit('.').next().unwrap_or(class) {
        "FloatStorage" => Dtype::F32,
        "DoubleStorage" => Dtype::F64,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::Bool,
        _ => return None,
    })
}

struct Machine<'a> {
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    out: Pickle,
}

/// Run the pickle `bytes`; the error says what went wrong and at which byte.
pub(crate) fn parse(bytes: &[u8], limits: &Limits) -> Result<Pickle, String> {
    if bytes.len() as u64 > limits.max_pickle_bytes {
        return Err(format!(
            "a pickle of {} bytes, more than the {} allowed (MLA_LIMIT_PICKLE_BYTES)",
            bytes.len(),
            limits.max_pickle_bytes
        ));
    }
    let mut m = Machine {
        bytes,
        at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        out: Pickle {
            budget: limits.max_pickle_memory,
            ..Pickle::default()
        },
    };
    let mut ops = 0u64;
    loop {
        ops += 1;
        if ops > limits.max_pickle_ops {
            return Err(format!(
                "more than {} pickle operations (MLA_LIMIT_PICKLE_OPS)",
                limits.max_pickle_ops
            ));
        }
        let pos = m.at;
        let byte = m.take(1)?[0];
        let op = Op::decode(byte)
            .ok_or_else(|| format!("unsupported pickle opcode 0x{byte:02x} at byte {pos}"))?;
        if op == Op::Stop {
            let root = m.pop(pos)?;
            m.out.root = Some(root);
            return Ok(m.out);
        }
        m.run(op, pos)?;
    }
}

impl Machine<'_> {
    fn take(&mut self, n: u64) -> Result<&[u8], String> {
        let at = self.at;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| at.checked_add(n))
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {at}"))?;
        self.at = end;
        Ok(&self.bytes[at..end])
    }

    fn le(&mut self, n: u64) -> Result<u64, String> {
        Ok(self
            .take(n)?
            .iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    fn pop(&mut self, pos: usize) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at byte {pos}"))
    }

    fn top(&self, pos: usize) -> Result<Value, String> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| format!("empty stack at byte {pos}"))
    }

    /// The values above the last MARK, which is removed.
    fn pop_mark(&mut self, pos: usize) -> Result<Vec<Value>, String> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("no MARK at byte {pos}"))?;
        if m > self.stack.len() {
            return Err(format!("MARK beyond the stack at byte {pos}"));
        }
        Ok(self.stack.split_off(m))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn run(&mut self, op: Op, pos: usize) -> Result<(), String> {
        use Op::*;
        match op {
            Proto => {
                self.take(1)?;
            }
            Frame => {
                self.take(8)?; // frames only group the bytes that follow
            }
            Mark => self.marks.push(self.stack.len()),
            Pop => {
                self.pop(pos)?;
            }
            PopMark => {
                self.pop_mark(pos)?;
            }
            Dup => self.push(self.top(pos)?),
            EmptyDict => {
                let d = self.out.new_dict()?;
                self.push(d);
            }
            EmptyList | EmptyTuple => {
                let s = self.out.new_seq(Vec::new(), op == EmptyTuple)?;
                self.push(s);
            }
            NoneValue => self.push(Value::None),
            NewTrue => self.push(Value::Bool(true)),
            NewFalse => self.push(Value::Bool(false)),
            BinInt | BinInt1 | BinInt2 | Long1 | BinFloat => self.number(op, pos)?,
            BinUnicode | ShortBinUnicode | BinUnicode8 | BinBytes | ShortBinBytes => {
                self.text(op, pos)?
            }
            BinPut | LongBinPut | Memoize | BinGet | LongBinGet => self.memo(op, pos)?,
            Tuple | Tuple1 | Tuple2 | Tuple3 | Append | Appends | SetItem | SetItems => {
                self.container(op, pos)?
            }
            Global | StackGlobal => self.global(op, pos)?,
            BinPersId => {
                let pid = self.pop(pos)?;
                let s = self
                    .persistent(pid)
                    .map_err(|e| format!("storage at byte {pos}: {e}"))?;
                self.push(s);
            }
            Reduce | NewObj => {
                let args = self.pop(pos)?;
                let callable = self.pop(pos)?;
                let v = self
                    .reduce(callable, args)
                    .map_err(|e| format!("object at byte {pos}: {e}"))?;
                self.push(v);
            }
            Build => {
                self.pop(pos)?; // BUILD's state: an OrderedDict's _metadata, an object's dict
            }
            Stop => unreachable!("STOP ends the loop in parse"),
        }
        Ok(())
    }

    fn number(&mut self, op: Op, pos: usize) -> Result<(), String> {
        let v = match op {
            Op::BinInt => Value::Int(i64::from(self.le(4)? as u32 as i32)),
            Op::BinInt1 => Value::Int(self.le(1)? as i64),
            Op::BinInt2 => Value::Int(self.le(2)? as i64),
            Op::Long1 => {
                let n = self.le(1)?;
                if n > 8 {
                    return Err(format!("integer of {n} bytes at byte {pos}"));
                }
                let raw = self.le(n)?;
                let v = if n > 0 && n < 8 && raw >> (8 * n - 1) & 1 == 1 {
                    raw as i64 - (1i64 << (8 * n)) // two's complement
                } else {
                    raw as i64
                };
                Value::Int(v)
            }
            _ => {
                self.take(8)?;
                Value::Float
            }
        };
        self.push(v);
        Ok(())
    }

    fn text(&mut self, op: Op, pos: usize) -> Result<(), String> {
        let n = match op {
            Op::BinUnicode | Op::BinBytes => self.le(4)?,
            Op::ShortBinUnicode | Op::ShortBinBytes => self.le(1)?,
            _ => self.le(8)?,
        };
        let raw = self.take(n)?;
        let v = if matches!(op, Op::BinBytes | Op::ShortBinBytes) {
            Value::Bytes
        } else {
            let s = std::str::from_utf8(raw)
                .map_err(|_| format!("a string that is not UTF-8 at byte {pos}"))?
                .to_string();
            self.out.new_str(s)?
        };
        self.push(v);
        Ok(())
    }

    fn memo(&mut self, op: Op, pos: usize) -> Result<(), String> {
        match op {
            Op::BinPut | Op::LongBinPut | Op::Memoize => {
                let id = match op {
                    Op::BinPut => self.le(1)? as u32,
                    Op::LongBinPut => self.le(4)? as u32,
                    _ => u32::try_from(self.memo.len()).map_err(|_| "memo full".to_string())?,
                };
                // The handle is shared: a later GET pushes the same value, not a copy.
                let top = self.top(pos)?;
                self.out.charge(2 * VALUE_BYTES)?;
                self.memo.insert(id, top);
            }
            _ => {
                let id = if op == Op::BinGet {
                    self.le(1)? as u32
                } else {
                    self.le(4)? as u32
                };
                let v = *self
                    .memo
                    .get(&id)
                    .ok_or_else(|| format!("memo {id} unknown at byte {pos}"))?;
                self.push(v);
            }
        }
        Ok(())
    }

    fn container(&mut self, op: Op, pos: usize) -> Result<(), String> {
        match op {
            Op::Tuple | Op::Tuple1 | Op::Tuple2 | Op::Tuple3 => {
                let items = if op == Op::Tuple {
                    self.pop_mark(pos)?
                } else {
                    let n = match op {
                        Op::Tuple1 => 1,
                        Op::Tuple2 => 2,
                        _ => 3,
                    };
                    if self.stack.len() < n {
                        return Err(format!("stack underflow at byte {pos}"));
                    }
                    self.stack.split_off(self.stack.len() - n)
                };
                let t = self.out.new_seq(items, true)?;
                self.push(t);
            }
            Op::Append | Op::Appends => {
                let items = if op == Op::Append {
                    vec![self.pop(pos)?]
                } else {
                    self.pop_mark(pos)?
                };
                match self.top(pos)? {
                    Value::List(i) => self.out.extend_list(i, items)?,
                    Value::Opaque => {}
                    other => return Err(format!("APPEND to {} at byte {pos}", kind(other))),
                }
            }
            _ => {
                let items = if op == Op::SetItem {
                    let v = self.pop(pos)?;
                    let k = self.pop(pos)?;
                    vec![k, v]
                } else {
                    self.pop_mark(pos)?
                };
                if items.len() % 2 != 0 {
                    return Err(format!("odd SETITEMS at byte {pos}"));
                }
                match self.top(pos)? {
                    Value::Dict(i) => self.out.extend_dict(i, &items)?,
                    Value::Opaque => {}
                    other => return Err(format!("SETITEM on {} at byte {pos}", kind(other))),
                }
            }
        }
        Ok(())
    }

    fn global(&mut self, op: Op, pos: usize) -> Result<(), String> {
        let name = if op == Op::Global {
            let module = self.line(pos)?;
            let name = self.line(pos)?;
            format!("{module}.{name}")
        } else {
            // Two strings of the pickle (never a global: joining globals would double a name
            // at every step), each of a name's length.
            let name = self.pop(pos)?;
            let module = self.pop(pos)?;
            match (module, name) {
                (Value::Str(_), Value::Str(_)) => {}
                _ => return Err(format!("STACK_GLOBAL of non-strings at byte {pos}")),
            }
            let m = self.out.str(module).unwrap_or_default();
            let n = self.out.str(name).unwrap_or_default();
            if m.len() + n.len() > MAX_GLOBAL_NAME {
                return Err(format!(
                    "a global name of {} bytes at byte {pos}",
                    m.len() + n.len()
                ));
            }
            format!("{m}.{n}")
        };
        let g = self.out.new_global(name)?;
        self.push(g);
        Ok(())
    }

    /// One newline-terminated line of a GLOBAL's argument.
    fn line(&mut self, pos: usize) -> Result<String, String> {
        let rest = &self.bytes[self.at..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("unterminated GLOBAL at byte {pos}"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.at += n + 1;
        Ok(s)
    }

    /// A BINPERSID of torch.save: `('storage', <storage class>, key, location, numel)`.
    fn persistent(&mut self, pid: Value) -> Result<Value, String> {
        let items = self
            .out
            .seq(pid)
            .filter(|_| matches!(pid, Value::Tuple(_)))
            .ok_or_else(|| format!("a persistent id that is {}, not a tuple", kind(pid)))?;
        let (tag, class, key, numel) = match items {
            [tag, class, key, _location, numel, ..] => (*tag, *class, *key, *numel),
            _ => return Err("a persistent id that is not a storage".into()),
        };
        if self.out.str(tag) != Some("storage") || !matches!(class, Value::Global(_)) {
            return Err("a persistent id that is not a storage".into());
        }
        let class = self.out.str(class).unwrap_or_default();
        let dtype =
            storage_dtype(class).ok_or_else(|| format!("storage type {class} is not supported"))?;
        let key = self
            .out
            .str(key)
            .filter(|_| matches!(key, Value::Str(_)))
            .ok_or_else(|| format!("a storage key that is {}", kind(key)))?
            .to_string();
        let numel = int(numel)
            .filter(|&n| n >= 0)
            .ok_or_else(|| format!("storage {key}: a size that is not a count"))?;
        self.out.new_storage(StorageRef { key, dtype, numel })
    }

    /// The few callables a state dict needs; anything else is opaque.
    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value, String> {
        let (Value::Global(_), Value::Tuple(_)) = (callable, args) else {
            return Ok(Value::Opaque);
        };
        let name = self.out.str(callable).unwrap_or_default();
        let args = self.out.seq(args).unwrap_or_default();
        Ok(match name {
            "collections.OrderedDict" if args.is_empty() => self.out.new_dict()?,
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                let [Value::Storage(storage), offset, shape, stride, ..] = *args else {
                    return Err(format!("{name}: not (storage, offset, size, stride, …)"));
                };
                let offset = int(offset)
                    .ok_or_else(|| format!("{name}: an offset that is {}", kind(offset)))?;
                let tensor = TensorRef {
                    storage,
                    offset,
                    shape: self
                        .out
                        .ints(shape)
                        .map_err(|e| format!("{name}: size: {e}"))?,
                    stride: self
                        .out
                        .ints(stride)
                        .map_err(|e| format!("{name}: stride: {e}"))?,
                };
                self.out.new_tensor(tensor)?
            }
            "torch._utils._rebuild_parameter" => match args.first() {
                Some(&t @ Value::Tensor(_)) => t,
                _ => Value::Opaque,
            },
            _ => Value::Opaque,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Pickle, String> {
        parse(bytes, &Limits::default())
    }

    /// `pickle.dumps({"a": 5, "b": (-2, 300)}, protocol=2)`, then the same cut short and with
    /// an opcode the machine does not run (EXT1).
    #[test]
    fn a_small_pickle_runs_and_broken_ones_are_errors_not_panics() {
        let good = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x05X\x01\x00\x00\x00bq\x02J\xfe\xff\xff\xffM,\x01\x86q\x03u.";
        let p = run(good).unwrap();
        let d = p.dict(p.root.unwrap()).unwrap();
        assert_eq!(p.str(d[0].0), Some("a"));
        assert_eq!(d[0].1, Value::Int(5));
        assert_eq!(p.str(d[1].0), Some("b"));
        assert_eq!(p.ints(d[1].1).unwrap(), [-2, 300]);
        let e = run(&good[..good.len() - 3]).unwrap_err();
        assert!(e.contains("truncated") || e.contains("underflow"), "{e}");
        let e = run(b"\x80\x02\x82\x01.").unwrap_err();
        assert!(
            e.contains("unsupported pickle opcode 0x82 at byte 2"),
            "{e}"
        );
    }

    #[test]
    fn long1_reads_twos_complement_of_every_width() {
        // LONG1 n=1 0xff = -1; n=2 0x00 0x80 = -32768; n=8 max; n=3 positive.
        let p = run(b"\x8a\x01\xff\x8a\x02\x00\x80\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f\x8a\x03\x01\x00\x00\x87.").unwrap();
        assert_eq!(p.ints(p.root.unwrap()).unwrap(), [-32768, i64::MAX, 1]);
        assert!(run(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00.").is_err());
    }

    /// Issue 23, finding 3: a tuple memoised and doubled 40 times (2^40 leaves if copied) and
    /// one long string fetched many times are shared handles: no work or memory grows.
    #[test]
    fn memoised_values_are_shared_not_copied() {
        let mut bomb = b"\x80\x02K\x01K\x01\x86q\x00".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"h\x00h\x00\x86q\x00"); // (m, m) memoised as m
        }
        bomb.push(b'.');
        let p = run(&bomb).unwrap();
        assert_eq!(p.seqs.len(), 41, "one tuple per doubling, no copies");
        let mut many = b"\x80\x02X\x00\x00\x80\x00".to_vec(); // an 8 MiB string
        many.resize(many.len() + (8 << 20), b'x');
        many.extend_from_slice(b"q\x00(");
        for _ in 0..2000 {
            many.extend_from_slice(b"h\x00");
        }
        many.extend_from_slice(b"t.");
        let p = run(&many).unwrap();
        assert_eq!(p.strings.len(), 1, "one string, 2000 handles");
        assert_eq!(p.seq(p.root.unwrap()).unwrap().len(), 2000);
    }

    /// Issue 23, finding 5: a list that contains itself, and a million nested tuples: parsed,
    /// described and dropped without recursion.
    #[test]
    fn self_reference_and_deep_nesting_cost_no_stack() {
        let p = run(b"\x80\x02]q\x00h\x00a.").unwrap();
        let root = p.root.unwrap();
        assert_eq!(p.seq(root).unwrap(), [root], "the list holds itself");
        assert_eq!(kind(root), "a list");
        let mut deep = b"\x80\x02K\x00".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 1_000_000)); // TUPLE1, a million times
        deep.push(b'.');
        let p = run(&deep).unwrap();
        assert_eq!(p.seqs.len(), 1_000_000);
        drop(p);
    }

    #[test]
    fn the_operation_and_size_limits_hold() {
        let limits = Limits {
            max_pickle_ops: 100,
            ..Limits::default()
        };
        let mut many = b"\x80\x02".to_vec();
        many.extend(std::iter::repeat_n(b'N', 200));
        many.push(b'.');
        let e = parse(&many, &limits).unwrap_err();
        assert!(e.contains("more than 100 pickle operations"), "{e}");
        let limits = Limits {
            max_pickle_bytes: 10,
            ..Limits::default()
        };
        let e = parse(&many, &limits).unwrap_err();
        assert!(e.contains("MLA_LIMIT_PICKLE_BYTES"), "{e}");
    }

    /// Found by fuzz_torch_pickle: DUP then STACK_GLOBAL joined a string with itself, and a
    /// global with a global, doubling a name per two bytes (614 bytes → 3 GiB). Joins take
    /// two strings of a name's length; every value is charged against the memory limit.
    #[test]
    fn operations_that_build_on_existing_values_cannot_multiply_the_input() {
        let mut doubling = b"\x80\x02X\x05\x00\x00\x00model".to_vec();
        doubling.extend_from_slice(&[b'2', 0x93].repeat(40));
        doubling.push(b'.');
        let e = run(&doubling).unwrap_err();
        assert!(e.contains("STACK_GLOBAL of non-strings"), "{e}");
        let mut long = b"\x80\x02X\x00\x04\x00\x00".to_vec(); // a 1 KiB string
        long.resize(long.len() + 1024, b'a');
        long.extend_from_slice(b"2\x93.");
        assert!(run(&long)
            .unwrap_err()
            .contains("global name of 2048 bytes"));
        // A memoised value fetched over and over costs a handle each, against the budget.
        let limits = Limits {
            max_pickle_memory: 1 << 20,
            ..Limits::default()
        };
        let mut many = b"\x80\x02]q\x00(".to_vec();
        many.extend(std::iter::repeat_n(*b"h\x00", 100_000).flatten());
        many.extend_from_slice(b"e.");
        let e = parse(&many, &limits).unwrap_err();
        assert!(e.contains("MLA_LIMIT_PICKLE_MEMORY"), "{e}");
        assert!(parse(&many, &Limits::default()).is_ok());
    }

    #[test]
    fn strings_longer_than_the_pickle_are_truncation_not_allocation() {
        // BINUNICODE8 claiming 2^60 bytes.
        let e = run(b"\x80\x02\x8d\x00\x00\x00\x00\x00\x00\x00\x10.").unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
