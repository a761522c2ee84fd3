//! The training step: the Llama model's forward and backward passes written out layer by
//! layer over buffers allocated once (the ops' math is slm_kernels::train, the output
//! projection's slm_kernels::head), and AdamW over the flat parameter, gradient and moment
//! vectors. Every architecture slm loads trains here (q/k/v biases included); candle's
//! autograd through `slm_model::Llama`, with candle's composed ops, is only the reference
//! the tests hold this to.
//!
//! Parameters live here during training, in one vector laid out by the model's one
//! parameter description (`Config::params`), where a layer's q, k and v projections (and
//! their biases, and its gate and up projections) are adjacent and multiply as one matrix.
//! The candle `VarMap` gets them back for evaluation, samples, checkpoints and the model
//! folder (`write_params`), under their Hugging Face names, the moments under `m.NAME` and
//! `v.NAME`.
//!
//! Seams for the objectives built on this (heads, distillation, chat fine-tuning, LoRA):
//! - `freeze` keeps parameters fixed: no weight gradient is formed for them and AdamW skips
//!   them (a LoRA base, a pruned model's kept weights);
//! - `forward_hidden` and `backward_hidden` expose the final hidden states and take their
//!   gradient, so another head (classification, tagging) or a loss against a teacher's
//!   outputs (a second model's forward in the same step, computed beside the trainer, through
//!   `head_mut`'s weights and gradient) drives the same backward;
//! - targets may be `IGNORE` (`accumulate_targets`): no loss and no gradient at that
//!   position (prompt tokens in chat fine-tuning).

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rayon::prelude::*;
use slm_kernels::gemm::linear;
pub use slm_kernels::head::IGNORE;
use slm_kernels::head::{head_loss_into, HeadGrads, HeadShape, HeadWeights};
use slm_kernels::kd::Teacher;
use slm_kernels::lora::{splitmix64, Dropout};
use slm_kernels::quant::BlockMatrix;
use slm_kernels::train::{self as kernels, AttnShape, RopeSpec};
use slm_model::params::{self, Role};
use slm_model::{Config, Head};

use crate::optim::{AdamW, AdamWConfig, Group};

/// Why a model's shape cannot train (the loaders accept none of these either).
fn unsupported(cfg: &Config) -> Option<String> {
    if !cfg.head_dim.is_multiple_of(2) {
        return Some(format!("head_dim {} is odd", cfg.head_dim));
    }
    if cfg.num_key_value_heads == 0
        || !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
    {
        return Some(format!(
            "{} query heads are not a multiple of {} kv heads",
            cfg.num_attention_heads, cfg.num_key_value_heads
        ));
    }
    None
}

/// One tensor of the model (`Config::params`) and where it lies in the flat vectors.
struct Param {
    spec: params::Param,
    range: Range<usize>,
    trainable: bool,
}

/// A low-rank adapter trained beside every listed projection of the frozen model:
/// `y += (alpha / rank) · B(A x)`, as PEFT's LoRA computes it (no dropout).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Role>,
    /// PEFT's lora_dropout: the adapters' input dropped with this probability in training
    /// passes (`set_dropout_round` draws the masks), never in validation.
    pub dropout: f64,
}

/// What the passes need of the LoRA settings.
#[derive(Clone, Copy)]
struct LoraRun {
    rank: usize,
    /// alpha / rank.
    scale: f32,
    dropout: f32,
}

/// Adapter `ad`'s dropout in a pass seeded by `seed` (training passes of a run with dropout).
fn adapter_dropout(l: LoraRun, seed: Option<u64>, ad: &Adapter) -> Option<Dropout> {
    let seed = seed.filter(|_| l.dropout > 0.0)?;
    Some(Dropout {
        p: l.dropout,
        seed: splitmix64(seed ^ ad.ordinal),
    })
}

/// One adapter of a layer: where A and B lie in the flat vector (adjacent, A first), and
/// where its projection's output lies: `col` columns into the rows of its (fused) output,
/// `k` inputs, `m` outputs.
struct Adapter {
    /// Its place in `Config::lora_params` order (pairs), which keys its dropout masks: the
    /// same whatever else the flat vector holds (a base in blocks or not).
    ordinal: u64,
    target: Role,
    a: Range<usize>,
    b: Range<usize>,
    col: usize,
    k: usize,
    m: usize,
}

/// A frozen base's projection matrices kept in GGUF blocks (LoRA over a quantized model), by
/// layer and role, rows in Hugging Face's order (`slm_model::hf_layout::hf_blocks`). The
/// rest of the base (embedding, norms, biases, and any projection not listed) is in the
/// variables, in f32.
pub type BlockBase = HashMap<(usize, Role), BlockMatrix>;

/// One fused projection's weights (q|k|v, o, gate|up or down): a stretch of the flat vector,
/// or a frozen base's matrices in blocks, widened into f32 scratch each time they are used.
/// Widening, then the f32 product, rather than the block kernels' 8-bit activations: the
/// adapters then learn against the product PEFT computes over the model's f32 export, and
/// the widening costs one pass over the weights beside a product over a whole micro-batch.
enum Proj {
    Flat(Range<usize>),
    Blocks(Vec<BlockMatrix>),
}

impl Proj {
    fn len(&self) -> usize {
        match self {
            Proj::Flat(r) => r.len(),
            Proj::Blocks(ms) => ms.iter().map(|m| m.n * m.k).sum(),
        }
    }

    /// The weights, from the flat vector `p` or widened into `wide`.
    fn weights<'a>(&'a self, p: &'a [f32], wide: &'a mut [f32]) -> &'a [f32] {
        match self {
            Proj::Flat(r) => &p[r.clone()],
            Proj::Blocks(ms) => {
                let mut at = 0;
                for m in ms {
                    m.dequantize(&mut wide[at..at + m.n * m.k]);
                    at += m.n * m.k;
                }
                &wide[..at]
            }
        }
    }

    /// Its weight gradient, where AdamW's `groups` train it.
    fn trained(&self, groups: &[Group]) -> Option<&Range<usize>> {
        match self {
            Proj::Flat(r) if trains(groups, r) => Some(r),
            _ => None,
        }
    }
}

/// Where one layer's parameters lie in the flat vector.
struct LayerParams {
    attn_norm: Range<usize>,
    /// q, k and v projections, one after the other: ((heads + 2 kv_heads) head_dim) x hidden.
    qkv: Proj,
    /// Their biases, one after the other, where the model has them.
    qkv_bias: Option<Range<usize>>,
    o: Proj,
    mlp_norm: Range<usize>,
    /// gate then up projection: (2 ffn) x hidden.
    gate_up: Proj,
    down: Proj,
    /// LoRA adapters, in `Config::lora_params` order.
    adapters: Vec<Adapter>,
}

/// What a layer's forward keeps for its backward.
struct Saved {
    r1: Vec<f32>,
    h1: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    lse: Vec<f32>,
    mid: Vec<f32>,
    r2: Vec<f32>,
    h2: Vec<f32>,
    gu: Vec<f32>,
    sig: Vec<f32>,
    act: Vec<f32>,
    /// Each adapter's `A x` (n x rank).
    lora: Vec<Vec<f32>>,
}

/// Backward's working buffers, shared by the layers.
struct Work {
    dres: Vec<f32>,
    dh: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    dgu: Vec<f32>,
    dact: Vec<f32>,
    head: Vec<f32>,
    /// Per-thread partial weight gradients (`linear::weight_grad`).
    partials: Vec<f32>,
    /// An adapter's gradient with respect to `A x` (n x rank).
    lora_dt: Vec<f32>,
}

pub struct Trainer {
    cfg: Config,
    batch: usize,
    /// Positions per sequence of the current micro-batches (`set_positions`), at most
    /// `capacity`, the model's context the buffers were sized for.
    positions: usize,
    capacity: usize,
    /// Packed micro-batches (`set_starts`): where each position's sequence begins in its row.
    starts: Option<Vec<u32>>,
    params_by_name: Vec<Param>,
    layers: Vec<LayerParams>,
    embed: Range<usize>,
    norm: Range<usize>,
    /// The output projection: the language model's (the embedding's values when tied) or a
    /// classifier's score weight, `outputs` rows.
    head: Range<usize>,
    /// A token classifier's bias.
    head_bias: Option<Range<usize>>,
    /// Rows of the head: the vocabulary, or a classifier's labels.
    outputs: usize,
    /// A weight per output for the loss (`set_class_weights`).
    class_weights: Option<Vec<f64>>,
    /// The adapters' rank, scale and dropout, when training LoRA.
    lora: Option<LoraRun>,
    /// The masks of the next training passes' adapter dropout (`set_dropout_round`).
    dropout_round: u64,
    /// The dropout seed of the last forward pass (None: a validation pass).
    pass_seed: Option<u64>,
    /// The adapters' dropped input and its gradient (n x the widest input; empty without
    /// dropout).
    drop_x: Vec<f32>,
    drop_dx: Vec<f32>,
    params: Vec<f32>,
    grads: Vec<f32>,
    opt: AdamW,
    /// The trainable stretches of `params`, for AdamW and the gradient norm.
    groups: Vec<Group>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// The residual stream entering each layer, and leaving the last.
    streams: Vec<Vec<f32>>,
    saved: Vec<Saved>,
    final_r: Vec<f32>,
    final_h: Vec<f32>,
    work: Work,
    /// The weight gradient of a frozen norm, formed and dropped.
    discard: Vec<f32>,
    /// A projection of a base in blocks, widened (the largest such projection's size).
    wide: Vec<f32>,
    laps: Laps,
}

/// Seconds spent per kind of op, summed over the updates since the last `take_op_seconds`:
/// each op runs alone (parallel inside), so the wall time between two laps is its own.
#[derive(Default)]
struct Laps {
    last: Option<std::time::Instant>,
    seconds: Vec<(&'static str, f64)>,
}

impl Laps {
    fn start(&mut self) {
        self.last = Some(std::time::Instant::now());
    }
    /// Charges the time since the previous lap to `op`.
    fn lap(&mut self, op: &'static str) {
        let now = std::time::Instant::now();
        let dt = self.last.map_or(0.0, |t| (now - t).as_secs_f64());
        self.last = Some(now);
        match self.seconds.iter_mut().find(|(n, _)| *n == op) {
            Some((_, s)) => *s += dt,
            None => self.seconds.push((op, dt)),
        }
    }
}

/// RoPE over the q and k heads of the fused q|k|v rows (they are adjacent, from column 0).
fn rope_spec<'a>(
    s: AttnShape,
    cos: &'a [f32],
    sin: &'a [f32],
    starts: Option<&'a [u32]>,
) -> RopeSpec<'a> {
    RopeSpec {
        width: s.qkv_width(),
        heads: s.heads + s.kv_heads,
        head_dim: s.head_dim,
        positions: s.positions,
        cos,
        sin,
        starts,
    }
}

/// Whether AdamW's `groups` train any value of `r` (a weight gradient is needed).
fn trains(groups: &[Group], r: &Range<usize>) -> bool {
    groups
        .iter()
        .any(|g| g.range.start < r.end && r.start < g.range.end)
}

/// Where the weight gradient of the parameters `r` goes: their gradients, or, when AdamW's
/// `groups` leave them frozen, cleared scratch of their size that is dropped.
fn grad_or_discard<'a>(
    grads: &'a mut [f32],
    r: &Range<usize>,
    groups: &[Group],
    discard: &'a mut Vec<f32>,
) -> &'a mut [f32] {
    if trains(groups, r) {
        &mut grads[r.clone()]
    } else {
        discard.clear();
        discard.resize(r.len(), 0.0);
        discard
    }
}

