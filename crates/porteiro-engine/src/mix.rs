//! Which type each tensor of a model gets when it is quantized to a file type such as Q4_K_M.
//!
//! The mixtures are llama.cpp's (`llama-quantize`), for the dense transformers the engine runs:
//! the same tensors left alone (norms, 1-D tensors), the same ones given more bits (attn_v and
//! ffn_down in the first, last and every third layer for the _M types; the output projection at
//! Q6_K), the same fallbacks when a row is not a whole number of 256-element blocks, in the same
//! tensor order. Keeping them identical is what makes our files byte-identical to theirs.

use porteiro_models::gguf::GgmlType;
use regex::Regex;

/// A whole-model file type (llama.cpp's `llama_ftype`).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ftype {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl Ftype {
    pub const ALL: [Ftype; 14] = [
        Ftype::F32,
        Ftype::F16,
        Ftype::BF16,
        Ftype::Q8_0,
        Ftype::Q4_0,
        Ftype::Q2_K,
        Ftype::Q3_K_S,
        Ftype::Q3_K_M,
        Ftype::Q3_K_L,
        Ftype::Q4_K_S,
        Ftype::Q4_K_M,
        Ftype::Q5_K_S,
        Ftype::Q5_K_M,
        Ftype::Q6_K,
    ];

    /// Parses a name as llama-quantize spells it (case-insensitive; Q3_K, Q4_K and Q5_K mean
    /// their _M).
    pub fn parse(s: &str) -> Option<Self> {
        let u = s.to_ascii_uppercase();
        let u = match u.as_str() {
            "Q3_K" => "Q3_K_M",
            "Q4_K" => "Q4_K_M",
            "Q5_K" => "Q5_K_M",
            u => u,
        };
        Self::ALL.into_iter().find(|f| f.name() == u)
    }

    pub fn name(self) -> &'static str {
        match self {
            Ftype::F32 => "F32",
            Ftype::F16 => "F16",
            Ftype::BF16 => "BF16",
            Ftype::Q8_0 => "Q8_0",
            Ftype::Q4_0 => "Q4_0",
            Ftype::Q2_K => "Q2_K",
            Ftype::Q3_K_S => "Q3_K_S",
            Ftype::Q3_K_M => "Q3_K_M",
            Ftype::Q3_K_L => "Q3_K_L",
            Ftype::Q4_K_S => "Q4_K_S",
            Ftype::Q4_K_M => "Q4_K_M",
            Ftype::Q5_K_S => "Q5_K_S",
            Ftype::Q5_K_M => "Q5_K_M",
            Ftype::Q6_K => "Q6_K",
        }
    }

    /// The value of `general.file_type` (llama.h's enum).
    pub fn code(self) -> u32 {
        match self {
            Ftype::F32 => 0,
            Ftype::F16 => 1,
            Ftype::Q4_0 => 2,
            Ftype::Q8_0 => 7,
            Ftype::Q2_K => 10,
            Ftype::Q3_K_S => 11,
            Ftype::Q3_K_M => 12,
            Ftype::Q3_K_L => 13,
            Ftype::Q4_K_S => 14,
            Ftype::Q4_K_M => 15,
            Ftype::Q5_K_S => 16,
            Ftype::Q5_K_M => 17,
            Ftype::Q6_K => 18,
            Ftype::BF16 => 32,
        }
    }

    /// The type most tensors get.
    pub fn base(self) -> GgmlType {
        match self {
            Ftype::F32 => GgmlType::F32,
            Ftype::F16 => GgmlType::F16,
            Ftype::BF16 => GgmlType::BF16,
            Ftype::Q8_0 => GgmlType::Q8_0,
            Ftype::Q4_0 => GgmlType::Q4_0,
            Ftype::Q2_K => GgmlType::Q2_K,
            Ftype::Q3_K_S | Ftype::Q3_K_M | Ftype::Q3_K_L => GgmlType::Q3_K,
            Ftype::Q4_K_S | Ftype::Q4_K_M => GgmlType::Q4_K,
            Ftype::Q5_K_S | Ftype::Q5_K_M => GgmlType::Q5_K,
            Ftype::Q6_K => GgmlType::Q6_K,
        }
    }
}

