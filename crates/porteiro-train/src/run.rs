//! The training loop: the whole run is planned up front from the seed (examples shuffled per epoch
//! and packed into optimizer steps of at most `batch_tokens` tokens, each run as micro-batches of at
//! most `micro_tokens`, their gradients accumulated), so a resumed run continues exactly where the
//! checkpoint left it. Checkpoints hold the parameters, the AdamW moments and the step, and are
//! written atomically, as is the adapter.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use porteiro_engine::lora::{Adapter, LoraPair, Proj};
use porteiro_models::gguf::{GgmlType, GgufFile, Value};
use porteiro_models::gguf_write::{self, TensorOut};

use crate::base::Base;
use crate::data::Example;
use crate::net::{Lora, Net, Seq};
use crate::optim::{clip, lr_at, AdamW, Moments};
use crate::TrainError;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub epochs: usize,
    pub opt: AdamW,
    pub batch_tokens: usize,
    pub micro_tokens: usize,
    /// Warm-up updates (None: 5% of the run, at least one).
    pub warmup: Option<usize>,
    pub clip: Option<f32>,
    pub seed: u64,
    #[serde(skip)]
    pub threads: usize,
    /// Stop after this many updates (a short run; the schedule still spans the whole plan). Not
    /// part of a checkpoint's identity: a run may be resumed with another stop.
    #[serde(skip)]
    pub max_steps: Option<usize>,
    #[serde(skip)]
    pub checkpoint_every: usize,
    /// B drawn uniform in ±init_b instead of zero (reference checks).
    pub init_b: f32,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    Start {
        steps: usize,
        params: usize,
        first: usize,
    },
    Step {
        step: usize,
        steps: usize,
        epoch: usize,
        loss: f64,
        grad_norm: f32,
        lr: f32,
        tokens: usize,
        secs: f64,
    },
    Eval {
        epoch: usize,
        loss: f64,
        targets: usize,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
    Interrupted {
        step: usize,
    },
    /// The time budget ran out after `step` steps.
    OutOfTime {
        step: usize,
    },
}

/// Optimizer steps of the whole run: per epoch the examples shuffled (seeded) and packed greedily up
/// to `batch_tokens` (a longer example is a step of its own). Entries: (epoch, example indices).
pub fn plan(
    examples: &[Example],
    epochs: usize,
    batch_tokens: usize,
    seed: u64,
) -> Vec<(usize, Vec<usize>)> {
    let mut steps = Vec::new();
    for epoch in 0..epochs {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut rng = porteiro_engine::sampler::Rng::new(
            seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch as u64 + 1)),
        );
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut cur: Vec<usize> = Vec::new();
        let mut tokens = 0;
        for i in order {
            let n = examples[i].seq.tokens.len();
            if !cur.is_empty() && tokens + n > batch_tokens {
                steps.push((epoch, std::mem::take(&mut cur)));
                tokens = 0;
            }
            cur.push(i);
            tokens += n;
        }
        if !cur.is_empty() {
            steps.push((epoch, cur));
        }
    }
    steps
}

fn micro_batches<'a>(seqs: &[&'a Seq], micro_tokens: usize) -> Vec<Vec<&'a Seq>> {
    let mut out: Vec<Vec<&Seq>> = Vec::new();
    let mut tokens = 0;
    for &s in seqs {
        if out
            .last()
            .is_none_or(|b| !b.is_empty() && tokens + s.tokens.len() > micro_tokens)
        {
            out.push(Vec::new());
            tokens = 0;
        }
        tokens += s.tokens.len();
        if let Some(b) = out.last_mut() {
            b.push(s);
        }
    }
    out
}

