//! Writing GGUF files (version 3): metadata and tensors in the layout [`crate::gguf`] reads and
//! llama.cpp loads. Used for LoRA adapters; written to a temporary file beside the target and
//! renamed into place, so a reader never sees a half-written file.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::gguf::{GgmlType, Value};

/// Data alignment of the tensor section (GGUF's default).
const ALIGN: usize = 32;

/// A tensor to write: name, ggml dims (`dims[0]` is the contiguous one), type and raw bytes.
pub struct TensorOut<'a> {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    pub data: &'a [u8],
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            let ty = items.first().map_or(4, value_type);
            if items.iter().any(|i| value_type(i) != ty) {
                return Err(std::io::Error::other(
                    "a GGUF array holds values of one type only",
                ));
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

/// A tensor's header entry: what [`Writer`] needs before its bytes arrive.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    pub size: usize,
}

/// Magic, metadata and tensor table, padded to the data section.
fn header(metadata: &[(&str, Value)], tensors: &[TensorSpec]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut out, v)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.dtype.code().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.size).next_multiple_of(ALIGN);
    }
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    Ok(out)
}

/// The file's total size for these tensors (header included), to check the disk before writing.
pub fn file_size(metadata: &[(&str, Value)], tensors: &[TensorSpec]) -> std::io::Result<u64> {
    let data: usize = tensors.iter().map(|t| t.size.next_multiple_of(ALIGN)).sum();
    Ok((header(metadata, tensors)?.len() + data) as u64)
}

/// The whole file as bytes.
pub fn encode(metadata: &[(&str, Value)], tensors: &[TensorOut]) -> std::io::Result<Vec<u8>> {
    let specs: Vec<TensorSpec> = tensors.iter().map(TensorOut::spec).collect();
    let mut out = header(metadata, &specs)?;
    for t in tensors {
        out.extend_from_slice(t.data);
        out.resize(out.len().next_multiple_of(ALIGN), 0);
    }
    Ok(out)
}

impl TensorOut<'_> {
    fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            dims: self.dims.clone(),
            dtype: self.dtype,
            size: self.data.len(),
        }
    }
}

/// Writes a GGUF file atomically (temporary file, then rename).
pub fn write(
    path: &Path,
    metadata: &[(&str, Value)],
    tensors: &[TensorOut],
) -> std::io::Result<()> {
    let specs: Vec<TensorSpec> = tensors.iter().map(TensorOut::spec).collect();
    let mut w = Writer::create(path, metadata, specs)?;
    for t in tensors {
        w.push(t.data)?;
    }
    w.finish()
}

/// A GGUF file written tensor by tensor (models too large to hold twice in memory), into a
/// temporary file beside the target that [`Writer::finish`] renames into place; dropped unfinished,
/// the temporary file is removed.
pub struct Writer {
    out: Option<BufWriter<std::fs::File>>,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    specs: Vec<TensorSpec>,
    next: usize,
}

impl Writer {
    pub fn create(
        path: &Path,
        metadata: &[(&str, Value)],
        specs: Vec<TensorSpec>,
    ) -> std::io::Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out.gguf".into());
        let tmp = path.with_file_name(format!(".{name}.partial"));
        let head = header(metadata, &specs)?;
        let mut w = Self {
            out: Some(BufWriter::with_capacity(
                1 << 20,
                std::fs::File::create(&tmp)?,
            )),
            tmp,
            path: path.to_path_buf(),
            specs,
            next: 0,
        };
        if let Some(out) = w.out.as_mut() {
            out.write_all(&head)?;
        }
        Ok(w)
    }

    /// The next tensor's bytes, in the order the specs were given.
    pub fn push(&mut self, data: &[u8]) -> std::io::Result<()> {
        let spec = self.specs.get(self.next).ok_or_else(|| {
            std::io::Error::other(format!(
                "{} tensors declared, one more given",
                self.specs.len()
            ))
        })?;
        if data.len() != spec.size {
            return Err(std::io::Error::other(format!(
                "tensor {}: {} bytes declared, {} given",
                spec.name,
                spec.size,
                data.len()
            )));
        }
        let Some(out) = self.out.as_mut() else {
            return Err(std::io::Error::other("writer already finished"));
        };
        out.write_all(data)?;
        let pad = data.len().next_multiple_of(ALIGN) - data.len();
        out.write_all(&[0u8; ALIGN][..pad])?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        if self.next != self.specs.len() {
            return Err(std::io::Error::other(format!(
                "{} of {} tensors written",
                self.next,
                self.specs.len()
            )));
        }
        let Some(out) = self.out.take() else {
            return Err(std::io::Error::other("writer already finished"));
        };
        let done = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&self.tmp, &self.path));
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        done
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn what_is_written_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let b = vec![7u8; 10];
        write(
            &path,
            &[
                ("general.type", Value::String("adapter".into())),
                ("adapter.lora.alpha", Value::F32(32.0)),
                ("list", Value::Array(vec![Value::U32(1), Value::U32(2)])),
            ],
            &[
                TensorOut {
                    name: "x.lora_a".into(),
                    dims: vec![3, 2],
                    dtype: GgmlType::F32,
                    data: &a,
                },
                TensorOut {
                    name: "raw".into(),
                    dims: vec![10],
                    dtype: GgmlType::Other(24),
                    data: &b,
                },
            ],
        )
        .unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_str("general.type").unwrap(), "adapter");
        assert_eq!(g.get_f64("adapter.lora.alpha").unwrap(), 32.0);
        assert_eq!(g.get_array("list").unwrap().len(), 2);
        let t = g.tensor("x.lora_a").unwrap();
        assert_eq!((t.dims.clone(), t.dtype), (vec![3, 2], GgmlType::F32));
        assert_eq!(g.data(t), &a[..]);
        assert!(!dir.path().join(".a.gguf.partial").exists());
        assert!(write(
            &path,
            &[("bad", Value::Array(vec![Value::U8(1), Value::F32(1.0)]))],
            &[]
        )
        .is_err());
    }

    #[test]
    fn streamed_writer_checks_sizes_and_leaves_nothing_when_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.gguf");
        let spec = |name: &str, size: usize| TensorSpec {
            name: name.into(),
            dims: vec![size as u64 / 4],
            dtype: GgmlType::F32,
            size,
        };
        let meta = [("general.architecture", Value::String("x".into()))];
        let mut w = Writer::create(&path, &meta, vec![spec("a", 4), spec("b", 40)]).unwrap();
        w.push(&[1, 2, 3, 4]).unwrap();
        assert!(w.push(&[0; 39]).is_err(), "a wrong size is refused");
        drop(w);
        assert!(!path.exists() && !dir.path().join(".s.gguf.partial").exists());

        let specs = vec![spec("a", 4), spec("b", 40)];
        let mut w = Writer::create(&path, &meta, specs.clone()).unwrap();
        w.push(&[1, 2, 3, 4]).unwrap();
        w.push(&[9; 40]).unwrap();
        w.finish().unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.data(g.tensor("b").unwrap()), &[9u8; 40][..]);
        assert_eq!(g.key_order, ["general.architecture"]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            file_size(&meta, &specs).unwrap()
        );
    }
}
