//! GGUF reader over a memory map: metadata and tensor descriptors are parsed, tensor bytes stay in the
//! mapping (never copied or dequantized at load), so resident memory is what the forward pass touches.

// Mapping a file (`Mmap::map`) and MADV_DONTNEED on it are unsafe in memmap2 and have no safe equivalent.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file (magic {magic:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated or corrupt at byte {at}: {what}")]
    Corrupt {
        path: PathBuf,
        at: usize,
        what: String,
    },
    #[error("metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("metadata key `{key}` has type {found}, expected {expected}")]
    WrongType {
        key: String,
        found: &'static str,
        expected: &'static str,
    },
}

/// GGML tensor element types. Codes follow ggml.h; types we cannot compute on are still parsed so that
/// the engine can refuse them by name.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    BF16,
    Other(u32),
}

impl GgmlType {
    /// The type's code in a GGUF file (the inverse of [`GgmlType::from_code`]).
    pub fn code(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
            Self::Other(c) => c,
        }
    }

    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            c => Self::Other(c),
        }
    }

    /// (elements per block, bytes per block); None for types whose layout we do not know.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2_K => (256, 84),
            Self::Q3_K => (256, 110),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            Self::Q8_K => (256, 292),
            Self::Other(_) => return None,
        })
    }

    pub fn name(self) -> String {
        match self {
            Self::Other(c) => format!("ggml type {c}"),
            t => format!("{t:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().map(|v| v as i64),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: dims[0] is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub size_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A model file's bytes: the file mapping itself, or a private copy (see `GgufFile::open_resident`).
enum Bytes {
    Mapped(Mmap),
    Resident { map: Mmap, off: usize, len: usize },
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Resident { map, off, len } => &map[*off..*off + *len],
        }
    }
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Bytes,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// Metadata keys in file order (a rewritten file, e.g. by `porteiro quantize`, keeps it).
    pub key_order: Vec<String>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, what: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            at: self.pos,
            what: what.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.corrupt(format!("need {n} bytes, file ends"))),
        }
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self) -> Result<usize, GgufError> {
        let n = self.u64()?;
        // Every element takes at least one byte, so a length beyond the file is corrupt, not a huge alloc.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(self.corrupt(format!("length {n} exceeds the file")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        // Vocabularies occasionally hold invalid UTF-8 fragments; keep them lossily rather than refuse.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.corrupt("arrays nested too deeply"));
                }
                let ety = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            t => return Err(self.corrupt(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; it stays sound only while no other
        // process truncates or rewrites the model file, which the model cache never does to a file it
        // serves (files are fetched to a temporary name and renamed into place).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Bytes::Mapped(mmap))
    }

    /// Like `open`, but reads the file into anonymous memory backed by 2 MiB pages where the kernel
    /// allows (transparent huge pages). Decoding streams every weight once per token; with 4 KiB
    /// pages of a file mapping that is a TLB miss every 4 KiB, and the hardware prefetcher stops at
    /// each page. Measured here: +16% single-thread decode on Qwen2.5-0.5B. Costs a read of the file
    /// at load and the same resident memory as a fully touched mapping.
    pub fn open_resident(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len() as usize;
        const HUGE: usize = 2 << 20;
        let mut anon = memmap2::MmapOptions::new()
            .len(len + HUGE)
            .map_anon()
            .map_err(io)?;
        let off = anon.as_ptr().align_offset(HUGE);
        // Advice only: without THP the copy still works, on small pages.
        let _ = anon.advise(memmap2::Advice::HugePage);
        // First touch of fresh memory (the kernel zeroing each page) dominates the copy on VMs:
        // fault the halves in from several threads.
        let parts = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        let chunk = len.div_ceil(parts).next_multiple_of(HUGE);
        std::thread::scope(|sc| {
            let jobs: Vec<_> = anon[off..off + len]
                .chunks_mut(chunk)
                .enumerate()
                .map(|(i, dst)| {
                    let file = &file;
                    sc.spawn(move || {
                        std::os::unix::fs::FileExt::read_exact_at(file, dst, (i * chunk) as u64)
                    })
                })
                .collect();
            jobs.into_iter().try_for_each(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("reader panicked")))
            })
        })
        .map_err(io)?;
        let map = anon.make_read_only().map_err(io)?;
        Self::parse(path, Bytes::Resident { map, off, len })
    }

    fn parse(path: PathBuf, mmap: Bytes) -> Result<Self, GgufError> {
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path: &path,
        };
        let magic: [u8; 4] = c.arr().map_err(|_| GgufError::BadMagic {
            path: path.clone(),
            magic: [0; 4],
        })?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                magic,
            });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        let mut metadata = BTreeMap::new();
        let mut key_order = Vec::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            key_order.push(key.clone());
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd > 4 {
                return Err(c.corrupt(format!("tensor {name} has {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(c.u64()?);
            }
            let dtype = GgmlType::from_code(c.u32()?);
            let off = c.u64()?;
            raw.push((name, dims, dtype, off));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::new();
        for (name, dims, dtype, off) in raw {
            let n: u64 = dims.iter().product();
            let size_bytes = match dtype.block_layout() {
                Some((bs, ts)) => {
                    if dims.first().is_some_and(|d| d % bs as u64 != 0) {
                        return Err(
                            c.corrupt(format!("tensor {name}: row length not a multiple of {bs}"))
                        );
                    }
                    (n / bs as u64) as usize * ts
                }
                None => 0,
            };
            let offset = data_start + off as usize;
            if offset
                .checked_add(size_bytes)
                .is_none_or(|e| e > mmap.len())
            {
                return Err(GgufError::Corrupt {
                    path: path.clone(),
                    at: offset,
                    what: format!(
                        "tensor {name} ({size_bytes} bytes) runs past the end of the file"
                    ),
                });
            }
            index.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset,
                size_bytes,
            });
        }
        Ok(Self {
            path,
            mmap,
            version,
            metadata,
            key_order,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_size(&self) -> usize {
        self.mmap.len()
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, straight from the mapping.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.size_bytes]
    }

    /// Drops the pages wholly inside a tensor from this process's memory, for a tensor that was
    /// copied elsewhere and will not be read again. Only file mappings are released (a later read
    /// would fault the file back in); resident copies are left as they are.
    pub fn release(&self, t: &TensorInfo) {
        let Bytes::Mapped(m) = &self.mmap else {
            return;
        };
        const PAGE: usize = 4096;
        let start = t.offset.next_multiple_of(PAGE);
        let end = (t.offset + t.size_bytes) / PAGE * PAGE;
        if end > start {
            // SAFETY: `m` is a read-only shared file mapping that nothing writes: after MADV_DONTNEED a
            // read re-faults the same bytes from the file, so no reference into it (QMatrix rows)
            // observes a change. start..end lies inside the tensor, which parse() checked is in the map.
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(GgufError::WrongType {
                key: key.into(),
                found: v.type_name(),
                expected: "string",
            }),
            None => Err(GgufError::MissingKey(key.into())),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        match self.get(key) {
            Some(v) => v.as_u64().ok_or_else(|| GgufError::WrongType {
                key: key.into(),
                found: v.type_name(),
                expected: "unsigned integer",
            }),
            None => Err(GgufError::MissingKey(key.into())),
        }
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        match self.get(key) {
            Some(v) => v.as_f64().ok_or_else(|| GgufError::WrongType {
                key: key.into(),
                found: v.type_name(),
                expected: "number",
            }),
            None => Err(GgufError::MissingKey(key.into())),
        }
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(v) => Err(GgufError::WrongType {
                key: key.into(),
                found: v.type_name(),
                expected: "array",
            }),
            None => Err(GgufError::MissingKey(key.into())),
        }
    }

    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::io::Write;

    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }

    /// A minimal GGUF: one string key, one u32 array, one 2x32 Q8_0 tensor.
    fn tiny() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        put_str(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        put_str(&mut b, "llama");
        put_str(&mut b, "xs");
        b.extend(9u32.to_le_bytes());
        b.extend(4u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(7u32.to_le_bytes());
        b.extend(9u32.to_le_bytes());
        put_str(&mut b, "w");
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(std::iter::repeat_n(7u8, 68));
        b
    }

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let f = write(&tiny());
        let g = GgufFile::open(f.path()).unwrap();
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_array("xs").unwrap(), &[Value::U32(7), Value::U32(9)]);
        let t = g.tensor("w").unwrap();
        assert_eq!(t.dtype, GgmlType::Q8_0);
        assert_eq!(t.size_bytes, 68);
        assert!(g.data(t).iter().all(|&x| x == 7));
    }

    #[test]
    fn truncated_file_is_an_error_not_a_panic() {
        let full = tiny();
        for cut in [3, 10, 30, 60, full.len() - 1] {
            let f = write(&full[..cut]);
            assert!(GgufFile::open(f.path()).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn bad_magic_is_named() {
        let f = write(b"NOPE0000000000000000");
        let e = GgufFile::open(f.path()).err().unwrap().to_string();
        assert!(e.contains("not a GGUF"), "{e}");
    }
}