/// Mean loss per target over `examples` (forward only).
pub fn evaluate(
    net: &Net,
    lora: &Lora<f32>,
    examples: &[Example],
    micro_tokens: usize,
) -> Result<(f64, usize), TrainError> {
    let seqs: Vec<&Seq> = examples.iter().map(|e| &e.seq).collect();
    let (mut sum, mut n) = (0.0, 0);
    for mb in micro_batches(&seqs, micro_tokens) {
        let p = net.pass(lora, &mb, None)?;
        sum += p.loss_sum;
        n += p.targets;
    }
    Ok((sum / n.max(1) as f64, n))
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes LoRA-shaped tensors as f32 GGUF (an adapter llama.cpp reads, or a checkpoint / gradient
/// dump when `extra` tensors and metadata are added), atomically.
pub fn write_f32(
    path: &Path,
    arch: &str,
    kind: &str,
    sets: &[(&str, &Lora<f32>)],
    meta: Vec<(&str, Value)>,
) -> Result<(), TrainError> {
    let mut bufs: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
    let alpha = sets.first().map_or(0.0, |s| s.1.alpha);
    for (suffix, set) in sets {
        for (name, dims, data) in set.tensors() {
            bufs.push((format!("{name}{suffix}"), dims, f32_bytes(data)));
        }
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
    let mut all = vec![
        ("general.architecture", Value::String(arch.to_string())),
        ("general.type", Value::String(kind.to_string())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha)),
    ];
    all.extend(meta);
    gguf_write::write(path, &all, &tensors).map_err(|e| io(path, e))
}

/// Fills `set`'s tensors from `file` (names plus `suffix`), checking each shape.
fn read_into(file: &GgufFile, set: &mut Lora<f32>, suffix: &str) -> Result<(), TrainError> {
    let names: Vec<(String, Vec<u64>)> =
        set.tensors().into_iter().map(|(n, d, _)| (n, d)).collect();
    for ((name, dims), dst) in names.into_iter().zip(set.tensors_mut()) {
        let full = format!("{name}{suffix}");
        let t = file
            .tensor(&full)
            .filter(|t| t.dims == dims && t.dtype == GgmlType::F32)
            .ok_or_else(|| {
                io(
                    file.path(),
                    format!("tensor `{full}` is missing or not f32 {dims:?}"),
                )
            })?;
        for (d, c) in dst.iter_mut().zip(file.data(t).chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(())
}

/// The checkpoint next to the output adapter.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".ckpt");
    PathBuf::from(s)
}

/// Where a run writes its trace for the reference check.
pub struct Trace {
    pub path: PathBuf,
    file: std::fs::File,
}

impl Trace {
    pub fn create(path: &Path) -> Result<Self, TrainError> {
        Ok(Self {
            path: path.to_path_buf(),
            file: std::fs::File::create(path).map_err(|e| io(path, e))?,
        })
    }
    fn line(&mut self, v: serde_json::Value) -> Result<(), TrainError> {
        use std::io::Write;
        writeln!(self.file, "{v}").map_err(|e| io(&self.path, e))
    }
    fn sibling(&self, ext: &str) -> PathBuf {
        self.path.with_extension(ext)
    }
}

pub struct Run<'a> {
    pub base: &'a Base,
    pub arch: &'a str,
    pub model_path: &'a Path,
    pub opts: Options,
    pub train: &'a [Example],
    pub eval: &'a [Example],
    pub out: &'a Path,
    pub resume: bool,
    pub stop: &'a AtomicBool,
    pub trace: Option<Trace>,
    /// A time budget: no step starts after it; the adapter is written with the steps done (and a
    /// checkpoint, so `--resume` can go on), the eval run on it.
    pub deadline: Option<Instant>,
}

/// Parses `attn,mlp` / `q,k,v,o,gate,up,down` (any mix).
pub fn parse_targets(s: &str) -> Result<Vec<Proj>, TrainError> {
    let mut out: Vec<Proj> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let add: Vec<Proj> = match part {
            "attn" => vec![Proj::Q, Proj::K, Proj::V, Proj::O],
            "mlp" => vec![Proj::Gate, Proj::Up, Proj::Down],
            "all" => Proj::ALL.to_vec(),
            p => vec![Proj::ALL
                .into_iter()
                .find(|x| x.short() == p)
                .ok_or_else(|| {
                    TrainError::Data(format!(
                        "unknown target `{p}`; use attn, mlp, all or q, k, v, o, gate, up, down"
                    ))
                })?],
        };
        for p in add {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        return Err(TrainError::Data("no target projection given".into()));
    }
    out.sort_by_key(|p| p.index());
    Ok(out)
}

impl Run<'_> {
    fn fingerprint(&self) -> String {
        let lines: Vec<usize> = self.train.iter().map(|e| e.seq.tokens.len()).collect();
        let h = lines.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &n| {
            (h ^ n as u64).wrapping_mul(0x100_0000_01b3)
        });
        serde_json::json!({ "opts": self.opts, "examples": self.train.len(), "lengths": format!("{h:016x}") }).to_string()
    }

    /// Trains, reporting through `on`; returns the trained parameters (also written to `out`) and
    /// whether the run was interrupted (then the checkpoint holds the last finished step).
    pub fn go(mut self, on: &mut dyn FnMut(Event)) -> Result<(Lora<f32>, bool), TrainError> {
        let cfg = &self.base.cfg;
        let o = self.opts.clone();
        let projs = parse_targets(&o.targets.join(","))?;
        let net = Net {
            base: self.base,
            threads: o.threads.max(1),
        };
        let steps = plan(self.train, o.epochs, o.batch_tokens, o.seed);
        let total = steps.len();
        let warmup = o.warmup.unwrap_or(total.div_ceil(20)).max(1);
        let mut params: Lora<f32> = Lora::init(cfg, o.rank, o.alpha, &projs, o.seed, o.init_b);
        let mut moments = Moments::new(&params);
        let ckpt = checkpoint_path(self.out);
        let fp = self.fingerprint();
        let mut first = 0;
        if self.resume {
            let file =
                GgufFile::open(&ckpt).map_err(|e| io(&ckpt, format!("cannot resume: {e}")))?;
            if file.get_str("train.fingerprint").ok() != Some(fp.as_str()) {
                return Err(io(&ckpt, "the checkpoint is of a different run (options or data changed); start again without --resume"));
            }
            read_into(&file, &mut params, "")?;
            read_into(&file, &mut moments.m, ".adam_m")?;
            read_into(&file, &mut moments.v, ".adam_v")?;
            first = file.get_u64("train.step").map_err(|e| io(&ckpt, e))? as usize;
            moments.t = first as u64;
        }
        on(Event::Start {
            steps: total,
            params: params.n_params(),
            first,
        });
        if let Some(t) = &mut self.trace {
            let init = t.sibling("init.gguf");
            let grads = t.sibling("grads.gguf");
            write_f32(&init, self.arch, "adapter", &[("", &params)], vec![])?;
            t.line(serde_json::json!({
                "kind": "config", "model": self.model_path, "arch": self.arch, "rank": o.rank, "alpha": o.alpha,
                "init": init, "grads": grads, "betas": [o.opt.beta1, o.opt.beta2], "eps": o.opt.eps,
                "weight_decay": o.opt.weight_decay, "clip": o.clip,
            }))?;
        }
        let save = |params: &Lora<f32>, moments: &Moments, step: usize| {
            write_f32(
                &ckpt,
                self.arch,
                "porteiro.lora.checkpoint",
                &[
                    ("", params),
                    (".adam_m", &moments.m),
                    (".adam_v", &moments.v),
                ],
                vec![
                    ("train.step", Value::U64(step as u64)),
                    ("train.fingerprint", Value::String(fp.clone())),
                ],
            )
        };
        let mut grads = params.zeros_like();
        let mut last = o.max_steps.map_or(total, |m| m.min(total));
        let mut interrupted = false;
        // Evaluated epochs: on resume, the one the checkpoint's step closed (if it closed one).
        let mut epoch_done = first
            .checked_sub(1)
            .and_then(|i| steps.get(i))
            .filter(|s| steps.get(first).is_none_or(|n| n.0 != s.0))
            .map(|s| s.0);
        for (si, (epoch, idx)) in steps.iter().enumerate().take(last).skip(first) {
            if si > first && self.deadline.is_some_and(|d| Instant::now() >= d) {
                last = si;
                on(Event::OutOfTime { step: si });
                if !self.eval.is_empty() && epoch_done != Some(*epoch) {
                    let (l, n) = evaluate(&net, &params, self.eval, o.micro_tokens)?;
                    on(Event::Eval {
                        epoch: *epoch,
                        loss: l,
                        targets: n,
                    });
                }
                break;
            }
            let step = si + 1;
            let t0 = Instant::now();
            let seqs: Vec<&Seq> = idx.iter().map(|&i| &self.train[i].seq).collect();
            let targets: usize = seqs.iter().map(|s| s.targets()).sum();
            grads.fill_zero();
            let (mut loss, mut tokens) = (0.0, 0);
            for mb in micro_batches(&seqs, o.micro_tokens) {
                if self.stop.load(Ordering::Relaxed) {
                    interrupted = true;
                    break;
                }
                let p = net.pass(
                    &params,
                    &mb,
                    Some((&mut grads, 1.0 / targets.max(1) as f32)),
                )?;
                loss += p.loss_sum;
                tokens += p.tokens;
            }
            if interrupted {
                save(&params, &moments, si)?;
                on(Event::Interrupted { step: si });
                break;
            }
            if step == 1 {
                if let Some(t) = &self.trace {
                    write_f32(
                        &t.sibling("grads.gguf"),
                        self.arch,
                        "porteiro.lora.gradient",
                        &[("", &grads)],
                        vec![],
                    )?;
                }
            }
            let grad_norm = clip(&mut grads, o.clip);
            let lr = lr_at(o.opt.lr, step, warmup, total);
            o.opt.step(&mut params, &grads, &mut moments, lr);
            let loss = loss / targets.max(1) as f64;
            if let Some(t) = &mut self.trace {
                t.line(serde_json::json!({
                    "kind": "step", "step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm,
                    "sequences": seqs.iter().map(|s| serde_json::json!({
                        "tokens": s.tokens, "mask": s.mask.iter().map(|&m| m as u8).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                }))?;
            }
            on(Event::Step {
                step,
                steps: total,
                epoch: *epoch,
                loss,
                grad_norm,
                lr,
                tokens,
                secs: t0.elapsed().as_secs_f64(),
            });
            let epoch_ends = steps.get(step).is_none_or(|s| s.0 != *epoch);
            if epoch_ends && !self.eval.is_empty() && epoch_done != Some(*epoch) {
                let (l, n) = evaluate(&net, &params, self.eval, o.micro_tokens)?;
                on(Event::Eval {
                    epoch: *epoch,
                    loss: l,
                    targets: n,
                });
                epoch_done = Some(*epoch);
            }
            if o.checkpoint_every > 0 && step % o.checkpoint_every == 0 && step < last {
                save(&params, &moments, step)?;
                on(Event::Checkpoint {
                    step,
                    path: ckpt.clone(),
                });
            }
        }
        if !interrupted {
            let pairs = params
                .slots
                .iter()
                .enumerate()
                .flat_map(|(l, s)| {
                    Proj::ALL.into_iter().filter_map(move |p| {
                        s[p.index()].as_ref().map(|x| {
                            (
                                l,
                                p,
                                LoraPair {
                                    rank: o.rank,
                                    a: x.a.clone(),
                                    b: x.b.clone(),
                                },
                            )
                        })
                    })
                })
                .collect();
            Adapter::from_pairs(cfg, o.alpha, 1.0, pairs)
                .write(self.out, self.arch)
                .map_err(|e| io(self.out, e))?;
            if last < total {
                // Stopped by --max-steps: keep a checkpoint so the run can go on with --resume.
                save(&params, &moments, last)?;
                on(Event::Checkpoint {
                    step: last,
                    path: ckpt.clone(),
                });
            } else if ckpt.exists() {
                std::fs::remove_file(&ckpt).map_err(|e| io(&ckpt, e))?;
            }
        }
        Ok((params, interrupted))
    }
}