/// Parses a tensor type name (F16, Q8_0, q4_k, …) among those the quantizer writes.
pub fn parse_type(s: &str) -> Option<GgmlType> {
    crate::quantize::WRITABLE
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(s))
}

#[derive(Debug, Default)]
pub struct Options {
    pub ftype: Option<Ftype>,
    /// Every quantizable tensor at the base type (llama-quantize --pure).
    pub pure: bool,
    /// `--tensor-type REGEX=TYPE`: the first pattern found in a tensor's name decides its type.
    pub overrides: Vec<(Regex, GgmlType)>,
    pub output: Option<GgmlType>,
    pub token_embd: Option<GgmlType>,
    /// Quantizing with an importance matrix (llama.cpp then gives Q4_0's first ffn_down layers Q4_1).
    pub imatrix: bool,
}

/// One tensor as the plan sees it.
pub struct Tensor<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub dtype: GgmlType,
}

/// The plan for one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub dtype: GgmlType,
    /// The type the mixture wanted, when the row length forced another.
    pub wanted: Option<GgmlType>,
}

/// llama.cpp's tensor order: tensors outside the blocks first, then block by block, by name within.
pub fn order(names: &[&str]) -> Vec<usize> {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|d| d.parse().ok())
            .unwrap_or(-1)
    };
    let mut idx: Vec<usize> = (0..names.len()).collect();
    idx.sort_by(|&a, &b| (layer(names[a]), names[a]).cmp(&(layer(names[b]), names[b])));
    idx
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    if name == "output.weight" {
        return Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return TokenEmbd;
    }
    for (pat, c) in [
        ("attn_qkv.weight", AttnQkv),
        ("attn_kv_b.weight", AttnKvB),
        ("attn_v.weight", AttnV),
        ("attn_k.weight", AttnK),
        ("attn_q.weight", AttnQ),
        ("attn_output.weight", AttnOutput),
        ("ffn_up", FfnUp),
        ("ffn_gate", FfnGate),
        ("ffn_down", FfnDown),
    ] {
        if name.contains(pat) {
            return c;
        }
    }
    Other
}

/// Number of dimensions not counting trailing ones (ggml_n_dims).
fn n_dims(dims: &[u64]) -> usize {
    dims.iter().rposition(|&d| d != 1).map_or(1, |i| i + 1)
}

/// Whether llama-quantize would quantize this tensor at all (weights of two or more dimensions,
/// except norms, positional and token-type embeddings and a few small special tensors).
pub fn quantizable(name: &str, dims: &[u64]) -> bool {
    n_dims(dims) >= 2
        && name.ends_with("weight")
        && ![
            "_norm.weight",
            "ffn_gate_inp.weight",
            "altup",
            "laurel",
            "per_layer_model_proj",
            "ssm_conv1d",
            "shortconv.conv.weight",
            "attn_rel_b.weight",
            "time_mix_",
            ".position_embd",
            ".rel_pos",
            ".patch_embd",
        ]
        .iter()
        .any(|p| name.contains(p))
        && name != "position_embd.weight"
        && name != "token_types.weight"
}

/// llama.cpp's fallback for a row length that is not a whole number of the type's blocks.
pub fn fallback(ncols: u64, t: GgmlType) -> GgmlType {
    let fits = |t: GgmlType| {
        t.block_layout()
            .is_some_and(|(bs, _)| ncols.is_multiple_of(bs as u64))
    };
    if fits(t) {
        return t;
    }
    let f = match t {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        t => t,
    };
    if fits(f) {
        f
    } else {
        GgmlType::F16
    }
}

fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// The type of every tensor, in the order given (which should be [`order`]'s: the mixtures count
/// attn_v and ffn_down tensors as they come). `n_layer` is the model's block count, `n_gqa` its
/// query heads per key/value head (Q2_K keeps attn_v at Q4_K when several heads share it).
pub fn plan(tensors: &[Tensor], opts: &Options, n_layer: usize, n_gqa: usize) -> Vec<Choice> {
    let ftype = opts.ftype.unwrap_or(Ftype::Q8_0);
    let base = ftype.base();
    let quantized = !matches!(ftype, Ftype::F32 | Ftype::F16 | Ftype::BF16);
    let n_attn_v = tensors
        .iter()
        .filter(|t| {
            matches!(
                category(t.name),
                Category::AttnV | Category::AttnQkv | Category::AttnKvB
            )
        })
        .count();
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    let (mut i_attn_v, mut i_ffn_down) = (0usize, 0usize);
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        let cat = category(t.name);
        let keep = Choice {
            dtype: t.dtype,
            wanted: None,
        };
        if !quantizable(t.name, t.dims) {
            out.push(keep);
            continue;
        }
        if let (Some(e), Category::TokenEmbd) = (opts.token_embd, cat) {
            out.push(Choice {
                dtype: e,
                wanted: None,
            });
            continue;
        }
        if let (Some(o), Category::Output) = (opts.output, cat) {
            out.push(Choice {
                dtype: o,
                wanted: None,
            });
            continue;
        }
        if !quantized {
            out.push(Choice {
                dtype: base,
                wanted: None,
            });
            continue;
        }
        let mut ty = base;
        let manual = opts.overrides.iter().find(|(re, _)| re.is_match(t.name));
        if let Some((_, m)) = manual {
            ty = *m;
        } else if !opts.pure {
            let ncols = t.dims[0];
            use Category::*;
            match cat {
                Output | TokenEmbd if cat == Output || tied => {
                    ty = match opts.output {
                        Some(o) => o,
                        None if !ncols
                            .is_multiple_of(base.block_layout().map_or(1, |l| l.0) as u64) =>
                        {
                            GgmlType::Q8_0
                        }
                        None if base != GgmlType::Q8_0 => GgmlType::Q6_K,
                        None => base,
                    };
                }
                AttnV | AttnQkv | AttnKvB => {
                    match ftype {
                        Ftype::Q2_K if n_gqa >= 4 => ty = GgmlType::Q4_K,
                        Ftype::Q2_K => ty = GgmlType::Q3_K,
                        Ftype::Q3_K_M if i_attn_v < 2 => ty = GgmlType::Q5_K,
                        Ftype::Q3_K_M => ty = GgmlType::Q4_K,
                        Ftype::Q3_K_L => ty = GgmlType::Q5_K,
                        Ftype::Q4_K_M | Ftype::Q5_K_M if more_bits(i_attn_v, n_attn_v) => {
                            ty = GgmlType::Q6_K
                        }
                        Ftype::Q4_K_S if i_attn_v < 4 => ty = GgmlType::Q5_K,
                        _ => {}
                    }
                    // attn_qkv's own rule replaces nothing: llama.cpp's attn_v branch comes first.
                    i_attn_v += 1;
                }
                FfnDown => {
                    let (i, n) = (i_ffn_down, n_layer);
                    match ftype {
                        Ftype::Q2_K => ty = GgmlType::Q3_K,
                        Ftype::Q3_K_M if i < n / 16 => ty = GgmlType::Q5_K,
                        Ftype::Q3_K_M => ty = GgmlType::Q4_K,
                        Ftype::Q3_K_L => ty = GgmlType::Q5_K,
                        Ftype::Q4_K_M | Ftype::Q5_K_M if more_bits(i, n) => ty = GgmlType::Q6_K,
                        Ftype::Q4_K_S if i < n / 8 => ty = GgmlType::Q5_K,
                        Ftype::Q4_0 if opts.imatrix && i < n / 8 => ty = GgmlType::Q4_1,
                        _ => {}
                    }
                    i_ffn_down += 1;
                }
                AttnOutput => match ftype {
                    Ftype::Q2_K => ty = GgmlType::Q3_K,
                    Ftype::Q3_K_M => ty = GgmlType::Q4_K,
                    Ftype::Q3_K_L => ty = GgmlType::Q5_K,
                    _ => {}
                },
                _ => {}
            }
        }
        let dtype = fallback(t.dims[0], ty);
        out.push(Choice {
            dtype,
            wanted: (dtype != ty).then_some(ty),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-block-per-8-layers toy with qwen2.5-1.5b's shapes (rows divisible by 256) and one with
    /// qwen2.5-0.5b's (896: not), tied embeddings.
    fn model(n_layer: usize, embd: u64, ffn: u64) -> Vec<(String, Vec<u64>)> {
        let mut v = vec![
            ("token_embd.weight".to_string(), vec![embd, 1000]),
            ("output_norm.weight".to_string(), vec![embd]),
        ];
        for l in 0..n_layer {
            for (n, d) in [
                ("attn_norm.weight", vec![embd]),
                ("attn_q.weight", vec![embd, embd]),
                ("attn_q.bias", vec![embd]),
                ("attn_k.weight", vec![embd, 128]),
                ("attn_v.weight", vec![embd, 128]),
                ("attn_output.weight", vec![embd, embd]),
                ("ffn_gate.weight", vec![embd, ffn]),
                ("ffn_up.weight", vec![embd, ffn]),
                ("ffn_down.weight", vec![ffn, embd]),
            ] {
                v.push((format!("blk.{l}.{n}"), d));
            }
        }
        v
    }

    fn run(m: &[(String, Vec<u64>)], opts: &Options, n_layer: usize) -> Vec<(String, GgmlType)> {
        let names: Vec<&str> = m.iter().map(|(n, _)| n.as_str()).collect();
        let idx = order(&names);
        let ts: Vec<Tensor> = idx
            .iter()
            .map(|&i| Tensor {
                name: &m[i].0,
                dims: &m[i].1,
                dtype: GgmlType::F16,
            })
            .collect();
        plan(&ts, opts, n_layer, 6)
            .into_iter()
            .zip(&ts)
            .map(|(c, t)| (t.name.to_string(), c.dtype))
            .collect()
    }

    fn get(p: &[(String, GgmlType)], name: &str) -> GgmlType {
        p.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn q4_k_m_gives_more_bits_where_llama_cpp_does() {
        let m = model(16, 1536, 8960);
        let o = Options {
            ftype: Some(Ftype::Q4_K_M),
            ..Default::default()
        };
        let p = run(&m, &o, 16);
        // Tied embeddings take the output's Q6_K; norms and biases stay.
        assert_eq!(get(&p, "token_embd.weight"), GgmlType::Q6_K);
        assert_eq!(get(&p, "output_norm.weight"), GgmlType::F16);
        assert_eq!(get(&p, "blk.3.attn_q.bias"), GgmlType::F16);
        // use_more_bits(i, 16): layers 0, 1, 4, 7, 10, 13, 14, 15.
        let more: Vec<usize> = (0..16)
            .filter(|l| get(&p, &format!("blk.{l}.ffn_down.weight")) == GgmlType::Q6_K)
            .collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 14, 15]);
        for l in 0..16 {
            let v = get(&p, &format!("blk.{l}.attn_v.weight"));
            assert_eq!(v == GgmlType::Q6_K, more.contains(&l), "layer {l}");
            assert_eq!(get(&p, &format!("blk.{l}.attn_q.weight")), GgmlType::Q4_K);
        }
    }

    #[test]
    fn low_bit_mixtures_are_llama_cpp_s() {
        let m = model(16, 1536, 8960);
        let plan = |f| {
            run(
                &m,
                &Options {
                    ftype: Some(f),
                    ..Default::default()
                },
                16,
            )
        };
        let p = plan(Ftype::Q3_K_M);
        assert_eq!(get(&p, "token_embd.weight"), GgmlType::Q6_K);
        assert_eq!(get(&p, "blk.0.attn_v.weight"), GgmlType::Q5_K);
        assert_eq!(get(&p, "blk.1.attn_v.weight"), GgmlType::Q5_K);
        assert_eq!(get(&p, "blk.2.attn_v.weight"), GgmlType::Q4_K);
        assert_eq!(get(&p, "blk.0.ffn_down.weight"), GgmlType::Q5_K); // 0 < 16 / 16
        assert_eq!(get(&p, "blk.1.ffn_down.weight"), GgmlType::Q4_K);
        assert_eq!(get(&p, "blk.5.attn_output.weight"), GgmlType::Q4_K);
        assert_eq!(get(&p, "blk.5.attn_q.weight"), GgmlType::Q3_K);
        assert_eq!(get(&p, "blk.5.ffn_up.weight"), GgmlType::Q3_K);
        let p = plan(Ftype::Q3_K_S);
        assert_eq!(get(&p, "blk.0.attn_v.weight"), GgmlType::Q3_K);
        assert_eq!(get(&p, "blk.0.ffn_down.weight"), GgmlType::Q3_K);
        let p = plan(Ftype::Q3_K_L);
        assert_eq!(get(&p, "blk.9.attn_v.weight"), GgmlType::Q5_K);
        assert_eq!(get(&p, "blk.9.ffn_down.weight"), GgmlType::Q5_K);
        assert_eq!(get(&p, "blk.9.attn_output.weight"), GgmlType::Q5_K);
        let p = plan(Ftype::Q2_K);
        assert_eq!(get(&p, "blk.3.attn_v.weight"), GgmlType::Q4_K); // n_gqa 6 >= 4
        assert_eq!(get(&p, "blk.3.ffn_down.weight"), GgmlType::Q3_K);
        assert_eq!(get(&p, "blk.3.attn_output.weight"), GgmlType::Q3_K);
        assert_eq!(get(&p, "blk.3.ffn_gate.weight"), GgmlType::Q2_K);
        // Rows of 896 are no whole super-blocks: Q2_K and Q3_K fall back to Q4_0.
        let m = model(8, 896, 4864);
        let o = Options {
            ftype: Some(Ftype::Q2_K),
            ..Default::default()
        };
        let p = run(&m, &o, 8);
        assert_eq!(get(&p, "blk.2.attn_q.weight"), GgmlType::Q4_0);
        assert_eq!(get(&p, "blk.2.ffn_down.weight"), GgmlType::Q3_K); // 4864 = 19 × 256
    }

    #[test]
    fn rows_not_whole_blocks_fall_back() {
        let m = model(8, 896, 4864);
        let o = Options {
            ftype: Some(Ftype::Q4_K_M),
            ..Default::default()
        };
        let p = run(&m, &o, 8);
        assert_eq!(get(&p, "token_embd.weight"), GgmlType::Q8_0);
        assert_eq!(get(&p, "blk.2.attn_q.weight"), GgmlType::Q5_0);
        assert_eq!(get(&p, "blk.0.attn_v.weight"), GgmlType::Q8_0); // Q6_K → Q8_0
        assert_eq!(get(&p, "blk.2.ffn_down.weight"), GgmlType::Q4_K); // 4864 = 19 × 256
    }

    #[test]
    fn pure_and_overrides() {
        let m = model(8, 1536, 8960);
        let o = Options {
            ftype: Some(Ftype::Q4_K_M),
            pure: true,
            overrides: vec![(Regex::new(r"ffn_down").unwrap(), GgmlType::Q8_0)],
            token_embd: Some(GgmlType::Q6_K),
            ..Default::default()
        };
        let p = run(&m, &o, 8);
        assert_eq!(get(&p, "blk.0.attn_v.weight"), GgmlType::Q4_K);
        assert_eq!(get(&p, "blk.0.ffn_down.weight"), GgmlType::Q8_0);
        assert_eq!(get(&p, "token_embd.weight"), GgmlType::Q6_K);
    }

    #[test]
    fn order_is_llama_cpp_s() {
        let names = [
            "blk.10.a",
            "output.weight",
            "blk.2.b",
            "blk.2.a",
            "token_embd.weight",
        ];
        let o: Vec<&str> = order(&names).into_iter().map(|i| names[i]).collect();
        assert_eq!(
            o,
            [
                "output.weight",
                "token_embd.weight",
                "blk.2.a",
                "blk.2.b",
                "blk.10.a"
            ]
        );
    }

    #[test]
    fn names_parse() {
        assert_eq!(Ftype::parse("q4_k"), Some(Ftype::Q4_K_M));
        assert_eq!(Ftype::parse("Q3_K"), Some(Ftype::Q3_K_M));
        assert_eq!(Ftype::parse("q2_k"), Some(Ftype::Q2_K));
        assert_eq!(Ftype::parse("Q2_K_S"), None);
        assert_eq!(parse_type("q6_k"), Some(GgmlType::Q6_K));
        assert_eq!(parse_type("Q2_K"), Some(GgmlType::Q2_K));
    }
}
