//! `slm quantize`: a GGUF file (or a Hugging Face folder, converted first) rewritten with its
//! weight matrices in one of ggml's block types, byte for byte as llama-quantize writes them:
//! the same reference row quantizers (ggml-quants.c, `quantize_row_*_ref`, ported below with
//! their float operations in the same order) and the same per-tensor type choice
//! (llama-quant.cpp's `llama_tensor_get_type`). So far the file types of the legacy block
//! types Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, whose output projection may take Q6_K; the Q4_K
//! quantizer is written and held to llama-quantize's bytes, the K-quant file types (their
//! per-layer mixes) and importance matrices are to come.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use slm_model::gguf::{GgmlType, GgufFile, Value};
use slm_model::Config;

use crate::export::{ExportError, FloatType};

/// A file type of llama-quantize: the type most weight matrices get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
}

impl FileType {
    pub const NAMES: [&'static str; 5] = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q5_0" => Self::Q5_0,
            "q5_1" => Self::Q5_1,
            _ => return None,
        })
    }
    fn tensor_type(self) -> GgmlType {
        match self {
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
        }
    }
    /// llama.cpp's `llama_ftype` (general.file_type).
    fn id(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
        }
    }
}

fn f16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// One row of f32 values in `ty`'s blocks, written to `out` (the row's bytes), as ggml's
/// reference quantizers compute them.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    let blocks = x.chunks_exact(32).zip(out.chunks_exact_mut(ty.type_size()));
    match ty {
        GgmlType::Q8_0 => {
            for (b, o) in blocks {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                o[..2].copy_from_slice(&f16(d));
                for (q, v) in o[2..].iter_mut().zip(b) {
                    *q = (v * id).round() as i8 as u8;
                }
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let five = ty == GgmlType::Q5_0;
            let (div, off, top) = if five {
                (-16.0, 16.5, 31u8)
            } else {
                (-8.0, 8.5, 15u8)
            };
            for (b, o) in blocks {
                // The value of largest magnitude, the first one on ties (as ggml scans).
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in b {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / div;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                o[..2].copy_from_slice(&f16(d));
                let q = |v: f32| top.min((v * id + off) as i8 as u8);
                put_quants(b, q, five, &mut o[2..]);
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let five = ty == GgmlType::Q5_1;
            for (b, o) in blocks {
                let min = b.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
                let max = b.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
                let d = (max - min) / if five { 31.0 } else { 15.0 };
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                o[..2].copy_from_slice(&f16(d));
                o[2..4].copy_from_slice(&f16(min));
                if five {
                    put_quants(b, |v| ((v - min) * id + 0.5) as u8, true, &mut o[4..]);
                } else {
                    let q = |v: f32| 15u8.min(((v - min) * id + 0.5) as i8 as u8);
                    put_quants(b, q, false, &mut o[4..]);
                }
            }
        }
        GgmlType::Q6K => quantize_row_q6k(x, out),
        GgmlType::Q4K => quantize_row_q4k(x, out),
        other => unreachable!("no reference quantizer for {}", other.name()),
    }
}

/// A block's quants into `o`: for 5-bit types the 32 high bits first (value j's in bit j),
/// then the low nibbles, value j in the low half of byte j and value j + 16 in the high half.
fn put_quants(b: &[f32], q: impl Fn(f32) -> u8, five: bool, o: &mut [u8]) {
    let mut qs = [0u8; 32];
    for (d, &v) in qs.iter_mut().zip(b) {
        *d = q(v);
    }
    let o = if five {
        let mut qh = 0u32;
        for (j, &v) in qs.iter().enumerate() {
            qh |= u32::from((v & 0x10) >> 4) << j;
        }
        o[..4].copy_from_slice(&qh.to_le_bytes());
        &mut o[4..]
    } else {
        o
    };
    for j in 0..16 {
        o[j] = (qs[j] & 0x0F) | ((qs[j + 16] & 0x0F) << 4);
    }
}

/// The type llama-quantize gives tensor `name` of `dims` in a file of type `ft`
/// (`llama_tensor_get_type` for the legacy file types): the output projection, or the token
/// embedding when it doubles as one, gets Q6_K, or Q8_0 when its rows are not whole 256-value
/// blocks (`tensor_type_fallback`) or the file is Q8_0; every other weight matrix gets the
/// file's type; vectors (norms, biases) keep theirs.
fn choose_type(name: &str, dims: &[usize], tied: bool, ft: FileType) -> Option<GgmlType> {
    if dims.len() < 2 || !name.ends_with(".weight") {
        return None;
    }
    let is_output = name == "output.weight" || (tied && name == "token_embd.weight");
    let cols = dims[dims.len() - 1];
    let ty = if is_output && ft != FileType::Q8_0 {
        if cols.is_multiple_of(256) {
            GgmlType::Q6K
        } else {
            GgmlType::Q8_0
        }
    } else {
        ft.tensor_type()
    };
    Some(ty)
}

/// Quantizes the GGUF `model` into `out` as file type `ft`. Weights already quantized are
/// refused unless `allow_requantize` (they are dequantized first, compounding the error).
pub fn quantize_gguf(
    model: &Path,
    out: &Path,
    ft: FileType,
    allow_requantize: bool,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<(), ExportError> {
    let err = |what: String| ExportError::Model {
        path: model.to_path_buf(),
        what,
    };
    let file = GgufFile::open(model)?;
    // Only a model slm can load is quantized (its configuration checked).
    Config::from_gguf(&file)?;
    let tied = file.tensor_info("output.weight").is_none();
    let mut plan = Vec::new();
    for t in &file.tensors {
        let target = choose_type(&t.name, &t.dims, tied, ft);
        if let Some(ty) = target {
            if !matches!(t.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
                && !allow_requantize
            {
                return Err(err(format!(
                    "tensor '{}' is already {}: requantizing loses more than quantizing the original; \
                     pass --allow-requantize to do it anyway",
                    t.name,
                    t.dtype.name()
                )));
            }
            if t.dims[t.dims.len() - 1] % ty.block_size() != 0 {
                return Err(err(format!(
                    "tensor '{}' has rows of {} values, not whole {} blocks of {}",
                    t.name,
                    t.dims[t.dims.len() - 1],
                    ty.name(),
                    ty.block_size()
                )));
            }
        }
        plan.push(target.unwrap_or(t.dtype));
    }
    let mut meta: BTreeMap<String, Value> = file.metadata.clone();
    meta.insert("general.file_type".into(), Value::U32(ft.id()));
    meta.insert("general.quantization_version".into(), Value::U32(2));
    let specs: Vec<slm_model::gguf_write::TensorSpec> = file
        .tensors
        .iter()
        .zip(&plan)
        .map(|(t, &dtype)| slm_model::gguf_write::TensorSpec {
            name: &t.name,
            dims: &t.dims,
            dtype,
        })
        .collect();
    let n = file.tensors.len();
    let write = slm_model::gguf_write::write_gguf_streamed(out, &meta, &specs, |i| {
        let t = &file.tensors[i];
        progress(i, n);
        if plan[i] == t.dtype {
            return Ok(file.tensor_bytes(t).to_vec());
        }
        // Float weights are read straight from the map; quantized ones (with
        // --allow-requantize) through candle's dequantizer.
        let values = match FloatType::of_ggml(t.dtype) {
            Some(f) => f.values(file.tensor_bytes(t)),
            None => {
                let cpu = candle_core::Device::Cpu;
                let q = slm_model::weights::gguf_qtensor(&file, &t.name, &cpu)
                    .map_err(|e| e.to_string())?;
                q.dequantize(&cpu)
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| e.to_string())?
            }
        };
        file.release(t);
        let cols = t.dims[t.dims.len() - 1];
        let row_bytes = cols / plan[i].block_size() * plan[i].type_size();
        let mut out = vec![0u8; values.len() / cols * row_bytes];
        out.par_chunks_mut(row_bytes)
            .zip(values.par_chunks(cols))
            .for_each(|(o, r)| quantize_row(plan[i], r, o));
        Ok(out)
    });
    write.map_err(|e| ExportError::Model {
        path: out.to_path_buf(),
        what: e.to_string(),
    })
}

/// ggml's `nearest_int`: round half to even through the float's mantissa (|x| < 2^22).
fn nearest_int(x: f32) -> i32 {
    ((x + 12582912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights: the scale of `x`'s
/// values on levels -nmax..nmax-1 (written to `l` offset by nmax), searched over 19 candidate
/// scales for the least weighted squared error.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    // Separate multiplies and adds, not fused: llama-quantize's bytes come out this way.
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, l: &mut [i8]| {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
        }
    };
    let iscale = -(nmax as f32) / max;
    fill(iscale, l);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// One row in Q6_K blocks (ggml's `quantize_row_q6_K_ref`): per 16 values a scale from
/// `make_qx_quants`, the scales quantized to 8 bits against the block's f16 scale, then 6-bit
/// quants, low nibbles in `ql`, high bits in `qh`.
fn quantize_row_q6k(x: &[f32], out: &mut [u8]) {
    for (b, o) in x.chunks_exact(256).zip(out.chunks_exact_mut(210)) {
        let mut l = [0i8; 256];
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs) = (0f32, 0f32);
        for ib in 0..16 {
            let s = make_qx_quants(32, &b[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
            scales[ib] = s;
            if s.abs() > max_abs {
                max_abs = s.abs();
                max_scale = s;
            }
        }
        o.fill(0);
        if max_abs < 1e-15 {
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = half::f16::from_f32(1.0 / iscale);
        o[208..210].copy_from_slice(&d.to_le_bytes());
        let mut sc = [0i8; 16];
        for ib in 0..16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
            o[192 + ib] = sc[ib] as u8;
        }
        for j in 0..16 {
            let dj = d.to_f32() * sc[j] as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(b[16 * j + ii] / dj).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as i8;
            }
        }
        let (ql, rest) = o.split_at_mut(128);
        let qh = &mut rest[..64];
        for (half_, j) in [0usize, 128].into_iter().enumerate() {
            let ql = &mut ql[64 * half_..64 * half_ + 64];
            let qh = &mut qh[32 * half_..32 * half_ + 32];
            for i in 0..32 {
                let q = |k: usize| l[j + i + k] as u8;
                ql[i] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
                ql[i + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
                qh[i] =
                    (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
    }
}

/// ggml's `make_qkx2_quants` for Q4_K (`nmax` 15, `rmin` -1, `rdelta` 0.1, 20 steps, squared
/// error): the scale and minimum of `x`'s values on levels 0..=nmax under `weights` (levels
/// written to `l`); returns (scale, -min).
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], l: &mut [u8]) -> (f32, f32) {
    let (rmin, rdelta, nstep) = (-1.0f32, 0.1f32, 20);
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..x.len() {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..x.len() {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..x.len() {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..x.len() {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..x.len()].copy_from_slice(&aux[..x.len()]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One row in Q4_K blocks (ggml's `quantize_row_q4_K_ref`): per 32 values a scale and a
/// minimum from `make_qkx2_quants`, both quantized to 6 bits against the block's f16 `d` and
/// `dmin`, then 4-bit quants.
fn quantize_row_q4k(x: &[f32], out: &mut [u8]) {
    for (b, o) in x.chunks_exact(256).zip(out.chunks_exact_mut(144)) {
        let mut l = [0u8; 256];
        let mut scales = [0f32; 8];
        let mut mins = [0f32; 8];
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..8 {
            let xs = &b[32 * j..32 * j + 32];
            let mut sum_x2 = 0f32;
            for v in xs {
                sum_x2 += v * v;
            }
            let av_x = (sum_x2 / 32.0).sqrt();
            let mut weights = [0f32; 32];
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
            let (s, m) = make_qkx2_quants(15, xs, &weights, &mut l[32 * j..32 * j + 32]);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut sc = [0u8; 12];
        for j in 0..8 {
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                sc[j] = ls;
                sc[j + 4] = lm;
            } else {
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                sc[j - 4] |= (ls >> 4) << 6;
                sc[j] |= (lm >> 4) << 6;
            }
        }
        let d = half::f16::from_f32(max_scale / 63.0);
        let dmin = half::f16::from_f32(max_min / 63.0);
        o[0..2].copy_from_slice(&d.to_le_bytes());
        o[2..4].copy_from_slice(&dmin.to_le_bytes());
        o[4..16].copy_from_slice(&sc);
        for j in 0..8 {
            let (s, m) = if j < 4 {
                (sc[j] & 63, sc[j + 4] & 63)
            } else {
                (
                    (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                    (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                )
            };
            let dj = d.to_f32() * s as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = dmin.to_f32() * m as f32;
            for ii in 0..32 {
                l[32 * j + ii] = nearest_int((b[32 * j + ii] + dm) / dj).clamp(0, 15) as u8;
            }
        }
        let q = &mut o[16..144];
        for (k, j) in (0..256).step_by(64).enumerate() {
            for i in 0..32 {
                q[32 * k + i] = l[j + i] | (l[j + i + 32] << 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama-quantize's choices for the legacy file types.
    #[test]
    fn output_projections_take_q6_k_when_their_rows_are_whole_blocks() {
        let q4 = FileType::Q4_0;
        let t = |name, dims: &[usize], tied, ft| choose_type(name, dims, tied, ft);
        assert_eq!(
            t("output.weight", &[300, 512], false, q4),
            Some(GgmlType::Q6K)
        );
        assert_eq!(
            t("output.weight", &[300, 576], false, q4),
            Some(GgmlType::Q8_0)
        );
        assert_eq!(
            t("token_embd.weight", &[300, 512], true, q4),
            Some(GgmlType::Q6K)
        );
        assert_eq!(
            t("token_embd.weight", &[300, 512], false, q4),
            Some(GgmlType::Q4_0)
        );
        assert_eq!(
            t("output.weight", &[300, 512], false, FileType::Q8_0),
            Some(GgmlType::Q8_0)
        );
        assert_eq!(
            t("blk.0.ffn_up.weight", &[512, 512], true, q4),
            Some(GgmlType::Q4_0)
        );
        assert_eq!(t("blk.0.attn_norm.weight", &[512], true, q4), None);
    }

    /// Each type's blocks read back through candle's dequantizer (an independent reader of
    /// the layout) within half a quantization step of the input.
    #[test]
    fn quantized_rows_dequantize_near_the_input() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        // The step of each type's grid and the largest error it allows: half a step where the
        // grid spans the block, a whole step for Q4_0 and Q5_0, whose grid has one level
        // fewer on the side opposite the largest magnitude.
        type Bound = fn(f32, f32) -> f32;
        let cases: [(GgmlType, Bound); 5] = [
            (GgmlType::Q8_0, |amax, _| amax / 127.0 * 0.5),
            (GgmlType::Q4_0, |amax, _| amax / 8.0),
            (GgmlType::Q4_1, |_, span| span / 15.0 * 0.5),
            (GgmlType::Q5_0, |amax, _| amax / 16.0),
            (GgmlType::Q5_1, |_, span| span / 31.0 * 0.5),
        ];
        for (ty, bound) in cases {
            let mut b = vec![0u8; 256 / 32 * ty.type_size()];
            quantize_row(ty, &x, &mut b);
            assert_eq!(b.len(), 256 / 32 * ty.type_size(), "{}", ty.name());
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                slm_model::weights::candle_type(ty),
                &b,
                vec![256],
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let y: Vec<f32> = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (blk, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let (lo, hi) = xs
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let amax = lo.abs().max(hi.abs());
                // Scales and minimums are stored in f16: a few thousandths of the block's range.
                let allowed = bound(amax, hi - lo) + 2e-3 * amax;
                for (a, b) in xs.iter().zip(ys) {
                    assert!(
                        (a - b).abs() <= allowed,
                        "{} block {blk}: {a} -> {b} (allowed {allowed})",
                        ty.name()
                    );
                }
            }
        }
    }
}
