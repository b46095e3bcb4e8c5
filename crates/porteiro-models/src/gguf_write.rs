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

/// The whole file as bytes.
pub fn encode(metadata: &[(&str, Value)], tensors: &[TensorOut]) -> std::io::Result<Vec<u8>> {
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
        offset = (offset + t.data.len()).next_multiple_of(ALIGN);
    }
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    for t in tensors {
        out.extend_from_slice(t.data);
        out.resize(out.len().next_multiple_of(ALIGN), 0);
    }
    Ok(out)
}

/// Writes a GGUF file atomically (temporary file, then rename).
pub fn write(
    path: &Path,
    metadata: &[(&str, Value)],
    tensors: &[TensorOut],
) -> std::io::Result<()> {
    let bytes = encode(metadata, tensors)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.gguf".into());
    let tmp = path.with_file_name(format!(".{name}.partial"));
    {
        let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
        w.write_all(&bytes)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, path)
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
}