/// The adapters of one fused projection (`group`: q|k|v, o, gate|up or down), each with its
/// saved `A x` (from `t`) and its product's shape in rows of `stride` values.
fn group_adapters<'a, T: IntoIterator>(
    adapters: &'a [Adapter],
    t: T,
    group: &'a [Role],
    n: usize,
    rank: usize,
    stride: usize,
) -> impl Iterator<Item = (&'a Adapter, T::Item, slm_kernels::lora::LoraShape)> + 'a
where
    T::IntoIter: 'a,
{
    adapters
        .iter()
        .zip(t)
        .filter(|(a, _)| group.contains(&a.target))
        .map(move |(ad, t)| {
            let shape = slm_kernels::lora::LoraShape {
                n,
                k: ad.k,
                m: ad.m,
                r: rank,
                y_stride: stride,
            };
            (ad, t, shape)
        })
}

/// The adapters of one fused projection add their `scale · B(A x)` into its output y (n
/// rows of `stride` values), keeping each `A x`.
#[allow(clippy::too_many_arguments)]
fn adapters_forward(
    adapters: &[Adapter],
    t: &mut [Vec<f32>],
    group: &[Role],
    y: &mut [f32],
    stride: usize,
    x: &[f32],
    p: &[f32],
    n: usize,
    l: LoraRun,
    (seed, drop_x): (Option<u64>, &mut [f32]),
) {
    for (ad, t, shape) in group_adapters(adapters, t, group, n, l.rank, stride) {
        let (a, b) = (&p[ad.a.clone()], &p[ad.b.clone()]);
        let (y, t, mut x) = (&mut y[ad.col..], &mut t[..n * l.rank], &x[..n * ad.k]);
        if let Some(d) = adapter_dropout(l, seed, ad) {
            d.apply(&mut drop_x[..n * ad.k], x);
            x = &drop_x[..n * ad.k];
        }
        slm_kernels::lora::forward(y, t, x, a, b, shape, l.scale);
    }
}

/// The adapters' backward for one fused projection: their gradients from dy (n rows of
/// `stride`), and their share of the input gradient added into dx (which holds the frozen
/// projection's own).
#[allow(clippy::too_many_arguments)]
fn adapters_backward(
    adapters: &[Adapter],
    t: &[Vec<f32>],
    group: &[Role],
    dx: &mut [f32],
    dy: &[f32],
    stride: usize,
    x: &[f32],
    p: &[f32],
    g: &mut [f32],
    dt: &mut [f32],
    n: usize,
    l: LoraRun,
    (seed, drop_x, drop_dx): (Option<u64>, &mut [f32], &mut [f32]),
) {
    for (ad, t, shape) in group_adapters(adapters, t, group, n, l.rank, stride) {
        let (ga, gb) = g[ad.a.start..ad.b.end].split_at_mut(ad.a.len());
        let (a, b) = (&p[ad.a.clone()], &p[ad.b.clone()]);
        let (dx, dt, dy) = (&mut dx[..n * ad.k], &mut dt[..n * l.rank], &dy[ad.col..]);
        let (x, t) = (&x[..n * ad.k], &t[..n * l.rank]);
        match adapter_dropout(l, seed, ad) {
            // The forward's dropped input rebuilt; the input's gradient through the mask.
            Some(d) => {
                let (xd, dxd) = (&mut drop_x[..n * ad.k], &mut drop_dx[..n * ad.k]);
                d.apply(xd, x);
                dxd.fill(0.0);
                slm_kernels::lora::backward(dxd, ga, gb, dt, dy, xd, t, a, b, shape, l.scale);
                d.backward_add(dx, dxd);
            }
            None => slm_kernels::lora::backward(dx, ga, gb, dt, dy, x, t, a, b, shape, l.scale),
        }
    }
}

const QKV: [Role; 3] = [Role::Q, Role::K, Role::V];
const GATE_UP: [Role; 2] = [Role::Gate, Role::Up];
/// The projections of a layer that multiply as one matrix (each group named by its first).
pub const FUSED: [&[Role]; 4] = [&QKV, &[Role::O], &GATE_UP, &[Role::Down]];

/// `blocks`' matrices by layer and fused group (`FUSED`, named by its first role), in the
/// group's order, checked against `cfg`'s shapes: a group is in blocks whole or not at all,
/// and every matrix must belong to one.
fn take_fused_blocks(
    cfg: &Config,
    blocks: &mut BlockBase,
) -> candle_core::Result<HashMap<(usize, Role), Vec<BlockMatrix>>> {
    let params = cfg.params();
    let mut held = HashMap::new();
    for p in &params {
        let (Some(l), Some(group)) = (p.layer, FUSED.iter().find(|g| g[0] == p.role)) else {
            continue;
        };
        let ms: Vec<BlockMatrix> = group
            .iter()
            .filter_map(|r| blocks.remove(&(l, *r)))
            .collect();
        if ms.is_empty() {
            continue;
        }
        if ms.len() != group.len() {
            candle_core::bail!(
                "layer {l}: {group:?} multiply as one matrix; the base holds only some of them \
                 in blocks"
            );
        }
        for (m, r) in ms.iter().zip(group.iter()) {
            let spec = params.iter().find(|q| q.role == *r && q.layer == Some(l));
            let spec = spec.expect("Config::params lists every projection");
            if spec.shape != [m.n, m.k] {
                candle_core::bail!(
                    "{}: blocks of {} x {}, the model has {:?}",
                    spec.name(),
                    m.n,
                    m.k,
                    spec.shape
                );
            }
        }
        held.insert((l, p.role), ms);
    }
    if let Some((l, r)) = blocks.keys().next() {
        candle_core::bail!(
            "the base holds {r:?} of layer {l} in blocks: not a projection of this model"
        );
    }
    Ok(held)
}

fn zeros(n: usize) -> Vec<f32> {
    vec![0f32; n]
}

/// Bytes a run of `cfg` with `batch` sequences holds: the candle variables, the trainer's
/// parameters, gradients and two AdamW moments, and the activations `Trainer::new` keeps for
/// the backward pass (the sizes below are those it allocates). In u128 so that no recipe
/// within the limits overflows it.
pub fn memory_bytes(cfg: &Config, batch: usize) -> u128 {
    let p = cfg.num_params() as u128;
    let (d, f) = (cfg.hidden_size as u128, cfg.intermediate_size as u128);
    let heads = cfg.num_attention_heads as u128;
    let qw = heads * cfg.head_dim as u128;
    let qkv_w = qw + 2 * (cfg.num_key_value_heads * cfg.head_dim) as u128;
    let layers = cfg.num_hidden_layers as u128;
    let n = batch as u128 * cfg.max_position_embeddings as u128;
    let saved = n * (2 + 3 * d + qkv_w + qw + heads + 4 * f);
    let streams = (layers + 1) * n * d + n * (d + 1) + 2 * n;
    let work = n * (2 * d + qkv_w + qw + 3 * f);
    4 * (5 * p + layers * saved + streams + work)
}

impl Trainer {
    /// A trainer for `batch` sequences of the model's full context, its parameters read from
    /// `vars` (every tensor of `cfg.params()`).
    pub fn new(
        cfg: &Config,
        batch: usize,
        adam: AdamWConfig,
        vars: &VarMap,
    ) -> candle_core::Result<Self> {
        Self::build(cfg, batch, adam, vars, None, BlockBase::new())
    }

    /// A trainer of LoRA adapters over the frozen model: only the adapters (and a
    /// classifier's head, which PEFT saves whole as a module to save) train. `vars` holds
    /// the adapters' tensors too (`Config::lora_params` names them), and every tensor of the
    /// base but the projections `blocks` holds.
    pub fn with_lora(
        cfg: &Config,
        batch: usize,
        adam: AdamWConfig,
        vars: &VarMap,
        lora: &LoraConfig,
        blocks: BlockBase,
    ) -> candle_core::Result<Self> {
        Self::build(cfg, batch, adam, vars, Some(lora), blocks)
    }

    fn build(
        cfg: &Config,
        batch: usize,
        adam: AdamWConfig,
        vars: &VarMap,
        lora: Option<&LoraConfig>,
        mut blocks: BlockBase,
    ) -> candle_core::Result<Self> {
        if let Some(why) = unsupported(cfg) {
            candle_core::bail!("{why}");
        }
        if let Some(l) = lora {
            if l.rank == 0
                || !(l.alpha.is_finite() && l.alpha > 0.0)
                || l.targets.is_empty()
                || !(0.0..1.0).contains(&l.dropout)
            {
                candle_core::bail!(
                    "LoRA rank {}, alpha {}, dropout {}, targets {:?}: expected a rank above 0, \
                     a positive alpha, a dropout in [0, 1) and at least one target",
                    l.rank,
                    l.alpha,
                    l.dropout,
                    l.targets
                );
            }
        }
        slm_kernels::process::keep_freed_memory();
        let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (heads, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (qw, kvw) = (heads * hd, kvh * hd);
        let positions = cfg.max_position_embeddings;
        let n = batch * positions;

        // The flat layout: every tensor in `Config::params` order (a layer's q, k, v and
        // their biases, and its gate and up, adjacent), the head sharing the embedding's
        // values when tied.
        let mut params_by_name = Vec::new();
        let mut at = 0usize;
        let adapters = lora.map_or(Vec::new(), |l| cfg.lora_params(l.rank, &l.targets));
        // Projections in blocks have no place in the flat vector (only `with_lora` passes
        // any).
        let mut held = take_fused_blocks(cfg, &mut blocks)?;
        let in_blocks = |spec: &params::Param| {
            let first = FUSED.iter().find(|g| g.contains(&spec.role)).map(|g| g[0]);
            matches!((spec.layer, first), (Some(l), Some(r)) if held.contains_key(&(l, r)))
        };
        for spec in cfg
            .params()
            .into_iter()
            .filter(|s| !in_blocks(s))
            .chain(adapters)
        {
            let range = at..at + spec.len();
            at += spec.len();
            // Under LoRA the model is frozen but for a classifier's head.
            let trainable = lora.is_none()
                || matches!(
                    spec.role,
                    Role::LoraA | Role::LoraB | Role::Score | Role::ScoreBias
                );
            params_by_name.push(Param {
                spec,
                range,
                trainable,
            });
        }
        let total = at;
        let find = |role: Role, layer: Option<usize>| {
            params_by_name
                .iter()
                .find(|p| p.spec.role == role && p.spec.layer == layer)
                .map(|p| p.range.clone())
        };
        let get = |role: Role, layer: Option<usize>| {
            find(role, layer).unwrap_or_else(|| panic!("Config::params lists {role:?}"))
        };
        // Adjacent stretches as one; Config::params promises the adjacency.
        let span = |a: Range<usize>, b: Range<usize>| {
            assert!(a.end <= b.start, "{a:?} then {b:?}");
            a.start..b.end
        };
        let mut wide_len = 0;
        // Layer l's projection fused from `FUSED` group `first`: in blocks, or its stretch.
        let mut proj = |l: usize, first: Role, flat: &dyn Fn() -> Range<usize>| match held
            .remove(&(l, first))
        {
            Some(ms) => {
                let p = Proj::Blocks(ms);
                wide_len = wide_len.max(p.len());
                p
            }
            None => Proj::Flat(flat()),
        };
        let mut layers = Vec::new();
        // Adapters are met in `Config::lora_params` order: layer by layer, A before its B.
        let mut ordinal = 0u64;
        for li in 0..cfg.num_hidden_layers {
            let l = Some(li);
            let qkv = proj(li, Role::Q, &|| {
                let (q, v) = (get(Role::Q, l), get(Role::V, l));
                assert_eq!(get(Role::K, l).end, v.start, "k then v");
                span(q, v)
            });
            let qkv_bias = match (find(Role::QBias, l), find(Role::VBias, l)) {
                (Some(qb), Some(vb)) => Some(span(qb, vb)),
                _ => None,
            };
            let o = proj(li, Role::O, &|| get(Role::O, l));
            let gate_up = proj(li, Role::Gate, &|| {
                let (gate, up) = (get(Role::Gate, l), get(Role::Up, l));
                assert_eq!(gate.end, up.start, "gate then up");
                span(gate, up)
            });
            let down = proj(li, Role::Down, &|| get(Role::Down, l));
            let mut adapters = Vec::new();
            for p in params_by_name
                .iter()
                .filter(|p| p.spec.role == Role::LoraA && p.spec.layer == l)
            {
                let target = p.spec.target.expect("an adapter names its target");
                let b = params_by_name
                    .iter()
                    .find(|q| {
                        q.spec.role == Role::LoraB
                            && q.spec.layer == l
                            && q.spec.target == Some(target)
                    })
                    .expect("Config::lora_params lists B after A")
                    .range
                    .clone();
                assert_eq!(p.range.end, b.start, "A then B");
                let (col, k, m) = match target {
                    Role::Q => (0, d, qw),
                    Role::K => (qw, d, kvw),
                    Role::V => (qw + kvw, d, kvw),
                    Role::O => (0, qw, d),
                    Role::Gate => (0, d, f),
                    Role::Up => (f, d, f),
                    Role::Down => (0, f, d),
                    other => candle_core::bail!("LoRA cannot adapt {other:?}"),
                };
                adapters.push(Adapter {
                    ordinal,
                    target,
                    a: p.range.clone(),
                    b,
                    col,
                    k,
                    m,
                });
                ordinal += 1;
            }
            layers.push(LayerParams {
                attn_norm: get(Role::AttnNorm, l),
                qkv,
                qkv_bias,
                o,
                mlp_norm: get(Role::MlpNorm, l),
                gate_up,
                down,
                adapters,
            });
        }
        let embed = get(Role::Embedding, None);
        let norm = get(Role::FinalNorm, None);
        let (head, head_bias, outputs) = match find(Role::Score, None) {
            Some(score) => (score, find(Role::ScoreBias, None), cfg.head.labels().len()),
            None => (
                find(Role::Head, None).unwrap_or_else(|| embed.clone()),
                None,
                cfg.vocab_size,
            ),
        };

        let rope = slm_model::llama::Rope::new(cfg, None, false, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (cos, sin) = rope.tables(cfg.max_position_embeddings)?;
        let (cos, sin) = (
            cos.flatten_all()?.to_vec1::<f32>()?,
            sin.flatten_all()?.to_vec1::<f32>()?,
        );
        let qkv_w = qw + 2 * kvw;
        let saved = (0..cfg.num_hidden_layers)
            .map(|_| Saved {
                r1: zeros(n),
                h1: zeros(n * d),
                qkv: zeros(n * qkv_w),
                att: zeros(n * qw),
                lse: zeros(n * heads),
                mid: zeros(n * d),
                r2: zeros(n),
                h2: zeros(n * d),
                gu: zeros(n * 2 * f),
                sig: zeros(n * f),
                act: zeros(n * f),
                lora: Vec::new(),
            })
            .collect::<Vec<Saved>>();
        let rank = lora.map_or(0, |l| l.rank);
        let drop_len = match lora {
            Some(l) if l.dropout > 0.0 => n * d.max(f),
            _ => 0,
        };
        let mut saved = saved;
        for (s, lp) in saved.iter_mut().zip(&layers) {
            s.lora = lp.adapters.iter().map(|_| zeros(n * rank)).collect();
        }
        let mut t = Self {
            cfg: cfg.clone(),
            batch,
            positions,
            capacity: positions,
            starts: None,
            params_by_name,
            layers,
            embed,
            norm,
            head,
            head_bias,
            outputs,
            class_weights: None,
            lora: lora.map(|l| LoraRun {
                rank: l.rank,
                scale: (l.alpha / l.rank as f64) as f32,
                dropout: l.dropout as f32,
            }),
            dropout_round: 0,
            pass_seed: None,
            drop_x: zeros(drop_len),
            drop_dx: zeros(drop_len),
            params: zeros(total),
            grads: zeros(total),
            opt: AdamW::new(adam, total),
            groups: Vec::new(),
            cos,
            sin,
            inputs: vec![0; n],
            targets: vec![0; n],
            streams: (0..=cfg.num_hidden_layers).map(|_| zeros(n * d)).collect(),
            saved,
            final_r: zeros(n),
            final_h: zeros(n * d),
            work: Work {
                dres: zeros(n * d),
                dh: zeros(n * d),
                dqkv: zeros(n * qkv_w),
                datt: zeros(n * qw),
                dgu: zeros(n * 2 * f),
                dact: zeros(n * f),
                head: Vec::new(),
                partials: Vec::new(),
                lora_dt: zeros(n * rank),
            },
            discard: Vec::new(),
            wide: zeros(wide_len),
            laps: Laps::default(),
        };
        t.groups = t.trainable_groups();
        t.read_params(vars)?;
        Ok(t)
    }

    /// Keeps the parameters `frozen` selects fixed from now on: AdamW leaves them (and their
    /// moments) alone and backward forms no weight gradient for them, only the input
    /// gradients that flow through. A tied head is frozen with the embedding.
    pub fn freeze(&mut self, frozen: impl Fn(&params::Param) -> bool) {
        for p in &mut self.params_by_name {
            if frozen(&p.spec) {
                p.trainable = false;
            }
        }
        self.groups = self.trainable_groups();
    }

    /// The trainable parameters as AdamW's groups, neighbours with the same decay merged.
    fn trainable_groups(&self) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for p in self.params_by_name.iter().filter(|p| p.trainable) {
            let decay = p.spec.role.decays();
            match groups.last_mut() {
                Some(g) if g.decay == decay && g.range.end == p.range.start => {
                    g.range.end = p.range.end
                }
                _ => groups.push(Group {
                    range: p.range.clone(),
                    decay,
                }),
            }
        }
        groups
    }

    /// Runs the next micro-batches over `positions` per sequence (at most the context the
    /// trainer was made for): a batch of short rows computes only what they hold. Clears
    /// `set_starts`.
    pub fn set_positions(&mut self, positions: usize) -> candle_core::Result<()> {
        if positions == 0 || positions > self.capacity {
            candle_core::bail!(
                "{positions} positions per sequence; expected 1 to {}",
                self.capacity
            );
        }
        self.positions = positions;
        // Starts belong to one shape of micro-batch.
        self.starts = None;
        Ok(())
    }

    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Draws the adapters' dropout masks of the next training passes from `round` (the run
    /// sets it per micro-batch, so a resumed run drops what an unbroken one would).
    pub fn set_dropout_round(&mut self, round: u64) {
        self.dropout_round = round;
    }

    /// Packs several sequences into each row of the next micro-batches: `starts[n]` (one per
    /// input, `batch * positions`) is the position in its row where input n's sequence
    /// begins. Attention stays within a sequence and RoPE counts from its start, so a packed
    /// row trains as its sequences would in rows of their own. `None`: one per row.
    pub fn set_starts(&mut self, starts: Option<&[u32]>) -> candle_core::Result<()> {
        if let Some(st) = starts {
            let t = self.positions;
            if st.len() != self.batch * t {
                candle_core::bail!("{} starts, {} rows of {t} expected", st.len(), self.batch);
            }
            if let Some(n) = kernels::misplaced_start(st, t) {
                candle_core::bail!("position {} of its row starts at {}", n % t, st[n]);
            }
        }
        self.starts = starts.map(<[u32]>::to_vec);
        Ok(())
    }

    /// Tokens per micro-batch: `batch` rows of `positions + 1` (inputs and shifted targets).
    pub fn tokens_per_batch(&self) -> usize {
        self.batch * (self.positions + 1)
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            batch: self.batch,
            positions: self.positions,
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Sets every gradient to zero (before the first micro-batch of an update).
    pub fn zero_grads(&mut self) {
        // Only the trainable stretches: a frozen parameter's gradient is never written, and
        // under LoRA most of the vector is never touched (its pages never committed).
        for g in &self.groups {
            self.grads[g.range.clone()]
                .par_chunks_mut(1 << 16)
                .for_each(|c| c.fill(0.0));
        }
    }

    /// Forward and backward on one micro-batch (`batch` rows of `positions + 1` tokens,
    /// row-major, each row's targets its inputs shifted by one): adds `scale` times the
    /// gradient of the mean next-token loss into the gradients, and returns that loss.
    pub fn accumulate(&mut self, tokens: &[u32], scale: f32) -> candle_core::Result<f32> {
        Ok(self.accumulate_timed(tokens, scale)?.0)
    }

    /// `accumulate` with a teacher: each position's loss is the distillation loss against
    /// what the teacher says of it (`kd::row_loss`; its rows are the batch's positions, row
    /// after row), and the one returned is their mean.
    pub fn accumulate_distilled(
        &mut self,
        tokens: &[u32],
        scale: f32,
        teacher: Teacher<f32>,
    ) -> candle_core::Result<f32> {
        self.load_batch(tokens)?;
        self.forward(true);
        Ok(self.head_and_backward(scale, Some(teacher)))
    }

    /// `accumulate` with targets of its own (`batch` x `positions` each, row-major): a
    /// target may be `IGNORE`, and the loss is the mean over the targets that count.
    pub fn accumulate_targets(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        scale: f32,
    ) -> candle_core::Result<f32> {
        self.set_batch(inputs, targets)?;
        self.forward(true);
        Ok(self.head_and_backward(scale, None))
    }

    /// The mean next-token loss of one micro-batch, without gradients (validation), in the
    /// buffers training uses rather than a second model's.
    pub fn loss(&mut self, tokens: &[u32]) -> candle_core::Result<f32> {
        self.load_batch(tokens)?;
        self.forward(false);
        Ok(self.head_loss(1.0, false, None))
    }

    /// `loss` with targets of its own, as `accumulate_targets` takes them.
    pub fn loss_targets(&mut self, inputs: &[u32], targets: &[u32]) -> candle_core::Result<f32> {
        self.set_batch(inputs, targets)?;
        self.forward(false);
        Ok(self.head_loss(1.0, false, None))
    }

    /// Weighs each output's targets in the loss (a classifier's rarer labels), as torch's
    /// `CrossEntropyLoss(weight=)`: one finite non-negative weight per output.
    pub fn set_class_weights(&mut self, weights: Option<Vec<f64>>) -> candle_core::Result<()> {
        if let Some(w) = &weights {
            if w.len() != self.outputs || !w.iter().all(|x| x.is_finite() && *x >= 0.0) {
                candle_core::bail!(
                    "class weights {w:?}: expected {} finite weights >= 0",
                    self.outputs
                );
            }
        }
        self.class_weights = weights;
        Ok(())
    }

    /// The head's outputs (logits over the vocabulary or a classifier's labels) at `rows`
    /// (indices into `batch * positions`) of `inputs`, row after row: a classifier's
    /// predictions on validation data, without a second model.
    pub fn head_logits(&mut self, inputs: &[u32], rows: &[usize]) -> candle_core::Result<Vec<f32>> {
        self.hidden(inputs, false)?;
        let (d, v) = (self.cfg.hidden_size, self.outputs);
        let n = self.batch * self.positions;
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            candle_core::bail!("row {bad} of a batch of {n}");
        }
        let w = &self.params[self.head.clone()];
        let b = self.head_bias.clone().map(|r| &self.params[r]);
        let mut out = Vec::with_capacity(rows.len() * v);
        for &r in rows {
            let h = &self.final_h[r * d..(r + 1) * d];
            for (o, wr) in w.chunks_exact(d).enumerate() {
                let dot: f32 = h.iter().zip(wr).map(|(a, b)| a * b).sum();
                out.push(dot + b.map_or(0.0, |b| b[o]));
            }
        }
        Ok(out)
    }

    /// The mean loss of the head over the current targets (against a teacher, when one is
    /// given); with `grads`, `scale` times its gradient goes into `work.dh` and the head's
    /// own gradients.
    fn head_loss(&mut self, scale: f32, grads: bool, teacher: Option<Teacher<f32>>) -> f32 {
        let cfg = &self.cfg;
        let shape = HeadShape {
            n: self.batch * self.positions,
            d: cfg.hidden_size,
            v: self.outputs,
        };
        let head = HeadWeights {
            w: &self.params[self.head.clone()],
            b: self.head_bias.clone().map(|r| &self.params[r]),
            class_weights: self.class_weights.as_deref(),
        };
        let grads = if grads {
            // A frozen head (a tied head frozen with the embedding) gets no weight gradient;
            // nor does its bias, when it has one.
            let (lo, hi) = self.grads.split_at_mut(self.head.end);
            let dw = trains(&self.groups, &self.head).then(|| &mut lo[self.head.clone()]);
            let db = self
                .head_bias
                .as_ref()
                .filter(|b| trains(&self.groups, b))
                .map(|b| {
                    assert!(b.start >= self.head.end, "score.bias follows score.weight");
                    &mut hi[b.start - self.head.end..b.end - self.head.end]
                });
            Some(HeadGrads {
                dh: &mut self.work.dh,
                dw,
                db,
            })
        } else {
            None
        };
        let (total, weight) = head_loss_into(
            shape,
            &self.final_h,
            head,
            &self.targets,
            scale,
            grads,
            &mut self.work.head,
            teacher,
        );
        if weight > 0.0 {
            (total / weight) as f32
        } else {
            0.0
        }
    }

    /// `accumulate`, and the seconds its forward pass took (up to the output projection).
    pub fn accumulate_timed(
        &mut self,
        tokens: &[u32],
        scale: f32,
    ) -> candle_core::Result<(f32, f64)> {
        self.load_batch(tokens)?;
        let t0 = std::time::Instant::now();
        self.forward(true);
        let forward_s = t0.elapsed().as_secs_f64();
        Ok((self.head_and_backward(scale, None), forward_s))
    }

    /// The final (normed) hidden states of `inputs` (`batch` x `positions` tokens):
    /// `batch * positions` rows of `hidden_size`, for a head or loss computed outside the
    /// trainer, whose gradient `backward_hidden` then takes.
    pub fn forward_hidden(&mut self, inputs: &[u32]) -> candle_core::Result<&[f32]> {
        self.hidden(inputs, true)
    }

    fn hidden(&mut self, inputs: &[u32], train: bool) -> candle_core::Result<&[f32]> {
        let n = self.batch * self.positions;
        if inputs.len() != n {
            candle_core::bail!(
                "{} input tokens, {} rows of {} expected",
                inputs.len(),
                self.batch,
                self.positions
            );
        }
        self.check_ids(inputs, "token")?;
        self.inputs[..n].copy_from_slice(inputs);
        self.forward(train);
        Ok(&self.final_h[..n * self.cfg.hidden_size])
    }

    /// Backward from `dh`, the gradient of a loss with respect to the hidden states the last
    /// `forward_hidden` returned: adds every parameter's gradient (the output projection's
    /// excepted: that head was not used).
    pub fn backward_hidden(&mut self, dh: &[f32]) -> candle_core::Result<()> {
        let len = self.batch * self.positions * self.cfg.hidden_size;
        if dh.len() != len {
            candle_core::bail!(
                "a hidden-state gradient of {} values, {len} expected",
                dh.len()
            );
        }
        self.work.dh[..len].copy_from_slice(dh);
        self.laps.start();
        self.backward();
        Ok(())
    }

    /// The output projection's weights (vocab x hidden; the embedding's when tied) and their
    /// gradient, for a loss on the hidden states that uses the model's own head (a teacher's
    /// soft targets): it adds the head's gradient here and passes the hidden states' gradient
    /// to `backward_hidden`.
    pub fn head_mut(&mut self) -> (&[f32], &mut [f32]) {
        (
            &self.params[self.head.clone()],
            &mut self.grads[self.head.clone()],
        )
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> candle_core::Result<()> {
        let (limit, of) = match what {
            "target" if self.outputs != self.cfg.vocab_size || self.cfg.head != Head::Lm => {
                (self.outputs, "the head's labels")
            }
            _ => (self.cfg.vocab_size, "the vocabulary"),
        };
        if let Some(bad) = ids
            .iter()
            .find(|&&x| x as usize >= limit && !(what == "target" && x == IGNORE))
        {
            candle_core::bail!("{what} id {bad} is outside {of} of {limit}");
        }
        Ok(())
    }

    fn set_batch(&mut self, inputs: &[u32], targets: &[u32]) -> candle_core::Result<()> {
        let n = self.batch * self.positions;
        if inputs.len() != n || targets.len() != n {
            candle_core::bail!(
                "{} inputs and {} targets, {} rows of {} expected",
                inputs.len(),
                targets.len(),
                self.batch,
                self.positions
            );
        }
        self.check_ids(inputs, "token")?;
        self.check_ids(targets, "target")?;
        self.inputs[..n].copy_from_slice(inputs);
        self.targets[..n].copy_from_slice(targets);
        Ok(())
    }

    /// Checks a micro-batch and splits it into inputs and targets.
    fn load_batch(&mut self, tokens: &[u32]) -> candle_core::Result<()> {
        let (t, b) = (self.positions, self.batch);
        if tokens.len() != b * (t + 1) {
            candle_core::bail!(
                "a micro-batch of {} tokens, {b} rows of {} expected",
                tokens.len(),
                t + 1
            );
        }
        self.check_ids(tokens, "token")?;
        for (r, row) in tokens.chunks_exact(t + 1).enumerate() {
            self.inputs[r * t..(r + 1) * t].copy_from_slice(&row[..t]);
            self.targets[r * t..(r + 1) * t].copy_from_slice(&row[1..]);
        }
        Ok(())
    }

    /// `train`: a pass whose backward follows (the adapters' dropout applies).
    fn forward(&mut self, train: bool) {
        let cfg = &self.cfg;
        let (d, f, eps) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.rms_norm_eps as f32,
        );
        let n = self.batch * self.positions;
        let shape = self.attn_shape();
        let (qw, qkv_w) = (shape.out_width(), shape.qkv_width());
        let starts = self.starts.as_deref();
        let rope = rope_spec(shape, &self.cos, &self.sin, starts);
        let p = &self.params;
        let lora = self.lora;
        self.pass_seed = train.then(|| splitmix64(self.dropout_round));
        let seed = self.pass_seed;
        let drop_x = &mut self.drop_x;
        let wide = &mut self.wide;
        let laps = &mut self.laps;
        laps.start();
        let heads = shape.heads;
        kernels::embed(
            &mut self.streams[0][..n * d],
            &p[self.embed.clone()],
            &self.inputs[..n],
            d,
        );
        laps.lap("embedding");
        for (l, (lp, s)) in self.layers.iter().zip(&mut self.saved).enumerate() {
            let (before, after) = self.streams.split_at_mut(l + 1);
            let (x, out) = (&before[l][..n * d], &mut after[0][..n * d]);
            kernels::rms_norm(
                &mut s.h1[..n * d],
                &mut s.r1[..n],
                x,
                &p[lp.attn_norm.clone()],
                eps,
            );
            laps.lap("rms_norm");
            linear::forward(
                &mut s.qkv[..n * qkv_w],
                &s.h1[..n * d],
                lp.qkv.weights(p, wide),
                (n, d, qkv_w),
                false,
            );
            if let Some(l) = lora {
                let y = &mut s.qkv[..n * qkv_w];
                adapters_forward(
                    &lp.adapters,
                    &mut s.lora,
                    &QKV,
                    y,
                    qkv_w,
                    &s.h1,
                    p,
                    n,
                    l,
                    (seed, &mut drop_x[..]),
                );
            }
            if let Some(b) = &lp.qkv_bias {
                kernels::add_bias(&mut s.qkv[..n * qkv_w], &p[b.clone()]);
            }
            laps.lap("linear");
            kernels::rope(&mut s.qkv[..n * qkv_w], rope, false);
            laps.lap("rope");
            kernels::attention(
                &mut s.att[..n * qw],
                &mut s.lse[..n * heads],
                &s.qkv[..n * qkv_w],
                shape,
                starts,
            );
            laps.lap("attention");
            s.mid[..n * d].copy_from_slice(x);
            linear::forward(
                &mut s.mid[..n * d],
                &s.att[..n * qw],
                lp.o.weights(p, wide),
                (n, qw, d),
                true,
            );
            if let Some(l) = lora {
                let y = &mut s.mid[..n * d];
                adapters_forward(
                    &lp.adapters,
                    &mut s.lora,
                    &[Role::O],
                    y,
                    d,
                    &s.att,
                    p,
                    n,
                    l,
                    (seed, &mut drop_x[..]),
                );
            }
            laps.lap("linear");
            kernels::rms_norm(
                &mut s.h2[..n * d],
                &mut s.r2[..n],
                &s.mid[..n * d],
                &p[lp.mlp_norm.clone()],
                eps,
            );
            laps.lap("rms_norm");
            linear::forward(
                &mut s.gu[..n * 2 * f],
                &s.h2[..n * d],
                lp.gate_up.weights(p, wide),
                (n, d, 2 * f),
                false,
            );
            if let Some(l) = lora {
                let y = &mut s.gu[..n * 2 * f];
                adapters_forward(
                    &lp.adapters,
                    &mut s.lora,
                    &GATE_UP,
                    y,
                    2 * f,
                    &s.h2,
                    p,
                    n,
                    l,
                    (seed, &mut drop_x[..]),
                );
            }
            laps.lap("linear");
            kernels::swiglu(
                &mut s.act[..n * f],
                &mut s.sig[..n * f],
                &s.gu[..n * 2 * f],
                f,
            );
            laps.lap("swiglu");
            out.copy_from_slice(&s.mid[..n * d]);
            let down = lp.down.weights(p, wide);
            linear::forward(out, &s.act[..n * f], down, (n, f, d), true);
            if let Some(l) = lora {
                adapters_forward(
                    &lp.adapters,
                    &mut s.lora,
                    &[Role::Down],
                    out,
                    d,
                    &s.act,
                    p,
                    n,
                    l,
                    (seed, &mut drop_x[..]),
                );
            }
            laps.lap("linear");
        }
        let last = &self.streams[self.cfg.num_hidden_layers][..n * d];
        kernels::rms_norm(
            &mut self.final_h[..n * d],
            &mut self.final_r[..n],
            last,
            &p[self.norm.clone()],
            eps,
        );
        laps.lap("rms_norm");
    }

    /// The loss of the output projection, then every gradient back to the embedding.
    fn head_and_backward(&mut self, scale: f32, teacher: Option<Teacher<f32>>) -> f32 {
        self.laps.start();
        let loss = self.head_loss(scale, true, teacher);
        self.laps.lap("output projection + loss");
        self.backward();
        loss
    }

    /// Every gradient from `work.dh` (of the final hidden states) back to the embedding.
    /// Frozen linear layers get their input gradient only; a frozen norm's weight gradient
    /// is formed in scratch and dropped.
    fn backward(&mut self) {
        let cfg = &self.cfg;
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let n = self.batch * self.positions;
        let shape = self.attn_shape();
        let (qw, qkv_w) = (shape.out_width(), shape.qkv_width());
        let starts = self.starts.as_deref();
        let rope = rope_spec(shape, &self.cos, &self.sin, starts);
        let heads = shape.heads;
        let (p, g, w, groups) = (&self.params, &mut self.grads, &mut self.work, &self.groups);
        let discard = &mut self.discard;
        let laps = &mut self.laps;
        let lora = self.lora;
        let (seed, drop_x, drop_dx) = (self.pass_seed, &mut self.drop_x, &mut self.drop_dx);
        let wide = &mut self.wide;
        // A linear layer's backward: both gradients, or the input's alone when it is frozen.
        let mut linear_bwd = |dx: &mut [f32],
                              g: &mut [f32],
                              dy: &[f32],
                              x: &[f32],
                              proj: &Proj,
                              dims: (usize, usize, usize),
                              partials: &mut Vec<f32>| {
            let w = proj.weights(p, wide);
            match proj.trained(groups) {
                Some(r) => linear::backward(dx, &mut g[r.clone()], dy, x, w, dims, partials),
                None => linear::input_grad(dx, dy, w, dims, false),
            }
        };
        w.dres[..n * d]
            .par_chunks_mut(1 << 14)
            .for_each(|c| c.fill(0.0));
        kernels::rms_norm_bwd(
            &mut w.dres[..n * d],
            grad_or_discard(g, &self.norm, groups, discard),
            &w.dh[..n * d],
            &self.streams[cfg.num_hidden_layers][..n * d],
            &self.final_r[..n],
            &p[self.norm.clone()],
        );
        laps.lap("rms_norm (backward)");
        for (l, (lp, s)) in self.layers.iter().zip(&self.saved).enumerate().rev() {
            let x = &self.streams[l][..n * d];
            // MLP: out = mid + down(silu(gate) * up)
            linear_bwd(
                &mut w.dact[..n * f],
                g,
                &w.dres[..n * d],
                &s.act[..n * f],
                &lp.down,
                (n, f, d),
                &mut w.partials,
            );
            if let Some(l) = lora {
                let (dx, dy, x) = (&mut w.dact[..], &w.dres[..], &s.act[..]);
                adapters_backward(
                    &lp.adapters,
                    &s.lora,
                    &[Role::Down],
                    dx,
                    dy,
                    d,
                    x,
                    p,
                    g,
                    &mut w.lora_dt,
                    n,
                    l,
                    (seed, &mut drop_x[..], &mut drop_dx[..]),
                );
            }
            laps.lap("linear (backward)");
            kernels::swiglu_bwd(
                &mut w.dgu[..n * 2 * f],
                &w.dact[..n * f],
                &s.gu[..n * 2 * f],
                &s.sig[..n * f],
                f,
            );
            laps.lap("swiglu (backward)");
            linear_bwd(
                &mut w.dh[..n * d],
                g,
                &w.dgu[..n * 2 * f],
                &s.h2[..n * d],
                &lp.gate_up,
                (n, d, 2 * f),
                &mut w.partials,
            );
            if let Some(l) = lora {
                let (dx, dy, x) = (&mut w.dh[..], &w.dgu[..], &s.h2[..]);
                adapters_backward(
                    &lp.adapters,
                    &s.lora,
                    &GATE_UP,
                    dx,
                    dy,
                    2 * f,
                    x,
                    p,
                    g,
                    &mut w.lora_dt,
                    n,
                    l,
                    (seed, &mut drop_x[..], &mut drop_dx[..]),
                );
            }
            laps.lap("linear (backward)");
            kernels::rms_norm_bwd(
                &mut w.dres[..n * d],
                grad_or_discard(g, &lp.mlp_norm, groups, discard),
                &w.dh[..n * d],
                &s.mid[..n * d],
                &s.r2[..n],
                &p[lp.mlp_norm.clone()],
            );
            laps.lap("rms_norm (backward)");
            // Attention: mid = x + o(attention(rope(q), rope(k), v))
            linear_bwd(
                &mut w.datt[..n * qw],
                g,
                &w.dres[..n * d],
                &s.att[..n * qw],
                &lp.o,
                (n, qw, d),
                &mut w.partials,
            );
            if let Some(l) = lora {
                let (dx, dy, x) = (&mut w.datt[..], &w.dres[..], &s.att[..]);
                adapters_backward(
                    &lp.adapters,
                    &s.lora,
                    &[Role::O],
                    dx,
                    dy,
                    d,
                    x,
                    p,
                    g,
                    &mut w.lora_dt,
                    n,
                    l,
                    (seed, &mut drop_x[..], &mut drop_dx[..]),
                );
            }
            laps.lap("linear (backward)");
            kernels::attention_bwd(
                &mut w.dqkv[..n * qkv_w],
                &w.datt[..n * qw],
                &s.att[..n * qw],
                &s.lse[..n * heads],
                &s.qkv[..n * qkv_w],
                shape,
                starts,
            );
            laps.lap("attention (backward)");
            kernels::rope(&mut w.dqkv[..n * qkv_w], rope, true);
            laps.lap("rope (backward)");
            if let Some(b) = lp.qkv_bias.as_ref().filter(|b| trains(groups, b)) {
                kernels::bias_bwd(&mut g[b.clone()], &w.dqkv[..n * qkv_w]);
            }
            linear_bwd(
                &mut w.dh[..n * d],
                g,
                &w.dqkv[..n * qkv_w],
                &s.h1[..n * d],
                &lp.qkv,
                (n, d, qkv_w),
                &mut w.partials,
            );
            if let Some(l) = lora {
                let (dx, dy, x) = (&mut w.dh[..], &w.dqkv[..], &s.h1[..]);
                adapters_backward(
                    &lp.adapters,
                    &s.lora,
                    &QKV,
                    dx,
                    dy,
                    qkv_w,
                    x,
                    p,
                    g,
                    &mut w.lora_dt,
                    n,
                    l,
                    (seed, &mut drop_x[..], &mut drop_dx[..]),
                );
            }
            laps.lap("linear (backward)");
            kernels::rms_norm_bwd(
                &mut w.dres[..n * d],
                grad_or_discard(g, &lp.attn_norm, groups, discard),
                &w.dh[..n * d],
                x,
                &s.r1[..n],
                &p[lp.attn_norm.clone()],
            );
            laps.lap("rms_norm (backward)");
        }
        if trains(groups, &self.embed) {
            kernels::embed_bwd(
                &mut g[self.embed.clone()],
                &w.dres[..n * d],
                &self.inputs[..n],
                d,
            );
        }
        laps.lap("embedding (backward)");
    }

    /// Seconds per kind of op since the last call, largest first.
    pub fn take_op_seconds(&mut self) -> Vec<(&'static str, f64)> {
        let mut v = std::mem::take(&mut self.laps.seconds);
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// The global L2 norm of the gradients (a frozen parameter's stay zero).
    pub fn grad_norm(&self) -> f64 {
        // Partial sums of fixed blocks, added in order: the same norm on every run.
        let parts: Vec<f64> = self
            .grads
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .collect();
        parts.iter().sum::<f64>().sqrt()
    }

    /// One AdamW update of the trainable parameters with the gradients times `grad_scale`.
    pub fn step(&mut self, lr: f64, grad_scale: f64) {
        self.opt
            .step(&mut self.params, &self.grads, &self.groups, lr, grad_scale);
    }

    fn var_map_tensor(
        data: &HashMap<String, candle_core::Var>,
        name: &str,
        shape: &[usize],
    ) -> candle_core::Result<candle_core::Var> {
        let var = data
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("the model has no tensor {name}")))?;
        if var.dims() != shape {
            candle_core::bail!("{name} has shape {:?}, {shape:?} expected", var.dims());
        }
        Ok(var.clone())
    }

    /// Reads every parameter from `vars` (after a resume or a parent model's load).
    pub fn read_params(&mut self, vars: &VarMap) -> candle_core::Result<()> {
        let data = vars.data().lock().expect("var map lock");
        for prm in &self.params_by_name {
            let var = Self::var_map_tensor(&data, &prm.spec.name(), &prm.spec.shape)?;
            let values = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            self.params[prm.range.clone()].copy_from_slice(&values);
        }
        Ok(())
    }

    /// Writes every parameter into `vars`, whose model then computes with them.
    pub fn write_params(&self, vars: &VarMap) -> candle_core::Result<()> {
        let data = vars.data().lock().expect("var map lock");
        for prm in &self.params_by_name {
            let var = Self::var_map_tensor(&data, &prm.spec.name(), &prm.spec.shape)?;
            let t = Tensor::from_slice(
                &self.params[prm.range.clone()],
                prm.spec.shape.as_slice(),
                &Device::Cpu,
            )?
            .to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The gradients by parameter name (for tests and diagnostics).
    pub fn grads_by_name(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        self.by_name(&self.grads, |_| true)
    }

    /// `values`' stretches of the parameters `which` selects, as tensors by name.
    fn by_name(
        &self,
        values: &[f32],
        which: impl Fn(&Param) -> bool,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        self.params_by_name
            .iter()
            .filter(|p| which(p))
            .map(|p| {
                Ok((
                    p.spec.name(),
                    Tensor::from_slice(
                        &values[p.range.clone()],
                        p.spec.shape.as_slice(),
                        &Device::Cpu,
                    )?,
                ))
            })
            .collect()
    }

    /// The names of the parameters that train (AdamW updates them).
    pub fn trainable_names(&self) -> Vec<String> {
        self.params_by_name
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.spec.name())
            .collect()
    }

    /// The moments of the parameters that train, by name (`m.NAME`, `v.NAME`), as
    /// `optim::AdamW::state` saves them (a frozen parameter's stay zero).
    pub fn state(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut s = HashMap::new();
        for (prefix, values) in [("m", &self.opt.m), ("v", &self.opt.v)] {
            for (name, t) in self.by_name(values, |p| p.trainable)? {
                s.insert(format!("{prefix}.{name}"), t);
            }
        }
        Ok(s)
    }

    /// Restores what `state` saved, after `steps` updates.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        steps: u64,
    ) -> candle_core::Result<()> {
        for prm in self.params_by_name.iter().filter(|p| p.trainable) {
            for (prefix, values) in [("m", &mut self.opt.m), ("v", &mut self.opt.v)] {
                let key = format!("{prefix}.{}", prm.spec.name());
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no {key}"))
                })?;
                if t.dims() != prm.spec.shape.as_slice() {
                    candle_core::bail!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        t.dims(),
                        prm.spec.shape
                    );
                }
                let x = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                values[prm.range.clone()].copy_from_slice(&x);
            }
        }
        self.opt.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{init_params, Rng};
    use candle_nn::VarBuilder;
    use slm_model::{Arch, Llama, Weights};

    /// Odd sizes on purpose: a head_dim that is not a multiple of 8, grouped kv heads, more
    /// positions than one attention tile and not a multiple of it, a vocabulary of 97.
    pub(crate) fn odd_config(tied: bool) -> Config {
        Config {
            arch: Arch::Llama,
            vocab_size: 97,
            hidden_size: 36,
            intermediate_size: 50,
            num_hidden_layers: 2,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            head_dim: 6,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 150,
            tie_word_embeddings: tied,
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: Some(0),
            head: Default::default(),
        }
    }

    /// Qwen2's shape: attention biases on q, k and v.
    fn biased_config() -> Config {
        Config {
            arch: Arch::Qwen2,
            attention_bias: true,
            ..odd_config(true)
        }
    }

    pub(crate) fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng(seed);
        (0..n)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect()
    }

    /// Fresh parameters with norm weights away from 1 and biases away from 0, so a wrong
    /// norm or bias gradient cannot hide.
    fn params(cfg: &Config, seed: u64) -> VarMap {
        let vars = init_params(cfg, DType::F32, seed, &Device::Cpu).unwrap();
        for (name, var) in vars.data().lock().unwrap().iter() {
            let n = var.elem_count();
            let w: Vec<f32> = if name.ends_with("norm.weight") {
                (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.15).collect()
            } else if name.ends_with(".bias") {
                (0..n).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect()
            } else {
                continue;
            };
            var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        vars
    }

    /// Loss and gradients of candle's autograd through `slm_model::Llama` (its composed
    /// ops) and `candle_nn::loss::cross_entropy`: the reference. `targets` may hold
    /// `IGNORE`; the loss is the mean over the others.
    pub(crate) fn reference(
        cfg: &Config,
        vars: &VarMap,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> (f32, HashMap<String, Tensor>) {
        let dev = Device::Cpu;
        let model = Llama::load(
            cfg,
            &Weights::Vars(VarBuilder::from_varmap(vars, DType::F32, &dev)),
            &dev,
        )
        .unwrap();
        let t = cfg.max_position_embeddings;
        let x = Tensor::from_slice(inputs, (batch, t), &dev).unwrap();
        let logits = model
            .forward(&x, None, false)
            .unwrap()
            .reshape((batch * t, outputs(cfg)))
            .unwrap();
        let keep: Vec<u32> = (0..targets.len() as u32)
            .filter(|&i| targets[i as usize] != IGNORE)
            .collect();
        let kept: Vec<u32> = keep.iter().map(|&i| targets[i as usize]).collect();
        let loss = candle_nn::loss::cross_entropy(
            &logits
                .index_select(&Tensor::new(keep.as_slice(), &dev).unwrap(), 0)
                .unwrap(),
            &Tensor::new(kept.as_slice(), &dev).unwrap(),
        )
        .unwrap();
        let store = loss.backward().unwrap();
        let data = vars.data().lock().unwrap();
        let grads = data
            .iter()
            .map(|(name, var)| (name.clone(), store.get(var.as_tensor()).unwrap().clone()))
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    }

    fn outputs(cfg: &Config) -> usize {
        match cfg.head {
            Head::Lm => cfg.vocab_size,
            _ => cfg.head.labels().len(),
        }
    }

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("L{i}")).collect()
    }

    /// A classifier's head trains through the same backward as the language model's: a
    /// sequence head scored at each row's last real token (the rows after it padding), a
    /// token head with its bias at some tokens, against candle's autograd through
    /// `slm_model::Llama` with the same head; class weights as torch weighs them.
    #[test]
    fn classifier_heads_equal_candle_autograd() {
        let heads = [
            (
                "sequence",
                Head::Sequence {
                    labels: labels(3),
                    pad_token_id: Some(0),
                },
            ),
            (
                "token",
                Head::Token {
                    labels: labels(5),
                    echo: false,
                },
            ),
        ];
        for (what, head) in heads {
            let cfg = Config {
                head,
                ..odd_config(true)
            };
            let v = outputs(&cfg);
            let batch = 3;
            let vars = params(&cfg, 9);
            let inputs = random_tokens(batch * 150, cfg.vocab_size, 5);
            let targets: Vec<u32> = (0..batch * 150)
                .map(|i| {
                    let (row, pos) = (i / 150, i % 150);
                    let counts = match cfg.head {
                        Head::Sequence { .. } => pos == 149 - 40 * row,
                        _ => pos % 3 != row,
                    };
                    if counts {
                        (i % v) as u32
                    } else {
                        IGNORE
                    }
                })
                .collect();
            let (ref_loss, ref_grads) = reference(&cfg, &vars, &inputs, &targets, batch);
            let mut tr = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars).unwrap();
            tr.zero_grads();
            let loss = tr.accumulate_targets(&inputs, &targets, 1.0).unwrap();
            assert!(
                (loss - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
                "{what}: loss {loss} vs reference {ref_loss}"
            );
            assert_grads_close(what, &tr.grads_by_name().unwrap(), &ref_grads);
            let eval = tr.loss_targets(&inputs, &targets).unwrap();
            assert_eq!(eval.to_bits(), loss.to_bits(), "{what}");
            // The logits at the scored rows are the reference model's.
            let rows: Vec<usize> = (0..targets.len())
                .filter(|&i| targets[i] != IGNORE)
                .collect();
            let got = tr.head_logits(&inputs, &rows).unwrap();
            let dev = Device::Cpu;
            let model = Llama::load(
                &cfg,
                &Weights::Vars(VarBuilder::from_varmap(&vars, DType::F32, &dev)),
                &dev,
            )
            .unwrap();
            let want: Vec<f32> = model
                .forward(
                    &Tensor::from_slice(&inputs, (batch, 150), &dev).unwrap(),
                    None,
                    false,
                )
                .unwrap()
                .reshape((batch * 150, v))
                .unwrap()
                .index_select(
                    &Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev).unwrap(),
                    0,
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "{what}: logits differ by {err}");
            // Class weights: the loss is the weighted mean of the per-target losses.
            let weights: Vec<f64> = (0..v).map(|i| 1.0 + i as f64).collect();
            tr.set_class_weights(Some(weights.clone())).unwrap();
            let weighted = tr.loss_targets(&inputs, &targets).unwrap();
            let mut per_label = vec![(0f64, 0usize); v];
            tr.set_class_weights(None).unwrap();
            for (l, acc) in per_label.iter_mut().enumerate() {
                let only: Vec<u32> = targets
                    .iter()
                    .map(|&t| if t == l as u32 { t } else { IGNORE })
                    .collect();
                acc.1 = only.iter().filter(|&&t| t != IGNORE).count();
                if acc.1 > 0 {
                    acc.0 = tr.loss_targets(&inputs, &only).unwrap() as f64 * acc.1 as f64;
                }
            }
            let num: f64 = per_label.iter().zip(&weights).map(|(a, w)| a.0 * w).sum();
            let den: f64 = per_label
                .iter()
                .zip(&weights)
                .map(|(a, w)| a.1 as f64 * w)
                .sum();
            assert!(
                ((num / den) as f32 - weighted).abs() < 1e-5 * weighted,
                "{what}: weighted loss {weighted} vs {}",
                num / den
            );
            let e = tr.set_class_weights(Some(vec![1.0; v + 1])).unwrap_err();
            assert!(e.to_string().contains("class weights"), "{e}");
            let mut bad = targets.clone();
            bad[149] = v as u32;
            let e = tr.accumulate_targets(&inputs, &bad, 1.0).unwrap_err();
            assert!(e.to_string().contains("outside the head's labels"), "{e}");
        }
    }

    /// LoRA over every projection: the loss is that of the merged weights W + s·B·A (the
    /// reference, candle's autograd through the merged model), and the adapters' gradients
    /// follow from the merged weights' by the chain rule: dB = s·dW·Aᵀ, dA = s·Bᵀ·dW. The
    /// frozen model gets no gradient and does not move in an update; a classifier's head
    /// trains beside the adapters.
    #[test]
    fn lora_adapters_train_like_the_merged_model() {
        let targets: Vec<Role> = Role::LORA_TARGETS.iter().map(|t| t.0).collect();
        for (what, cfg) in [
            ("lm", odd_config(false)),
            (
                "sequence head",
                Config {
                    head: Head::Sequence {
                        labels: labels(3),
                        pad_token_id: None,
                    },
                    ..biased_config()
                },
            ),
        ] {
            let lora = LoraConfig {
                rank: 3,
                alpha: 6.0,
                targets: targets.clone(),
                dropout: 0.0,
            };
            let s = (lora.alpha / lora.rank as f64) as f32;
            let batch = 2;
            let t = 150;
            let vars = params(&cfg, 11);
            let merged = params(&cfg, 11);
            let mut adapters = HashMap::new();
            {
                let data = vars.data().lock().unwrap();
                let mdata = merged.data().lock().unwrap();
                let mut seed = 20;
                let lp = cfg.lora_params(lora.rank, &targets);
                for pair in lp.chunks(2) {
                    let (pa, pb) = (&pair[0], &pair[1]);
                    seed += 1;
                    let mk = |p: &params::Param, seed: u64| {
                        let v: Vec<f32> = random_tokens(p.len(), 1000, seed)
                            .iter()
                            .map(|&x| (x as f32 / 1000.0 - 0.5) * 0.2)
                            .collect();
                        Tensor::from_vec(v, p.shape.as_slice(), &Device::Cpu).unwrap()
                    };
                    let (a, b) = (mk(pa, seed), mk(pb, seed + 1000));
                    let base_name = pa.target.unwrap().hf_name(pa.layer);
                    let w = data[&base_name].as_tensor().clone();
                    let w_eff = (w + (b.matmul(&a).unwrap() * s as f64).unwrap()).unwrap();
                    mdata[&base_name].set(&w_eff).unwrap();
                    adapters.insert(base_name, (a, b));
                }
            }
            for p in cfg.lora_params(lora.rank, &targets) {
                let base_name = p.target.unwrap().hf_name(p.layer);
                let (a, b) = &adapters[&base_name];
                let x = if p.role == Role::LoraA { a } else { b };
                vars.data()
                    .lock()
                    .unwrap()
                    .insert(p.name(), candle_core::Var::from_tensor(x).unwrap());
            }
            let inputs = random_tokens(batch * t, cfg.vocab_size, 12);
            let targets_ids: Vec<u32> = match cfg.head {
                Head::Lm => random_tokens(batch * t, cfg.vocab_size, 13),
                _ => (0..batch * t)
                    .map(|i| {
                        if i % t == t - 1 {
                            (i % 3) as u32
                        } else {
                            IGNORE
                        }
                    })
                    .collect(),
            };
            let (ref_loss, ref_grads) = reference(&cfg, &merged, &inputs, &targets_ids, batch);
            let mut tr = Trainer::with_lora(
                &cfg,
                batch,
                AdamWConfig::default(),
                &vars,
                &lora,
                BlockBase::new(),
            )
            .unwrap();
            tr.zero_grads();
            let loss = tr.accumulate_targets(&inputs, &targets_ids, 1.0).unwrap();
            assert!(
                (loss - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
                "{what}: loss {loss} vs reference {ref_loss}"
            );
            let grads = tr.grads_by_name().unwrap();
            let mut want = HashMap::new();
            for p in cfg.lora_params(lora.rank, &targets) {
                let base_name = p.target.unwrap().hf_name(p.layer);
                let (a, b) = &adapters[&base_name];
                let dw = &ref_grads[&base_name];
                let g = if p.role == Role::LoraA {
                    b.t().unwrap().matmul(dw).unwrap()
                } else {
                    dw.matmul(&a.t().unwrap()).unwrap()
                };
                want.insert(p.name(), (g * s as f64).unwrap());
            }
            for name in ["score.weight"] {
                if let Some(g) = ref_grads.get(name) {
                    want.insert(name.to_string(), g.clone());
                }
            }
            let got: HashMap<String, Tensor> = grads
                .iter()
                .filter(|(n, _)| want.contains_key(*n))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect();
            assert_grads_close(what, &got, &want);
            // The frozen model has no gradient, and an update moves only what trains.
            for (name, g) in &grads {
                if !want.contains_key(name) {
                    assert_eq!(max_abs(g), 0.0, "{what}: {name} has a gradient");
                }
            }
            tr.step(1e-2, 1.0);
            tr.write_params(&vars).unwrap();
            let before = params(&cfg, 11);
            let (now, was) = (vars.data().lock().unwrap(), before.data().lock().unwrap());
            for (name, v) in was.iter() {
                let moved = max_abs(&(now[name].as_tensor() - v.as_tensor()).unwrap()) > 0.0;
                assert_eq!(
                    moved,
                    want.contains_key(name),
                    "{what}: {name} moved: {moved}"
                );
            }
        }
    }

    /// A base kept in GGUF blocks trains exactly as its widened f32 weights do: the same
    /// losses and adapter gradients, bit for bit, over two updates with adapter dropout (each
    /// layer in another block type; Llama's permuted rows are the loader's business, tested
    /// with the real file).
    #[test]
    fn a_base_in_blocks_trains_as_its_widened_weights() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use slm_kernels::quant::BlockType;
        // Every projection's input a multiple of the 32-value block.
        let cfg = Config {
            vocab_size: 97,
            hidden_size: 64,
            intermediate_size: 96,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 40,
            ..odd_config(false)
        };
        let targets: Vec<Role> = Role::LORA_TARGETS.iter().map(|t| t.0).collect();
        let lora = LoraConfig {
            rank: 3,
            alpha: 6.0,
            targets: targets.clone(),
            dropout: 0.1,
        };
        let (flat, held) = (params(&cfg, 11), params(&cfg, 11));
        crate::adapter::init(&flat, &cfg, &lora, 3).unwrap();
        crate::adapter::init(&held, &cfg, &lora, 3).unwrap();
        let mut blocks = BlockBase::new();
        for p in cfg.params() {
            let (Some(l), true) = (p.layer, targets.contains(&p.role)) else {
                continue;
            };
            let (g, t) = [
                (GgmlDType::Q4_1, BlockType::Q4_1),
                (GgmlDType::Q8_0, BlockType::Q8_0),
            ][l];
            let name = p.name();
            let w = flat.data().lock().unwrap()[&name].as_tensor().clone();
            let q = QTensor::quantize(&w, g).unwrap();
            flat.data().lock().unwrap()[&name]
                .set(&q.dequantize(&Device::Cpu).unwrap())
                .unwrap();
            held.data().lock().unwrap().remove(&name);
            let m = BlockMatrix::new(t, &q.data().unwrap(), p.shape[0], p.shape[1]);
            blocks.insert((l, p.role), m);
        }
        // Adapters that move the output (B starts at zero).
        for vars in [&flat, &held] {
            for p in cfg.lora_params(lora.rank, &targets) {
                if p.role == Role::LoraB {
                    let v: Vec<f32> = random_tokens(p.len(), 1000, p.len() as u64)
                        .iter()
                        .map(|&x| (x as f32 / 1000.0 - 0.5) * 0.2)
                        .collect();
                    let t = Tensor::from_vec(v, p.shape.as_slice(), &Device::Cpu).unwrap();
                    vars.data().lock().unwrap()[&p.name()].set(&t).unwrap();
                }
            }
        }
        let batch = 2;
        let mut a = Trainer::with_lora(
            &cfg,
            batch,
            AdamWConfig::default(),
            &flat,
            &lora,
            BlockBase::new(),
        )
        .unwrap();
        let mut b =
            Trainer::with_lora(&cfg, batch, AdamWConfig::default(), &held, &lora, blocks).unwrap();
        let t = cfg.max_position_embeddings;
        for round in 0..2 {
            let tokens = random_tokens(batch * (t + 1), cfg.vocab_size, 40 + round);
            let mut losses = Vec::new();
            let mut grads = Vec::new();
            for tr in [&mut a, &mut b] {
                tr.set_dropout_round(round);
                tr.zero_grads();
                losses.push(tr.accumulate(&tokens, 1.0).unwrap());
                grads.push(tr.grads_by_name().unwrap());
                tr.step(1e-2, 1.0);
            }
            assert_eq!(
                losses[0].to_bits(),
                losses[1].to_bits(),
                "round {round}: {losses:?}"
            );
            let adapter_grads = cfg.lora_params(lora.rank, &targets);
            for p in &adapter_grads {
                let v = |g: &HashMap<String, Tensor>| -> Vec<u32> {
                    let x: Vec<f32> = g[&p.name()].flatten_all().unwrap().to_vec1().unwrap();
                    x.iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(v(&grads[0]), v(&grads[1]), "round {round}: {}", p.name());
            }
            assert!(grads[1].values().any(|g| max_abs(g) > 0.0));
        }
        // The blocks' memory is theirs alone: the flat vector holds no projection.
        assert!(
            b.params.len() < a.params.len() / 2,
            "{} vs {}",
            b.params.len(),
            a.params.len()
        );
        // A fused projection half in blocks is refused.
        let mut partial = BlockBase::new();
        let q = cfg
            .params()
            .into_iter()
            .find(|p| p.role == Role::Q)
            .unwrap();
        let w = flat.data().lock().unwrap()[&q.name()].as_tensor().clone();
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        partial.insert(
            (0, Role::Q),
            BlockMatrix::new(BlockType::Q8_0, &qt.data().unwrap(), q.shape[0], q.shape[1]),
        );
        let e = Trainer::with_lora(&cfg, batch, AdamWConfig::default(), &flat, &lora, partial);
        let e = e.err().expect("refused").to_string();
        assert!(e.contains("layer 0") && e.contains("only some"), "{e}");
        // Blocks of the wrong shape, and blocks of something that is not a projection.
        let q8 = |n: usize, k: usize| {
            let w = Tensor::zeros((n, k), DType::F32, &Device::Cpu).unwrap();
            let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            BlockMatrix::new(BlockType::Q8_0, &qt.data().unwrap(), n, k)
        };
        let down = cfg
            .params()
            .into_iter()
            .find(|p| p.role == Role::Down)
            .unwrap();
        let wrong = BlockBase::from([((1, Role::Down), q8(down.shape[0], 2 * down.shape[1]))]);
        let e = Trainer::with_lora(&cfg, batch, AdamWConfig::default(), &flat, &lora, wrong);
        let e = e.err().expect("refused").to_string();
        assert!(
            e.contains("down_proj") && e.contains("blocks of 64 x 192"),
            "{e}"
        );
        let norm = BlockBase::from([((0, Role::AttnNorm), q8(1, 64))]);
        let e = Trainer::with_lora(&cfg, batch, AdamWConfig::default(), &flat, &lora, norm);
        let e = e.err().expect("refused").to_string();
        assert!(
            e.contains("AttnNorm") && e.contains("not a projection"),
            "{e}"
        );
    }

    /// Adapter dropout: the gradient of the training loss under a round's masks agrees with
    /// central finite differences of that loss (the masks fixed by the round); validation
    /// passes do not drop; another round draws other masks.
    #[test]
    fn adapter_dropout_gradients_match_finite_differences() {
        let cfg = odd_config(false);
        let targets: Vec<Role> = Role::LORA_TARGETS.iter().map(|t| t.0).collect();
        let lora = |dropout| LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: targets.clone(),
            dropout,
        };
        let vars = params(&cfg, 11);
        let lp = cfg.lora_params(2, &targets);
        let set = |vars: &VarMap,
                   along: &HashMap<String, Vec<f32>>,
                   base: &HashMap<String, Vec<f32>>,
                   eps: f32| {
            for p in &lp {
                let v: Vec<f32> = base[&p.name()]
                    .iter()
                    .zip(&along[&p.name()])
                    .map(|(b, d)| b + eps * d)
                    .collect();
                let t = Tensor::from_vec(v, p.shape.as_slice(), &Device::Cpu).unwrap();
                vars.data()
                    .lock()
                    .unwrap()
                    .insert(p.name(), candle_core::Var::from_tensor(&t).unwrap());
            }
        };
        let random = |p: &params::Param, seed: u64| -> Vec<f32> {
            random_tokens(p.len(), 1000, seed)
                .iter()
                .map(|&x| (x as f32 / 1000.0 - 0.5) * 0.4)
                .collect()
        };
        let base: HashMap<String, Vec<f32>> = lp
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name(), random(p, 30 + i as u64)))
            .collect();
        let along: HashMap<String, Vec<f32>> = lp
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name(), random(p, 90 + i as u64)))
            .collect();
        set(&vars, &along, &base, 0.0);
        let (batch, t) = (2, 40);
        let inputs = random_tokens(batch * t, cfg.vocab_size, 12);
        let labels = random_tokens(batch * t, cfg.vocab_size, 13);
        let mut tr = Trainer::with_lora(
            &cfg,
            batch,
            AdamWConfig::default(),
            &vars,
            &lora(0.3),
            BlockBase::new(),
        )
        .unwrap();
        tr.set_positions(t).unwrap();
        let mut plain = Trainer::with_lora(
            &cfg,
            batch,
            AdamWConfig::default(),
            &vars,
            &lora(0.0),
            BlockBase::new(),
        )
        .unwrap();
        plain.set_positions(t).unwrap();
        let train_loss = |tr: &mut Trainer, round| {
            tr.set_dropout_round(round);
            tr.zero_grads();
            tr.accumulate_targets(&inputs, &labels, 1.0).unwrap()
        };
        let loss = train_loss(&mut tr, 7);
        let grads = tr.grads_by_name().unwrap();
        let analytic: f64 = lp
            .iter()
            .map(|p| {
                let g: Vec<f32> = grads[&p.name()].flatten_all().unwrap().to_vec1().unwrap();
                g.iter()
                    .zip(&along[&p.name()])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
            })
            .sum();
        let eps = 1e-2;
        let mut at = |e: f32| {
            set(&vars, &along, &base, e);
            tr.read_params(&vars).unwrap();
            train_loss(&mut tr, 7) as f64
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        assert!(
            (numeric - analytic).abs() <= 0.01 * analytic.abs(),
            "directional derivative {analytic} against finite differences {numeric}"
        );
        set(&vars, &along, &base, 0.0);
        tr.read_params(&vars).unwrap();
        // Another round, other masks; validation drops nothing, as without dropout.
        assert_eq!(train_loss(&mut tr, 7), loss);
        assert_ne!(train_loss(&mut tr, 8), loss);
        let eval = tr.loss_targets(&inputs, &labels).unwrap();
        assert_eq!(eval, plain.loss_targets(&inputs, &labels).unwrap());
        assert_ne!(eval, loss);
        let e = Trainer::with_lora(
            &cfg,
            batch,
            AdamWConfig::default(),
            &vars,
            &lora(1.0),
            BlockBase::new(),
        );
        assert!(e.is_err_and(|e| e.to_string().contains("dropout 1")));
    }

    /// Micro-batches shorter than the context the trainer was made for compute what the
    /// reference computes at that length, and the full length still does afterwards.
    #[test]
    fn shorter_micro_batches_equal_the_reference_at_their_length() {
        let cfg = odd_config(false);
        let batch = 2;
        let vars = params(&cfg, 10);
        let mut tr = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars).unwrap();
        // (Not 1: one key gets all the attention, so k's true gradient is 0 and ours is rounding.)
        for t in [37, 150, 2, 129] {
            let short = Config {
                max_position_embeddings: t,
                ..cfg.clone()
            };
            let tokens = random_tokens(batch * (t + 1), cfg.vocab_size, t as u64);
            let (inputs, targets) = split(&tokens, t);
            let (ref_loss, ref_grads) = reference(&short, &vars, &inputs, &targets, batch);
            tr.set_positions(t).unwrap();
            tr.zero_grads();
            let loss = tr.accumulate(&tokens, 1.0).unwrap();
            assert!(
                (loss - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
                "{t} positions: loss {loss} vs reference {ref_loss}"
            );
            assert_grads_close(
                &format!("{t} positions"),
                &tr.grads_by_name().unwrap(),
                &ref_grads,
            );
        }
        assert!(tr.set_positions(151).is_err() && tr.set_positions(0).is_err());
    }

    /// Two sequences packed into one row train as they do in rows of their own: the same
    /// loss and gradients.
    #[test]
    fn packed_sequences_train_as_separate_rows() {
        let cfg = odd_config(false);
        let vars = params(&cfg, 12);
        let (a, b) = (70, 45);
        let tokens = random_tokens(a + b + 2, cfg.vocab_size, 3);
        let (seq_a, seq_b) = tokens.split_at(a + 1);
        // Separate rows of `a` positions: the second padded, its padding's targets ignored.
        let mut inputs = seq_a[..a].to_vec();
        let mut targets = seq_a[1..].to_vec();
        inputs.extend(&seq_b[..b]);
        inputs.resize(2 * a, 0);
        targets.extend(&seq_b[1..]);
        targets.resize(2 * a, IGNORE);
        let mut separate = Trainer::new(&cfg, 2, AdamWConfig::default(), &vars).unwrap();
        separate.set_positions(a).unwrap();
        separate.zero_grads();
        let want = separate.accumulate_targets(&inputs, &targets, 1.0).unwrap();

        let mut packed = Trainer::new(&cfg, 1, AdamWConfig::default(), &vars).unwrap();
        packed.set_positions(a + b).unwrap();
        let inputs: Vec<u32> = seq_a[..a].iter().chain(&seq_b[..b]).copied().collect();
        // Each sequence brings its own next tokens (a + 1 and b + 1 tokens).
        let targets: Vec<u32> = seq_a[1..].iter().chain(&seq_b[1..]).copied().collect();
        let starts: Vec<u32> = (0..a + b)
            .map(|i| if i < a { 0 } else { a as u32 })
            .collect();
        packed.set_starts(Some(&starts)).unwrap();
        packed.zero_grads();
        let got = packed.accumulate_targets(&inputs, &targets, 1.0).unwrap();
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "packed loss {got} against {want} in separate rows"
        );
        assert_grads_close(
            "packed",
            &packed.grads_by_name().unwrap(),
            &separate.grads_by_name().unwrap(),
        );
        // Without the starts the second sequence sees the first: the loss moves.
        packed.set_starts(None).unwrap();
        let leaky = packed.loss_targets(&inputs, &targets).unwrap();
        assert!((leaky - want).abs() > 1e-4, "{leaky} {want}");
        assert!(packed.set_starts(Some(&starts[1..])).is_err());
        let mut bad = starts.clone();
        bad[3] = 5;
        assert!(packed.set_starts(Some(&bad)).is_err());
    }

    /// Inputs and next-token targets of `batch` rows of a token sequence.
    fn split(tokens: &[u32], t: usize) -> (Vec<u32>, Vec<u32>) {
        let rows = tokens.chunks_exact(t + 1);
        (
            rows.clone().flat_map(|r| r[..t].to_vec()).collect(),
            rows.flat_map(|r| r[1..].to_vec()).collect(),
        )
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Every gradient within 1e-4 of the reference's largest value in that tensor (f32
    /// against f32 summed in another order).
    fn assert_grads_close(
        what: &str,
        grads: &HashMap<String, Tensor>,
        reference: &HashMap<String, Tensor>,
    ) {
        assert_eq!(grads.len(), reference.len(), "{what}");
        for (name, r) in reference {
            let g = &grads[name];
            let err = max_abs(&(g - r).unwrap());
            let scale = max_abs(r);
            assert!(
                err <= 1e-4 * scale,
                "{what} {name}: max error {err:e}, largest reference value {scale:e}"
            );
        }
    }

    #[test]
    fn loss_and_gradients_equal_candle_autograd() {
        let configs = [
            ("tied", odd_config(true)),
            ("untied", odd_config(false)),
            ("qkv biases", biased_config()),
        ];
        for (what, cfg) in configs {
            let batch = 3;
            let vars = params(&cfg, 7);
            let tokens = random_tokens(batch * 151, cfg.vocab_size, 3);
            let (inputs, targets) = split(&tokens, 150);
            let (ref_loss, ref_grads) = reference(&cfg, &vars, &inputs, &targets, batch);
            let mut tr = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars).unwrap();
            tr.zero_grads();
            let loss = tr.accumulate(&tokens, 1.0).unwrap();
            assert!(
                (loss - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
                "{what}: loss {loss} vs reference {ref_loss}"
            );
            let eval = tr.loss(&tokens).unwrap();
            assert!(
                (eval - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
                "{what}: validation loss {eval} vs reference {ref_loss}"
            );
            assert_grads_close(what, &tr.grads_by_name().unwrap(), &ref_grads);
        }
    }

    /// Ignored targets (a chat's prompt tokens) count for nothing: the loss is the mean over
    /// the others and the gradients are the reference's over those rows alone.
    #[test]
    fn ignored_targets_carry_no_loss_or_gradient() {
        let cfg = odd_config(true);
        let batch = 2;
        let vars = params(&cfg, 8);
        let tokens = random_tokens(batch * 151, cfg.vocab_size, 4);
        let (inputs, mut targets) = split(&tokens, 150);
        for (i, t) in targets.iter_mut().enumerate() {
            if i % 150 < 60 || i % 11 == 0 {
                *t = IGNORE;
            }
        }
        let (ref_loss, ref_grads) = reference(&cfg, &vars, &inputs, &targets, batch);
        let mut tr = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars).unwrap();
        tr.zero_grads();
        let loss = tr.accumulate_targets(&inputs, &targets, 1.0).unwrap();
        assert!(
            (loss - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
            "loss {loss} vs reference {ref_loss}"
        );
        assert_grads_close("masked", &tr.grads_by_name().unwrap(), &ref_grads);
        let mut bad = targets.clone();
        bad[3] = 97;
        let e = tr.accumulate_targets(&inputs, &bad, 1.0).unwrap_err();
        assert!(e.to_string().contains("target id 97"), "{e}");
    }

    /// A loss computed outside the trainer from its hidden states drives the same backward:
    /// Σ h·r through `forward_hidden` / `backward_hidden` against candle's autograd of
    /// `Llama::hidden`. The output projection gets no gradient.
    #[test]
    fn a_loss_on_the_hidden_states_backpropagates_like_the_reference() {
        let cfg = odd_config(false);
        let batch = 2;
        let vars = params(&cfg, 9);
        let (inputs, _) = split(&random_tokens(batch * 151, cfg.vocab_size, 5), 150);
        let mut rng = Rng(6);
        let r: Vec<f32> = (0..batch * 150 * cfg.hidden_size)
            .map(|_| rng.normal() as f32)
            .collect();
        let mut tr = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars).unwrap();
        tr.zero_grads();
        let h = tr.forward_hidden(&inputs).unwrap().to_vec();
        tr.backward_hidden(&r).unwrap();
        let grads = tr.grads_by_name().unwrap();

        let dev = Device::Cpu;
        let model = Llama::load(
            &cfg,
            &Weights::Vars(VarBuilder::from_varmap(&vars, DType::F32, &dev)),
            &dev,
        )
        .unwrap();
        let x = Tensor::from_slice(&inputs, (batch, 150), &dev).unwrap();
        let hidden = model.hidden(&x).unwrap();
        let want: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
        let err = h
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4, "hidden states differ by {err:e}");
        let rt = Tensor::from_slice(&r, hidden.shape(), &dev).unwrap();
        let store = (hidden * rt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let data = vars.data().lock().unwrap();
        let mut reference: HashMap<String, Tensor> = HashMap::new();
        for (name, var) in data.iter() {
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like().unwrap(),
            };
            reference.insert(name.clone(), g);
        }
        assert_eq!(max_abs(&grads["lm_head.weight"]), 0.0);
        reference.remove("lm_head.weight");
        let mut ours = grads;
        ours.remove("lm_head.weight");
        assert_grads_close("hidden", &ours, &reference);
    }

    /// A loss assembled from the seams (`forward_hidden`, the head's weights and gradient
    /// from `head_mut`, `backward_hidden`) gives the trainer's own loss and gradients to the
    /// bit: what a distillation objective builds on.
    #[test]
    fn the_seams_compose_into_the_trainers_own_step() {
        let cfg = odd_config(true);
        let batch = 2;
        let vars = params(&cfg, 12);
        let tokens = random_tokens(batch * 151, cfg.vocab_size, 7);
        let (inputs, targets) = split(&tokens, 150);
        let mut whole = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars).unwrap();
        whole.zero_grads();
        let want_loss = whole.accumulate(&tokens, 1.0).unwrap();

        let mut tr = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars).unwrap();
        tr.zero_grads();
        let h = tr.forward_hidden(&inputs).unwrap().to_vec();
        let (n, d, v) = (batch * 150, cfg.hidden_size, cfg.vocab_size);
        let mut dh = vec![0f32; n * d];
        let (w, dw) = tr.head_mut();
        let (total, counted) = head_loss_into(
            HeadShape { n, d, v },
            &h,
            HeadWeights::matrix(w),
            &targets,
            1.0,
            Some(HeadGrads {
                dh: &mut dh,
                dw: Some(dw),
                db: None,
            }),
            &mut Vec::new(),
            None,
        );
        tr.backward_hidden(&dh).unwrap();
        assert_eq!(((total / counted) as f32).to_bits(), want_loss.to_bits());
        assert_eq!(
            tr.grads.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            whole.grads.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    /// Frozen parameters (a LoRA base) keep their values and get no gradient; the others
    /// get the same gradients as in an unfrozen model, and only they move.
    #[test]
    fn frozen_parameters_stay_fixed() {
        let cfg = odd_config(true);
        let vars = params(&cfg, 10);
        let tokens = random_tokens(2 * 151, cfg.vocab_size, 6);
        let mut full = Trainer::new(&cfg, 2, AdamWConfig::default(), &vars).unwrap();
        full.zero_grads();
        full.accumulate(&tokens, 1.0).unwrap();
        let full_grads = full.grads_by_name().unwrap();

        let mut tr = Trainer::new(&cfg, 2, AdamWConfig::default(), &vars).unwrap();
        let frozen = |p: &params::Param| {
            p.role == Role::Embedding
                || p.role.is_norm()
                || (p.layer == Some(0)
                    && matches!(p.role, Role::Q | Role::K | Role::V | Role::Down))
        };
        tr.freeze(frozen);
        tr.zero_grads();
        tr.accumulate(&tokens, 1.0).unwrap();
        let before = tr.params.clone();
        tr.step(1e-2, 1.0);
        let grads = tr.grads_by_name().unwrap();
        for p in cfg.params() {
            let name = p.name();
            let range = &tr
                .params_by_name
                .iter()
                .find(|q| q.spec == p)
                .unwrap()
                .range;
            let moved = tr.params[range.clone()] != before[range.clone()];
            if frozen(&p) {
                assert_eq!(max_abs(&grads[&name]), 0.0, "{name} has a gradient");
                assert!(!moved, "{name} moved");
            } else {
                let err = max_abs(&(&grads[&name] - &full_grads[&name]).unwrap());
                assert_eq!(
                    err, 0.0,
                    "{name}: gradient differs from the unfrozen model's"
                );
                assert!(moved, "{name} did not move");
            }
        }
    }

    /// Twenty AdamW updates with clipping, learning-rate warmup and two micro-batches each,
    /// through the trainer and through the reference's gradients (with the same AdamW over
    /// a copy of the parameters): the same loss curve, and the same parameters after it,
    /// within f32 tolerance.
    #[test]
    fn a_short_run_follows_the_reference_loss_curve() {
        let cfg = odd_config(true);
        let (batch, accum) = (2, 2);
        let dev = Device::Cpu;
        let adam = AdamWConfig::default();
        let fused_vars = init_params(&cfg, DType::F32, 11, &dev).unwrap();
        let ref_vars = init_params(&cfg, DType::F32, 11, &dev).unwrap();
        let mut tr = Trainer::new(&cfg, batch, adam, &fused_vars).unwrap();
        // The reference's parameters as one vector in `Config::params` order.
        let specs = cfg.params();
        let total: usize = specs.iter().map(|p| p.len()).sum();
        let mut ref_params = Vec::with_capacity(total);
        let mut groups = Vec::new();
        for p in &specs {
            let v = ref_vars.data().lock().unwrap()[&p.name()]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            groups.push(Group {
                range: ref_params.len()..ref_params.len() + v.len(),
                decay: p.role.decays(),
            });
            ref_params.extend(v);
        }
        let mut opt = AdamW::new(adam, total);
        let t = cfg.max_position_embeddings;
        let (mut fused, mut reference_curve) = (vec![], vec![]);
        for step in 0..20u64 {
            let lr = 3e-3 * ((step + 1) as f64 / 5.0).min(1.0);
            // Rows that count up in steps of 5 from a random start: learnable in a few updates.
            let batches: Vec<Vec<u32>> = (0..accum)
                .map(|i| {
                    let starts = random_tokens(batch, cfg.vocab_size, 100 + step * 7 + i);
                    starts
                        .iter()
                        .flat_map(|&s| (0..t as u32 + 1).map(move |j| (s + 5 * j) % 97))
                        .collect()
                })
                .collect();
            tr.zero_grads();
            let mut loss = 0.0;
            for b in &batches {
                loss += tr.accumulate(b, 1.0 / accum as f32).unwrap() / accum as f32;
            }
            let norm = tr.grad_norm();
            tr.step(lr, if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 });
            fused.push(loss);

            let mut acc = vec![0f32; total];
            let mut loss = 0.0;
            for b in &batches {
                let (inputs, targets) = split(b, t);
                let (l, g) = reference(&cfg, &ref_vars, &inputs, &targets, batch);
                loss += l / accum as f32;
                for (p, group) in specs.iter().zip(&groups) {
                    let gv = g[&p.name()]
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    for (a, x) in acc[group.range.clone()].iter_mut().zip(gv) {
                        *a += x / accum as f32;
                    }
                }
            }
            let norm = acc
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt();
            let scale = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
            opt.step(&mut ref_params, &acc, &groups, lr, scale);
            let data = ref_vars.data().lock().unwrap();
            for (p, group) in specs.iter().zip(&groups) {
                let v =
                    Tensor::from_slice(&ref_params[group.range.clone()], p.shape.as_slice(), &dev)
                        .unwrap();
                data[&p.name()].set(&v).unwrap();
            }
            reference_curve.push(loss);
        }
        for (i, (a, b)) in fused.iter().zip(&reference_curve).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "update {i}: fused loss {a}, reference {b} (curves {fused:?} vs {reference_curve:?})"
            );
        }
        assert!(fused[19] < fused[0] - 0.1, "the loss fell: {fused:?}");
        tr.write_params(&fused_vars).unwrap();
        let (fd, rd) = (
            fused_vars.data().lock().unwrap(),
            ref_vars.data().lock().unwrap(),
        );
        for (name, v) in rd.iter() {
            let err = max_abs(&(fd[name].as_tensor() - v.as_tensor()).unwrap());
            assert!(
                err <= 1e-4 * max_abs(v.as_tensor()),
                "{name}: parameters differ by {err:e}"
            );
        }
    }

    /// The same seed and batches give the same parameters to the bit, however rayon's
    /// threads shared the work: every reduction sums fixed blocks in a fixed order.
    #[test]
    fn updates_are_reproducible_bit_for_bit() {
        for cfg in [odd_config(true), biased_config()] {
            let run = || {
                let vars = init_params(&cfg, DType::F32, 5, &Device::Cpu).unwrap();
                let mut tr = Trainer::new(&cfg, 3, AdamWConfig::default(), &vars).unwrap();
                for step in 0..3 {
                    tr.zero_grads();
                    let tokens = random_tokens(3 * 151, cfg.vocab_size, 40 + step);
                    tr.accumulate(&tokens, 1.0).unwrap();
                    let norm = tr.grad_norm();
                    tr.step(1e-2, 1.0 / norm.max(1.0));
                }
                tr.params.clone()
            };
            let first = run();
            for _ in 0..3 {
                let again = run();
                assert!(
                    first
                        .iter()
                        .zip(&again)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "parameters differ between two identical runs"
                );
            }
        }
    }

    /// Each refusal names what was wrong: a micro-batch of the wrong length, a token past the
    /// vocabulary, a model shape no kernel handles, a parameter missing or of another
    /// shape, optimizer state without a moment or with one of another shape.
    #[test]
    fn bad_input_is_refused_by_name() {
        let cfg = odd_config(true);
        let dev = Device::Cpu;
        let vars = init_params(&cfg, DType::F32, 1, &dev).unwrap();
        let mut tr = Trainer::new(&cfg, 2, AdamWConfig::default(), &vars).unwrap();
        let err = |r: candle_core::Result<f32>| r.unwrap_err().to_string();
        let short = err(tr.accumulate(&[1; 10], 1.0));
        assert!(short.contains("10 tokens, 2 rows of 151"), "{short}");
        let mut tokens = random_tokens(tr.tokens_per_batch(), cfg.vocab_size, 2);
        tokens[5] = 97;
        let outside = err(tr.loss(&tokens));
        assert!(
            outside.contains("token id 97") && outside.contains("97"),
            "{outside}"
        );
        let e = err(tr.accumulate_targets(&[1; 300], &[1; 299], 1.0));
        assert!(
            e.contains("300 inputs and 299 targets, 2 rows of 150"),
            "{e}"
        );
        let e = tr.forward_hidden(&[1; 7]).err().unwrap().to_string();
        assert!(e.contains("7 input tokens, 2 rows of 150"), "{e}");
        tr.forward_hidden(&vec![1; 300]).unwrap();
        let e = tr.backward_hidden(&[0.0; 5]).unwrap_err().to_string();
        assert!(e.contains("gradient of 5 values"), "{e}");

        let mut odd = cfg.clone();
        odd.head_dim = 5;
        odd.hidden_size = 30;
        let e = Trainer::new(&odd, 2, AdamWConfig::default(), &vars)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("head_dim 5 is odd"), "{e}");

        let other = VarMap::new();
        let e = tr.read_params(&other).unwrap_err().to_string();
        assert!(
            e.contains("has no tensor model.layers.0.input_layernorm.weight"),
            "{e}"
        );
        let wide = init_params(&odd_config(false), DType::F32, 1, &dev).unwrap();
        {
            let mut data = wide.data().lock().unwrap();
            let bad = Tensor::zeros((3, 36), DType::F32, &dev).unwrap();
            data.insert(
                "model.norm.weight".into(),
                candle_core::Var::from_tensor(&bad).unwrap(),
            );
        }
        let e = tr.read_params(&wide).unwrap_err().to_string();
        assert!(
            e.contains("model.norm.weight has shape [3, 36], [36] expected"),
            "{e}"
        );

        let mut state = tr.state().unwrap();
        state.remove("v.model.norm.weight");
        let e = tr.load_state(&state, 1).unwrap_err().to_string();
        assert!(
            e.contains("optimizer state has no v.model.norm.weight"),
            "{e}"
        );
        let mut state = tr.state().unwrap();
        state.insert(
            "m.model.norm.weight".into(),
            Tensor::zeros(5, DType::F32, &dev).unwrap(),
        );
        let e = tr.load_state(&state, 1).unwrap_err().to_string();
        assert!(e.contains("m.model.norm.weight has shape [5]"), "{e}");
    }
}
