//! Importance matrices: for every weight matrix, the sum of squared inputs per column over
//! calibration tokens (llama.cpp's imatrix). A column whose inputs are large matters more, so the
//! quantizers weigh its error more ([`crate::quantize::quantize_row_weighted`]).
//!
//! Files are llama.cpp's GGUF imatrix format (`<tensor>.in_sum2` and `<tensor>.counts`, F32, with
//! `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`), so `llama-quantize
//! --imatrix` reads ours and we read theirs.

use std::collections::HashMap;
use std::path::Path;

use porteiro_models::gguf::{GgmlType, GgufError, GgufFile, Value};
use porteiro_models::gguf_write::{self, TensorOut};

/// Sums of squared activations being collected, per matrix name.
#[derive(Debug, Default, Clone)]
pub struct Collector {
    pub sums: HashMap<String, (Vec<f64>, u64)>,
}

impl Collector {
    /// Adds `n` tokens' inputs `x` (n × k) of matrix `name`.
    pub fn add(&mut self, name: &str, x: &[f32], n: usize) {
        let k = x.len() / n.max(1);
        let e = self
            .sums
            .entry(name.to_string())
            .or_insert_with(|| (vec![0.0; k], 0));
        if e.0.len() != k {
            return;
        }
        for row in x.chunks_exact(k) {
            for (s, v) in e.0.iter_mut().zip(row) {
                *s += f64::from(*v) * f64::from(*v);
            }
        }
        e.1 += n as u64;
    }

    /// Writes the collected sums as a llama.cpp imatrix file (atomically).
    pub fn save(
        &self,
        path: &Path,
        dataset: &str,
        chunks: usize,
        chunk_size: usize,
    ) -> std::io::Result<()> {
        let mut names: Vec<&String> = self.sums.keys().collect();
        names.sort();
        let mut bufs: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
        for name in names {
            let (s, n) = &self.sums[name];
            let sums: Vec<u8> = s.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
            bufs.push((format!("{name}.in_sum2"), vec![s.len() as u64, 1], sums));
            bufs.push((
                format!("{name}.counts"),
                vec![1, 1],
                (*n as f32).to_le_bytes().to_vec(),
            ));
        }
        let tensors: Vec<TensorOut> = bufs
            .iter()
            .map(|(name, dims, data)| TensorOut {
                name: name.clone(),
                dims: dims.clone(),
                dtype: GgmlType::F32,
                data,
            })
            .collect();
        gguf_write::write(
            path,
            &[
                ("general.type", Value::String("imatrix".into())),
                (
                    "imatrix.datasets",
                    Value::Array(vec![Value::String(dataset.into())]),
                ),
                ("imatrix.chunk_count", Value::U32(chunks as u32)),
                ("imatrix.chunk_size", Value::U32(chunk_size as u32)),
            ],
            &tensors,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {why}")]
    Bad { path: String, why: String },
}

fn f32s(file: &GgufFile, name: &str) -> Option<Vec<f32>> {
    let t = file.tensor(name).filter(|t| t.dtype == GgmlType::F32)?;
    Some(
        file.data(t)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// A loaded importance matrix.
#[derive(Debug, Clone, Default)]
pub struct Imatrix {
    /// Per matrix, the mean squared input per column (sums / count), as llama-quantize uses it.
    pub data: HashMap<String, Vec<f32>>,
    pub datasets: Vec<String>,
    pub chunk_count: u64,
}

/// Reads an imatrix file. Only the GGUF format (llama.cpp's current one) is read.
pub fn load(path: &Path) -> Result<Imatrix, ImatrixError> {
    let bad = |why: String| ImatrixError::Bad {
        path: path.display().to_string(),
        why,
    };
    let file = GgufFile::open(path).map_err(|e| match e {
        GgufError::BadMagic { .. } => bad(
            "not a GGUF imatrix (the legacy .dat format is not read: convert it with \
             llama-imatrix --in-file OLD.dat -o NEW.gguf)"
                .into(),
        ),
        e => e.into(),
    })?;
    let mut out = HashMap::new();
    for t in file.tensors() {
        let Some(name) = t.name.strip_suffix(".in_sum2") else {
            continue;
        };
        let sums = f32s(&file, &t.name).ok_or_else(|| bad(format!("{} is not F32", t.name)))?;
        let counts = f32s(&file, &format!("{name}.counts"))
            .ok_or_else(|| bad(format!("{name}.in_sum2 has no F32 {name}.counts")))?;
        let per = sums.len() / counts.len().max(1);
        let mut e = vec![1.0f32; sums.len()];
        for (j, c) in counts.iter().enumerate() {
            let c = c.round();
            if c > 0.0 {
                for i in 0..per {
                    e[j * per + i] = sums[j * per + i] / c;
                }
            }
        }
        out.insert(name.to_string(), e);
    }
    if out.is_empty() {
        return Err(bad("holds no `.in_sum2` tensors".into()));
    }
    let datasets = match file.get("imatrix.datasets") {
        Some(Value::Array(v)) => v
            .iter()
            .filter_map(|d| match d {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Imatrix {
        data: out,
        datasets,
        chunk_count: file.get_u64("imatrix.chunk_count").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_sums_load_back_as_means() {
        let mut c = Collector::default();
        c.add("blk.0.attn_q.weight", &[1.0, 2.0, 3.0, 4.0], 2);
        c.add("blk.0.attn_q.weight", &[0.0, 2.0], 1);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        c.save(&p, "wiki.txt", 3, 512).unwrap();
        let m = load(&p).unwrap();
        assert_eq!(
            (m.datasets.clone(), m.chunk_count),
            (vec!["wiki.txt".to_string()], 3)
        );
        // Column sums of squares 1+9+0 = 10 and 4+16+4 = 24 over 3 tokens.
        let got = &m.data["blk.0.attn_q.weight"];
        assert!((got[0] - 10.0 / 3.0).abs() < 1e-6 && (got[1] - 8.0).abs() < 1e-6);
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.get_u64("imatrix.chunk_size").unwrap(), 512);
        assert!(load(dir.path().join("none").as_path()).is_err());
    }
}
