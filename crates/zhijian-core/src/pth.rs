//! Reading PyTorch `.pth` checkpoints in pure Rust, and converting them to safetensors.
//!
//! LibTorch (and so tch) cannot read what Python's `torch.save` writes: the
//! file is a Python pickle. Some weights we use ship in the *legacy* layout
//! (`torch.save(..., _use_new_zipfile_serialization=False)`), others in today's
//! zip layout. [`read_pth`] reads both; [`convert_pth`] writes the tensors to
//! a safetensors file, which the rest of zhijian loads.
//!
//! The pickle is interpreted by a small stack machine that knows only the
//! opcodes `torch.save` emits and only the handful of Python globals a weights
//! file needs (`collections.OrderedDict`, torch's tensor and parameter rebuild
//! functions, the storage classes). Any other global is an error naming it:
//! nothing in the file is ever executed, so a hostile checkpoint can at worst
//! be refused.
//!
//! Layouts:
//! - **legacy**: five consecutive pickles — a magic number, the protocol
//!   version (1001), a dict of system info, the object itself, the list of
//!   storage keys — then, for each key in that order, an 8-byte little-endian
//!   element count and the storage's raw little-endian bytes;
//! - **zip**: an archive `<name>/data.pkl` (the object) with one entry
//!   `<name>/data/<key>` per storage holding its raw bytes.
//!
//! In both, a storage appears in the object pickle as a persistent id
//! `('storage', torch.FloatStorage, key, location, numel, ...)` and a tensor as
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`: a
//! strided view of a storage, so that several tensors may share one storage.
//!
//! The whole file is read into memory; peak memory is about twice the
//! checkpoint (file bytes plus the tensors built from them).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::weights::save_atomic;

/// The two on-disk layouts of `torch.save`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PthFormat {
    /// Consecutive pickles followed by raw storages (`_use_new_zipfile_serialization=False`).
    Legacy,
    /// A zip archive with `data.pkl` and one `data/<key>` entry per storage (PyTorch ≥ 1.6 default).
    Zip,
}

impl fmt::Display for PthFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PthFormat::Legacy => "legacy pickle",
            PthFormat::Zip => "zip",
        })
    }
}

/// An entry of the checkpoint that is not a tensor and was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its flattened name (dot-joined keys), e.g. `epoch` or `config.lr`.
    pub name: String,
    /// What it is, in Python terms: `int`, `str`, `list`, `empty dict`, …
    pub kind: String,
}

/// What [`read_pth`] found in a checkpoint.
#[derive(Debug)]
pub struct PthContents {
    /// The layout of the file.
    pub format: PthFormat,
    /// Every tensor, in file order, under its flattened name: nested dicts
    /// join their keys with `.` (`{"state_dict": {"w": t}}` gives `state_dict.w`),
    /// lists and tuples holding tensors use the index. Each tensor is
    /// contiguous, on the CPU, with the checkpoint's dtype, and owns its memory.
    pub tensors: Vec<(String, Tensor)>,
    /// Entries that are not tensors (an epoch counter, a config string), in file order.
    pub skipped: Vec<Skipped>,
}

/// What [`convert_pth`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The layout of the input.
    pub format: PthFormat,
    /// How many tensors were written.
    pub tensors: usize,
    /// The total number of elements of those tensors (buffers such as
    /// BatchNorm running statistics included).
    pub parameters: i64,
    /// The size of the safetensors file written, in bytes.
    pub bytes: u64,
    /// The non-tensor entries left out.
    pub skipped: Vec<Skipped>,
}

/// Reads every tensor of a PyTorch checkpoint (legacy or zip layout) without Python.
///
/// Errors: [`Error::Io`] when the file cannot be read; [`Error::CorruptFile`]
/// naming the path when it is not a checkpoint, is truncated, refers to a
/// Python global other than the few a weights file needs (named in the
/// message), or describes a tensor outside its storage.
pub fn read_pth(path: &Path) -> Result<PthContents> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let corrupt = |reason: String| Error::CorruptFile { path: path.into(), reason };
    let (format, root, storages) = if bytes.starts_with(b"PK\x03\x04") {
        let (root, storages) = read_zip(&bytes).map_err(corrupt)?;
        (PthFormat::Zip, root, storages)
    } else if bytes.first() == Some(&PROTO) {
        let (root, storages) = read_legacy(&bytes).map_err(corrupt)?;
        (PthFormat::Legacy, root, storages)
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(corrupt(format!("not a PyTorch checkpoint: neither a zip archive nor a pickle (first bytes: {})", head.join(" "))));
    };
    let mut flat = Flat::default();
    match &root {
        Value::Dict(_) | Value::List(_) | Value::Tuple(_) => flat.walk(&root, "", 0).map_err(corrupt)?,
        other => {
            return Err(corrupt(format!("the checkpoint holds a single {}, not a dict of named tensors", other.kind_name())));
        }
    }
    let tensors = materialize(&flat.tensors, &storages).map_err(corrupt)?;
    Ok(PthContents { format, tensors, skipped: flat.skipped })
}

/// Converts a PyTorch checkpoint to a safetensors file, written atomically
/// (a crash never leaves a half-written `output`).
///
/// Non-tensor entries are left out and listed in the report. A checkpoint
/// without any tensor is an [`Error::CorruptFile`] rather than an empty output.
pub fn convert_pth(input: &Path, output: &Path) -> Result<ConvertReport> {
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize())
        && a == b
    {
        return Err(Error::Config(format!("refusing to overwrite the input {} with its conversion", input.display())));
    }
    let contents = read_pth(input)?;
    if contents.tensors.is_empty() {
        let skipped: Vec<String> = contents.skipped.iter().map(|s| format!("{} ({})", s.name, s.kind)).collect();
        return Err(Error::CorruptFile {
            path: input.into(),
            reason: format!("no tensors to convert; entries found: {}", if skipped.is_empty() { "none".into() } else { skipped.join(", ") }),
        });
    }
    let bytes = save_atomic(&contents.tensors, output)?;
    Ok(ConvertReport {
        format: contents.format,
        tensors: contents.tensors.len(),
        parameters: contents.tensors.iter().map(|(_, t)| t.numel() as i64).sum(),
        bytes,
        skipped: contents.skipped,
    })
}

// ---------------------------------------------------------------------------
// Layouts

/// `0x1950a86a20f9469cfc6c`, the legacy layout's magic number, as the
/// little-endian two's-complement bytes pickle's LONG1 stores.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The only legacy protocol version PyTorch has written.
const LEGACY_PROTOCOL: i64 = 1001;

/// Internal results carry only the reason; [`read_pth`] adds the path.
type R<T> = std::result::Result<T, String>;

/// The storages the object pickle referred to, in first-use order, each with its bytes.
type Storages = Vec<(Rc<StorageRef>, Vec<u8>)>;

fn read_legacy(bytes: &[u8]) -> R<(Value, Storages)> {
    let mut pos = 0;
    let next = |pos: &mut usize, what: &str| -> R<Value> {
        let (v, end) = Unpickler::new(bytes, *pos).run().map_err(|e| format!("{what}: {e}"))?;
        *pos = end;
        Ok(v)
    };
    match next(&mut pos, "magic number")? {
        Value::BigInt(b) if *b == LEGACY_MAGIC => {}
        _ => return Err("a pickle, but not a PyTorch checkpoint (wrong magic number)".into()),
    }
    match next(&mut pos, "protocol version")? {
        Value::Int(LEGACY_PROTOCOL) => {}
        v => return Err(format!("unsupported legacy protocol version {v:?} (only {LEGACY_PROTOCOL} is known)")),
    }
    let info = next(&mut pos, "system info")?;
    if info.get("little_endian").is_some_and(|v| matches!(v, Value::Bool(false))) {
        return Err("written on a big-endian machine; only little-endian checkpoints are supported".into());
    }
    let mut vm = Unpickler::new(bytes, pos);
    let (root, end) = vm.run().map_err(|e| format!("object pickle: {e}"))?;
    let refs = std::mem::take(&mut vm.storages);
    pos = end;
    let keys = match next(&mut pos, "storage key list")? {
        Value::List(l) => l.borrow().iter().map(|k| k.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>(),
        _ => None,
    }
    .ok_or("the storage key list is not a list of strings")?;
    let by_key: HashMap<&str, &Rc<StorageRef>> = refs.iter().map(|s| (s.key.as_str(), s)).collect();
    let mut data: HashMap<String, Vec<u8>> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let storage = by_key
            .get(key.as_str())
            .ok_or_else(|| format!("storage `{key}` is listed in the data section but no tensor uses it, so its element size is unknown"))?;
        let head = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| format!("storage {i} of {} (`{key}`): its 8-byte length is missing, file ends after {} bytes", keys.len(), bytes.len()))?;
        let numel = i64::from_le_bytes(head.try_into().expect("8 bytes"));
        pos += 8;
        if numel != storage.numel {
            return Err(format!("storage {i} (`{key}`): the pickle says {} elements, the data section says {numel}", storage.numel));
        }
        let need = storage.nbytes()?;
        let body = bytes
            .get(pos..pos.saturating_add(need))
            .ok_or_else(|| format!("storage {i} of {} (`{key}`) needs {need} bytes at offset {pos}, file ends after {} bytes", keys.len(), bytes.len()))?;
        data.insert(key.clone(), body.to_vec());
        pos += need;
    }
    let storages = refs
        .into_iter()
        .map(|s| {
            let bytes = data.remove(&s.key).ok_or_else(|| format!("storage `{}` is used but missing from the data section", s.key))?;
            Ok((s, bytes))
        })
        .collect::<R<Storages>>()?;
    Ok((root, storages))
}

fn read_zip(bytes: &[u8]) -> R<(Value, Storages)> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| format!("not a readable zip archive: {e}"))?;
    // The archive's top folder is named after the file it was saved as; find it through data.pkl.
    let pkl = zip
        .file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .map(str::to_owned)
        .ok_or("a zip archive without a data.pkl entry, so not a PyTorch checkpoint")?;
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let mut read = |name: &str| -> R<Option<Vec<u8>>> {
        let mut entry = match zip.by_name(name) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(format!("entry {name}: {e}")),
        };
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut out).map_err(|e| format!("entry {name}: {e}"))?;
        Ok(Some(out))
    };
    if let Some(order) = read(&format!("{prefix}byteorder"))?
        && order.trim_ascii() != b"little"
    {
        return Err(format!("byte order `{}`; only little-endian checkpoints are supported", String::from_utf8_lossy(&order)));
    }
    let pickle = read(&pkl)?.expect("listed above");
    let mut vm = Unpickler::new(&pickle, 0);
    let (root, _) = vm.run().map_err(|e| format!("{pkl}: {e}"))?;
    let mut storages = Storages::new();
    for s in std::mem::take(&mut vm.storages) {
        let name = format!("{prefix}data/{}", s.key);
        let data = read(&name)?.ok_or_else(|| format!("storage `{}`: entry {name} is missing from the archive", s.key))?;
        let need = s.nbytes()?;
        if data.len() < need {
            return Err(format!("storage `{}` needs {need} bytes, entry {name} holds {}", s.key, data.len()));
        }
        storages.push((s, data));
    }
    Ok((root, storages))
}

// ---------------------------------------------------------------------------
// Tensors

/// A storage as the pickle names it.
#[derive(Debug)]
struct StorageRef {
    key: String,
    kind: Kind,
    /// Length in elements of `kind`.
    numel: i64,
}

impl StorageRef {
    fn nbytes(&self) -> R<usize> {
        usize::try_from(self.numel)
            .ok()
            .and_then(|n| n.checked_mul(self.kind.elt_size_in_bytes()))
            .ok_or_else(|| format!("storage `{}` has an impossible length of {} elements", self.key, self.numel))
    }
}

/// A tensor as the pickle describes it: a strided view of a storage.
#[derive(Debug)]
struct TensorSpec {
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl TensorSpec {
    /// Checks that the view stays inside its storage (LibTorch would read past it otherwise).
    fn check_bounds(&self, name: &str) -> R<()> {
        let bad = |why: &str| {
            format!(
                "tensor `{name}` (size {:?}, stride {:?}, offset {}) {why} storage `{}` of {} elements",
                self.size, self.stride, self.offset, self.storage.key, self.storage.numel
            )
        };
        if self.size.len() != self.stride.len() {
            return Err(bad("has not as many strides as sizes, so it cannot view"));
        }
        if self.offset < 0 || self.size.iter().chain(&self.stride).any(|&v| v < 0) {
            return Err(bad("has a negative size, stride or offset for"));
        }
        if self.size.contains(&0) {
            return Ok(());
        }
        let last = self.size.iter().zip(&self.stride).try_fold(self.offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d)));
        match last {
            Some(last) if last < self.storage.numel => Ok(()),
            _ => Err(bad("reaches past the end of")),
        }
    }
}

/// Builds each tensor from its storage's bytes: `as_strided` then a contiguous copy.
fn materialize(specs: &[(String, Rc<TensorSpec>)], storages: &Storages) -> R<Vec<(String, Tensor)>> {
    let mut users: HashMap<&str, usize> = HashMap::new();
    for (_, spec) in specs {
        *users.entry(spec.storage.key.as_str()).or_default() += 1;
    }
    let bytes: HashMap<&str, &[u8]> = storages.iter().map(|(s, b)| (s.key.as_str(), b.as_slice())).collect();
    let mut built: HashMap<&str, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(specs.len());
    for (name, spec) in specs {
        spec.check_bounds(name)?;
        let s = &spec.storage;
        let torch_err = |e: tch::TchError| format!("tensor `{name}`: {e}");
        let storage = match built.get(s.key.as_str()) {
            Some(t) => t.shallow_clone(),
            None => {
                // Lengths were checked against the file when the bytes were read.
                let data = &bytes[s.key.as_str()][..s.nbytes()?];
                let t = Tensor::f_from_data_size(data, &[s.numel], s.kind).map_err(torch_err)?;
                built.insert(&s.key, t.shallow_clone());
                t
            }
        };
        let view = storage.f_as_strided(spec.size.as_slice(), spec.stride.as_slice(), spec.offset).map_err(torch_err)?;
        let numel: i64 = spec.size.iter().product();
        // A tensor alone on its storage and covering it in order can keep it;
        // any other view is copied so that no two returned tensors share memory.
        let owns_all = users[s.key.as_str()] == 1 && spec.offset == 0 && numel == s.numel;
        let tensor = if owns_all && view.is_contiguous() {
            view
        } else if view.is_contiguous() {
            view.copy()
        } else {
            view.f_contiguous().map_err(torch_err)?
        };
        out.push((name.clone(), tensor));
    }
    Ok(out)
}

/// Flattens the unpickled object into named tensors and skipped entries.
#[derive(Default)]
struct Flat {
    tensors: Vec<(String, Rc<TensorSpec>)>,
    skipped: Vec<Skipped>,
}

/// Deeper nesting than this is taken for a reference cycle.
const MAX_DEPTH: usize = 64;

impl Flat {
    fn walk(&mut self, v: &Value, name: &str, depth: usize) -> R<()> {
        if depth > MAX_DEPTH {
            return Err(format!("`{name}` is nested more than {MAX_DEPTH} levels deep (a reference cycle?)"));
        }
        let join = |key: &str| if name.is_empty() { key.to_owned() } else { format!("{name}.{key}") };
        match v {
            Value::Tensor(t) => {
                if self.tensors.iter().any(|(n, _)| n == name) {
                    return Err(format!("two tensors flatten to the same name `{name}`"));
                }
                self.tensors.push((name.to_owned(), t.clone()));
            }
            Value::Dict(d) if !d.borrow().is_empty() => {
                for (k, v) in d.borrow().iter() {
                    match k {
                        Value::Str(k) => self.walk(v, &join(k), depth + 1)?,
                        Value::Int(k) => self.walk(v, &join(&k.to_string()), depth + 1)?,
                        other => self.skipped.push(Skipped { name: join(&format!("<{} key>", other.kind_name())), kind: v.kind_name().into() }),
                    }
                }
            }
            Value::List(_) | Value::Tuple(_) if v.holds_tensor(0) => {
                let items: Vec<Value> = match v {
                    Value::List(l) => l.borrow().clone(),
                    Value::Tuple(t) => t.to_vec(),
                    _ => unreachable!("matched above"),
                };
                for (i, item) in items.iter().enumerate() {
                    self.walk(item, &join(&i.to_string()), depth + 1)?;
                }
            }
            other => self.skipped.push(Skipped { name: name.to_owned(), kind: other.kind_name().into() }),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The pickle machine

/// A Python object as far as a weights file needs it.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    /// Floats and byte strings are only ever skipped, so their values are not kept.
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<[Value]>),
    /// Lists and dicts are shared and mutable: the memo hands out the same
    /// object again, and APPEND/SETITEM fill it after it was memoised.
    List(Rc<RefCell<Vec<Value>>>),
    /// Insertion-ordered; pickled dicts never repeat a key.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorSpec>),
}

impl Value {
    fn kind_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(d) if d.borrow().is_empty() => "empty dict",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class or function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d.borrow().iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v.clone()),
            _ => None,
        }
    }

    fn holds_tensor(&self, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return false;
        }
        match self {
            Value::Tensor(_) => true,
            Value::List(l) => l.borrow().iter().any(|v| v.holds_tensor(depth + 1)),
            Value::Tuple(t) => t.iter().any(|v| v.holds_tensor(depth + 1)),
            Value::Dict(d) => d.borrow().iter().any(|(_, v)| v.holds_tensor(depth + 1)),
            _ => false,
        }
    }
}

/// The Python globals a weights file may name; any other is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    TensorClass,
    ParameterClass,
    StorageClass(Kind),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
            ("torch", "Tensor") | ("torch._tensor", "Tensor") => Global::TensorClass,
            ("torch.nn.parameter", "Parameter") => Global::ParameterClass,
            ("torch", storage) => Global::StorageClass(match storage {
                "FloatStorage" => Kind::Float,
                "DoubleStorage" => Kind::Double,
                "HalfStorage" => Kind::Half,
                "BFloat16Storage" => Kind::BFloat16,
                "LongStorage" => Kind::Int64,
                "IntStorage" => Kind::Int,
                "ShortStorage" => Kind::Int16,
                "CharStorage" => Kind::Int8,
                "ByteStorage" | "UntypedStorage" => Kind::Uint8,
                "BoolStorage" => Kind::Bool,
                _ => return None,
            }),
            _ => return None,
        })
    }
}

const PROTO: u8 = 0x80;

/// Runs one pickle from `pos` to its STOP.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Every storage the persistent ids named, in first-use order.
    storages: Vec<Rc<StorageRef>>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Unpickler { data, pos, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), storages: Vec::new() }
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("needs {n} more bytes at offset {}, but the data ends after {} bytes (truncated?)", self.pos, self.data.len()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> R<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn len(&mut self, width: usize) -> R<usize> {
        let raw = match width {
            1 => u64::from(self.u8()?),
            4 => u64::from(u32::from_le_bytes(self.le()?)),
            _ => u64::from_le_bytes(self.le()?),
        };
        usize::try_from(raw).map_err(|_| format!("impossible length {raw}"))
    }

    fn line(&mut self) -> R<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("a GLOBAL's name is not terminated (truncated?)")?;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| "a GLOBAL's name is not UTF-8".to_string())
    }

    fn pop(&mut self) -> R<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("pops past a MARK".into());
        }
        self.stack.pop().ok_or_else(|| "pops an empty stack".to_string())
    }

    fn top(&mut self) -> R<&mut Value> {
        self.stack.last_mut().ok_or_else(|| "expects an object on the stack".to_string())
    }

    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let mark = self.marks.pop().ok_or("has no MARK to pop to")?;
        Ok(self.stack.split_off(mark))
    }

    fn int(bytes: &[u8]) -> Value {
        if bytes.len() <= 8 {
            // Sign-extend the little-endian two's complement to 64 bits.
            let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) { 0xff } else { 0 };
            let mut buf = [fill; 8];
            buf[..bytes.len()].copy_from_slice(bytes);
            Value::Int(i64::from_le_bytes(buf))
        } else {
            Value::BigInt(bytes.into())
        }
    }

    fn string(bytes: &[u8]) -> R<Value> {
        std::str::from_utf8(bytes).map(|s| Value::Str(s.into())).map_err(|_| "a string is not valid UTF-8".to_string())
    }

    /// Runs to STOP; returns the result and the offset just past the STOP.
    fn run(&mut self) -> R<(Value, usize)> {
        loop {
            let at = self.pos;
            let op = self.u8().map_err(|_| format!("ends at offset {at} before its STOP opcode (truncated?)"))?;
            match self.step(op) {
                Ok(Some(v)) => return Ok((v, self.pos)),
                Ok(None) => {}
                Err(e) => return Err(format!("opcode 0x{op:02x} at offset {at} {e}")),
            }
        }
    }

    /// Executes one opcode; `Some` at STOP.
    fn step(&mut self, op: u8) -> R<Option<Value>> {
        match op {
            PROTO => {
                let v = self.u8()?;
                if v > 5 {
                    return Err(format!("declares pickle protocol {v}, newer than 5"));
                }
            }
            0x95 => {
                // FRAME: only a read-ahead hint; the frame's opcodes follow inline.
                self.take(8)?;
            }
            b'.' => {
                let v = self.pop()?;
                return Ok(Some(v));
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v);
            }
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.le()?);
                self.stack.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.u8()?;
                self.stack.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.le()?);
                self.stack.push(Value::Int(v.into()));
            }
            0x8a | 0x8b => {
                let n = self.len(if op == 0x8a { 1 } else { 4 })?;
                let bytes = self.take(n)?;
                self.stack.push(Self::int(bytes));
            }
            b'G' => {
                self.take(8)?;
                self.stack.push(Value::Float);
            }
            b'X' | 0x8c | 0x8d => {
                let n = self.len(match op {
                    0x8c => 1,
                    b'X' => 4,
                    _ => 8,
                })?;
                let bytes = self.take(n)?;
                self.stack.push(Self::string(bytes)?);
            }
            b'T' | b'U' => {
                // Python 2 `str`: bytes that Python 3 reads as latin-1 text.
                let n = self.len(if op == b'U' { 1 } else { 4 })?;
                let text: String = self.take(n)?.iter().map(|&b| char::from(b)).collect();
                self.stack.push(Value::Str(text.into()));
            }
            b'B' | b'C' | 0x8e => {
                let n = self.len(match op {
                    b'C' => 1,
                    b'B' => 4,
                    _ => 8,
                })?;
                self.take(n)?;
                self.stack.push(Value::Bytes);
            }
            b'}' => self.stack.push(Value::Dict(Rc::default())),
            b']' => self.stack.push(Value::List(Rc::default())),
            b')' => self.stack.push(Value::Tuple(Rc::new([]))),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items.into()));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if self.stack.len() < n || self.marks.last().is_some_and(|&m| m > self.stack.len() - n) {
                    return Err(format!("needs {n} objects on the stack"));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items.into()));
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = Self::pairs(items)?;
                self.stack.push(Value::Dict(Rc::new(RefCell::new(pairs))));
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![(k, v)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let pairs = Self::pairs(items)?;
                self.set_items(pairs)?;
            }
            b'q' | b'r' => {
                let idx = if op == b'q' { u32::from(self.u8()?) } else { u32::from_le_bytes(self.le()?) };
                let v = self.top()?.clone();
                self.memo.insert(idx, v);
            }
            0x94 => {
                // MEMOIZE (protocol 4): the next free index.
                let idx = u32::try_from(self.memo.len()).map_err(|_| "memo overflow".to_string())?;
                let v = self.top()?.clone();
                self.memo.insert(idx, v);
            }
            b'h' | b'j' => {
                let idx = if op == b'h' { u32::from(self.u8()?) } else { u32::from_le_bytes(self.le()?) };
                let v = self.memo.get(&idx).cloned().ok_or_else(|| format!("reads memo slot {idx}, which was never written"))?;
                self.stack.push(v);
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack.push(Value::Global(Self::global(module, name)?));
            }
            0x93 => {
                // STACK_GLOBAL (protocol 4): module and name are strings on the stack.
                let name = self.pop()?;
                let module = self.pop()?;
                let (Some(module), Some(name)) = (module.as_str(), name.as_str()) else {
                    return Err("expects two strings (module, name)".into());
                };
                self.stack.push(Value::Global(Self::global(module, name)?));
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let Value::Tuple(args) = args else {
                    return Err(format!("expects an argument tuple, got a {}", args.kind_name()));
                };
                let Value::Global(func) = func else {
                    return Err(format!("calls a {}, which is not a known function", func.kind_name()));
                };
                let v = Self::call(func, &args)?;
                self.stack.push(v);
            }
            b'b' => {
                // BUILD sets an object's attributes: an OrderedDict's `_metadata`
                // (module versions), a parameter's Python state. None of it is an
                // entry of the checkpoint, so it is dropped.
                let _state = self.pop()?;
                let target = self.top()?;
                if !matches!(target, Value::Dict(_) | Value::Tensor(_)) {
                    return Err(format!("sets the state of a {}, which a weights file never needs", target.kind_name()));
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.persistent_storage(&pid)?;
                self.stack.push(Value::Storage(storage));
            }
            _ => {
                return Err("is not one that torch.save emits for weights (text-mode pickles, sets and custom classes are not supported)".into());
            }
        }
        Ok(None)
    }

    fn global(module: &str, name: &str) -> R<Global> {
        Global::resolve(module, name).ok_or_else(|| {
            format!(
                "refers to the Python global `{module}.{name}`, which a weights file does not need; only tensors, \
                 parameters, storages and (ordered) dicts are read, and nothing in the file is executed"
            )
        })
    }

    fn pairs(items: Vec<Value>) -> R<Vec<(Value, Value)>> {
        if !items.len().is_multiple_of(2) {
            return Err("has an odd number of keys and values".into());
        }
        let mut it = items.into_iter();
        let mut pairs = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(pairs)
    }

    fn append(&mut self, items: Vec<Value>) -> R<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!("appends to a {}, not a list", other.kind_name())),
        }
    }

    fn set_items(&mut self, pairs: Vec<(Value, Value)>) -> R<()> {
        match self.top()? {
            Value::Dict(d) => {
                d.borrow_mut().extend(pairs);
                Ok(())
            }
            other => Err(format!("sets items on a {}, not a dict", other.kind_name())),
        }
    }

    /// `('storage', torch.XStorage, key, location, numel[, view_metadata])`.
    fn persistent_storage(&mut self, pid: &Value) -> R<Rc<StorageRef>> {
        let Value::Tuple(t) = pid else {
            return Err(format!("expects a persistent id tuple, got a {}", pid.kind_name()));
        };
        let shape_err = || format!("expects ('storage', StorageType, key, location, numel), got {} items", t.len());
        if t.len() < 5 || t[0].as_str() != Some("storage") {
            return Err(shape_err());
        }
        let Value::Global(Global::StorageClass(kind)) = t[1] else { return Err(shape_err()) };
        let key = match &t[2] {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => return Err(shape_err()),
        };
        let Value::Int(numel) = t[4] else { return Err(shape_err()) };
        // Old PyTorch could save a storage as a slice of another; it has not done so since 1.x.
        if t.get(5).is_some_and(|v| !matches!(v, Value::None)) {
            return Err(format!("storage `{key}` is a view of another storage, a layout from old PyTorch that is not supported"));
        }
        if let Some(s) = self.storages.iter().find(|s| s.key == key) {
            if s.kind != kind || s.numel != numel {
                return Err(format!("storage `{key}` is named twice with different types ({:?} × {}, then {kind:?} × {numel})", s.kind, s.numel));
            }
            return Ok(s.clone());
        }
        let s = Rc::new(StorageRef { key, kind, numel });
        self.storages.push(s.clone());
        Ok(s)
    }

    /// Applies one of the allowed functions (REDUCE).
    fn call(func: Global, args: &[Value]) -> R<Value> {
        let ints = |v: &Value, what: &str| -> R<Vec<i64>> {
            let Value::Tuple(t) = v else { return Err(format!("expects the tensor's {what} as a tuple")) };
            t.iter().map(|x| if let Value::Int(i) = x { Ok(*i) } else { Err(format!("has a non-integer in the tensor's {what}")) }).collect()
        };
        match func {
            Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Rc::default())),
            Global::RebuildTensorV2 | Global::RebuildTensor if args.len() >= 4 => {
                let Value::Storage(storage) = &args[0] else {
                    return Err(format!("rebuilds a tensor from a {}, not a storage", args[0].kind_name()));
                };
                let Value::Int(offset) = args[1] else { return Err("expects the tensor's storage offset as an int".into()) };
                let spec = TensorSpec { storage: storage.clone(), offset, size: ints(&args[2], "size")?, stride: ints(&args[3], "stride")? };
                Ok(Value::Tensor(Rc::new(spec)))
            }
            // (data, requires_grad, backward_hooks[, state]): the data is the tensor.
            Global::RebuildParameter | Global::RebuildParameterWithState if matches!(args.first(), Some(Value::Tensor(_))) => Ok(args[0].clone()),
            // (func, type, args, state): a tensor subclass rebuilt by `func`; only plain tensors and parameters.
            Global::RebuildFromTypeV2 if args.len() == 4 => {
                let (Value::Global(inner), Value::Global(Global::TensorClass | Global::ParameterClass), Value::Tuple(inner_args)) =
                    (&args[0], &args[1], &args[2])
                else {
                    return Err("rebuilds a tensor subclass other than torch.Tensor or nn.Parameter".into());
                };
                Self::call(*inner, inner_args)
            }
            other => Err(format!("calls {other:?} with {} unexpected argument(s)", args.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::read_safetensors;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    /// The order `scripts/gen_pth_fixture.py` puts the tensors in.
    const FIXTURE_NAMES: [&str; 18] = [
        "f32",
        "f64",
        "f16",
        "bf16",
        "i64",
        "i32",
        "i8",
        "u8",
        "mask",
        "transposed",
        "view_a",
        "view_b",
        "scalar",
        "empty",
        "param",
        "block.weight",
        "block.inner.bias",
        "aux.0",
    ];

    fn check_against_expected(contents: &PthContents) {
        let expected: HashMap<String, Tensor> = read_safetensors(&fixture("tiny_expected.safetensors")).unwrap().into_iter().collect();
        let names: Vec<&str> = contents.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, FIXTURE_NAMES);
        assert_eq!(expected.len(), names.len());
        for (name, got) in &contents.tensors {
            let want = &expected[name];
            assert_eq!(got.kind(), want.kind(), "{name}");
            assert_eq!(got.size(), want.size(), "{name}");
            assert!(got.is_contiguous() && got.device() == tch::Device::Cpu, "{name}");
            assert!(got.equal(want), "{name}: {got} vs {want}");
        }
        assert_eq!(
            contents.skipped,
            vec![
                Skipped { name: "step".into(), kind: "int".into() },
                Skipped { name: "aux.1".into(), kind: "str".into() },
                Skipped { name: "note".into(), kind: "empty dict".into() },
            ]
        );
    }

    #[test]
    fn legacy_fixture_decodes_to_the_expected_tensors() {
        let contents = read_pth(&fixture("tiny_legacy.pth")).unwrap();
        assert_eq!(contents.format, PthFormat::Legacy);
        check_against_expected(&contents);
    }

    #[test]
    fn zip_fixture_decodes_to_the_expected_tensors() {
        let contents = read_pth(&fixture("tiny_zip.pth")).unwrap();
        assert_eq!(contents.format, PthFormat::Zip);
        check_against_expected(&contents);
    }

    #[test]
    fn views_of_one_storage_do_not_share_memory() {
        let contents = read_pth(&fixture("tiny_legacy.pth")).unwrap();
        let get = |n: &str| contents.tensors.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let (mut a, b) = (get("view_a"), get("view_b"));
        let before = b.copy();
        let _ = a.fill_(100.0);
        assert!(b.equal(&before));
    }

    #[test]
    fn convert_writes_a_safetensors_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/tiny.safetensors");
        let report = convert_pth(&fixture("tiny_zip.pth"), &out).unwrap();
        assert_eq!((report.format, report.tensors), (PthFormat::Zip, FIXTURE_NAMES.len()));
        let back = read_safetensors(&out).unwrap();
        assert_eq!(back.len(), FIXTURE_NAMES.len());
        assert_eq!(report.parameters, back.iter().map(|(_, t)| t.numel() as i64).sum::<i64>());
        assert_eq!(report.skipped.len(), 3);
        assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn corrupt_reason(path: &Path) -> String {
        match read_pth(path) {
            Err(Error::CorruptFile { path: p, reason }) => {
                assert_eq!(p, path);
                reason
            }
            other => panic!("expected CorruptFile, got {other:?}"),
        }
    }

    #[test]
    fn truncated_files_are_corrupt_and_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let full = std::fs::read(fixture("tiny_legacy.pth")).unwrap();
        // Cut inside the last storage's bytes.
        let p = write(dir.path(), "cut_data.pth", &full[..full.len() - 3]);
        let reason = corrupt_reason(&p);
        assert!(reason.contains("needs") && reason.contains(&format!("file ends after {} bytes", full.len() - 3)), "{reason}");
        // Cut inside the object pickle, and inside the header.
        for cut in [full.len() / 2, 5] {
            let p = write(dir.path(), "cut.pth", &full[..cut]);
            let reason = corrupt_reason(&p);
            assert!(reason.contains("truncated"), "{cut}: {reason}");
        }
        let zip = std::fs::read(fixture("tiny_zip.pth")).unwrap();
        let p = write(dir.path(), "cut_zip.pth", &zip[..zip.len() - 100]);
        assert!(corrupt_reason(&p).contains("zip"));
        let p = write(dir.path(), "text.pth", b"hello, world");
        assert!(corrupt_reason(&p).contains("not a PyTorch checkpoint"));
        let err = read_pth(&dir.path().join("missing.pth")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("missing.pth"), "{err}");
    }

    /// The three header pickles of a legacy file, taken from the fixture.
    fn legacy_header() -> Vec<u8> {
        let full = std::fs::read(fixture("tiny_legacy.pth")).unwrap();
        let mut pos = 0;
        for _ in 0..3 {
            pos = Unpickler::new(&full, pos).run().unwrap().1;
        }
        full[..pos].to_vec()
    }

    #[test]
    fn unknown_globals_are_refused_by_name_and_never_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = legacy_header();
        // {'x': posix.system('echo pwned')}
        bytes.extend_from_slice(b"\x80\x02}X\x01\x00\x00\x00xcposix\nsystem\nX\x0a\x00\x00\x00echo pwned\x85Rs.");
        let p = write(dir.path(), "evil.pth", &bytes);
        let reason = corrupt_reason(&p);
        assert!(reason.contains("`posix.system`") && reason.contains("nothing in the file is executed"), "{reason}");
    }

    /// `{'w': _rebuild_tensor_v2(storage '0' of 2 floats, offset, size (2,), stride (1,))}` as a legacy file.
    fn one_view(offset: u8) -> Vec<u8> {
        let mut bytes = legacy_header();
        bytes.extend_from_slice(
            b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n\
              X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02NtQK",
        );
        bytes.push(offset);
        bytes.extend_from_slice(b"K\x02\x85K\x01\x85\x89tRs.");
        bytes.extend_from_slice(b"\x80\x02]X\x01\x00\x00\x000a.");
        bytes.extend_from_slice(&2i64.to_le_bytes());
        bytes.extend_from_slice(&[0; 8]);
        bytes
    }

    #[test]
    fn a_view_past_its_storage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "ok.pth", &one_view(0));
        assert_eq!(read_pth(&p).unwrap().tensors[0].1.size(), [2]);
        let p = write(dir.path(), "oob.pth", &one_view(1));
        let reason = corrupt_reason(&p);
        assert!(reason.contains("tensor `w`") && reason.contains("past the end"), "{reason}");
    }

    /// The real EfficientNet-Lite0 ImageNet weights (legacy layout). Expected
    /// figures from Python (torch 2.11):
    /// `sd = torch.load(path, weights_only=False)`; `len(sd)` = 296;
    /// `sum(v.numel() for v in sd.values())` = 4_694_073;
    /// without keys ending in running_mean / running_var / num_batches_tracked:
    /// 149 tensors, 4_652_008 elements; `sd['_conv_stem.weight'].double().sum()`
    /// = -26.811376610887237 and, weighted by the flat index
    /// `(w.flatten() * torch.arange(w.numel(), dtype=torch.float64)).sum()`,
    /// -6051.748981363955 (order-sensitive: 50 tensors of this file, this one
    /// included, are stored with permuted strides).
    #[test]
    fn efficientnet_lite0_converts_with_the_figures_python_gives() {
        let path = match zhijian_assets::locate("efficientnet-lite0", "efficientnet-lite0-57934424.pth") {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("lite0.safetensors");
        let report = convert_pth(&path, &out).unwrap();
        assert_eq!((report.format, report.tensors, report.parameters), (PthFormat::Legacy, 296, 4_694_073));
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        let tensors = read_safetensors(&out).unwrap();
        let buffer = |n: &str| ["running_mean", "running_var", "num_batches_tracked"].iter().any(|b| n.ends_with(b));
        let params: Vec<&(String, Tensor)> = tensors.iter().filter(|(n, _)| !buffer(n)).collect();
        assert_eq!(params.len(), 149);
        assert_eq!(params.iter().map(|(_, t)| t.numel() as i64).sum::<i64>(), 4_652_008);
        let get = |n: &str| &tensors.iter().find(|(k, _)| k == n).unwrap().1;
        assert_eq!(get("_fc.weight").size(), [1000, 1280]);
        let stem = get("_conv_stem.weight").to_kind(Kind::Double);
        assert_eq!(stem.size(), [32, 3, 3, 3]);
        assert!((stem.sum(Kind::Double).double_value(&[]) - -26.811376610887237).abs() < 1e-6);
        let index = Tensor::arange(stem.numel() as i64, (Kind::Double, tch::Device::Cpu));
        let weighted = (stem.flatten(0, -1) * index).sum(Kind::Double).double_value(&[]);
        assert!((weighted - -6051.748981363955).abs() < 1e-6, "{weighted}");
        assert_eq!(get("_bn0.num_batches_tracked").kind(), Kind::Int64);
    }
}
