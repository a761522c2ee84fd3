//! ggml's row quantizers (ggml-quants.c), ported with their float operations in the same
//! order and unfused, as llama-quantize's build compiles them (`-std=c11` turns GCC's
//! contraction off): the reference quantizers (`quantize_row_*_ref`) for a row without an
//! importance matrix, and the importance-weighted ones (`quantize_row_*_impl`) for a row with
//! one. Written by hand because no crate quantizes into these layouts: byte identity with
//! llama-quantize is the point, and the tests hold it.

use slm_model::gguf::GgmlType;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below it is all zero.
const EPS: f32 = 1e-15;
const QK_K: usize = 256;

/// One row of f32 values in `ty`'s blocks, written to `out` (the row's bytes). With
/// `imatrix` (one importance per column, the row's length) the types that use one weigh their
/// scale searches by it, as `ggml_quantize_chunk` does; Q8_0 ignores it.
pub fn quantize_row(ty: GgmlType, x: &[f32], imatrix: Option<&[f32]>, out: &mut [u8]) {
    match (ty, imatrix) {
        (GgmlType::Q8_0, _) => q8_0(x, out),
        (GgmlType::Q4_0, None) => q4_0_ref(x, out, false),
        (GgmlType::Q5_0, None) => q4_0_ref(x, out, true),
        (GgmlType::Q4_1, None) => q4_1_ref(x, out, false),
        (GgmlType::Q5_1, None) => q4_1_ref(x, out, true),
        (GgmlType::Q4_0, Some(w)) => q4_0_weighted(x, w, out, false),
        (GgmlType::Q5_0, Some(w)) => q4_0_weighted(x, w, out, true),
        (GgmlType::Q4_1, Some(w)) => q4_1_weighted(x, w, out, false),
        (GgmlType::Q5_1, Some(w)) => q4_1_weighted(x, w, out, true),
        (GgmlType::Q2K, None) => q2k_ref(x, out),
        (GgmlType::Q2K, Some(w)) => q2k_weighted(x, w, out),
        (GgmlType::Q3K, _) => q3k(x, imatrix, out),
        (GgmlType::Q4K, _) => q45k(x, imatrix, out, false),
        (GgmlType::Q5K, _) => q45k(x, imatrix, out, true),
        (GgmlType::Q6K, _) => q6k(x, imatrix, out),
        (other, _) => unreachable!("no quantizer for {}", other.name()),
    }
}

/// Whether `quantize_row` writes `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

fn f16(x: f32) -> half::f16 {
    half::f16::from_f32(x)
}

/// The value of largest magnitude in `x` and that magnitude, the first on ties (as ggml's
/// quantizers scan).
fn largest_magnitude(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// ggml's `nearest_int`: round half to even through the float's mantissa (|x| < 2^22).
fn nearest_int(x: f32) -> i32 {
    ((x + 12582912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn q8_0(x: &[f32], out: &mut [u8]) {
    for (b, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&f16(d).to_le_bytes());
        for (q, v) in o[2..].iter_mut().zip(b) {
            *q = (v * id).round() as i8 as u8;
        }
    }
}

/// Q4_0 (`five`: Q5_0): the scale from the value of largest magnitude, the first on ties.
fn q4_0_ref(x: &[f32], out: &mut [u8], five: bool) {
    let (div, off, top, size) = if five {
        (-16.0, 16.5, 31u8, 22)
    } else {
        (-8.0, 8.5, 15u8, 18)
    };
    for (b, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(size)) {
        let (max, _) = largest_magnitude(b);
        let d = max / div;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&f16(d).to_le_bytes());
        let mut qs = [0u8; 32];
        for (q, &v) in qs.iter_mut().zip(b) {
            *q = top.min((v * id + off) as i8 as u8);
        }
        put_quants(&qs, five, &mut o[2..]);
    }
}

/// Q4_1 (`five`: Q5_1): scale and minimum from the block's range.
fn q4_1_ref(x: &[f32], out: &mut [u8], five: bool) {
    let size = if five { 24 } else { 20 };
    for (b, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(size)) {
        let min = b.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
        let max = b.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
        let d = (max - min) / if five { 31.0 } else { 15.0 };
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&f16(d).to_le_bytes());
        o[2..4].copy_from_slice(&f16(min).to_le_bytes());
        let mut qs = [0u8; 32];
        for (q, &v) in qs.iter_mut().zip(b) {
            *q = if five {
                ((v - min) * id + 0.5) as u8
            } else {
                15u8.min(((v - min) * id + 0.5) as i8 as u8)
            };
        }
        put_quants(&qs, five, &mut o[4..]);
    }
}

/// The per-value weights of the importance-weighted quantizers,
/// `imatrix * sqrt(sigma2 + x^2)` (sigma2 the row's or block's mean square), into `w`;
/// returns their sum in order (the K-quants weigh each sub-block's scale by it).
fn row_weights(x: &[f32], sigma2: f32, qw: &[f32], w: &mut [f32]) -> f32 {
    let mut sum = 0f32;
    for ((w, &q), &v) in w.iter_mut().zip(qw).zip(x) {
        *w = q * (sigma2 + v * v).sqrt();
        sum += *w;
    }
    sum
}

fn mean_square(x: &[f32]) -> f32 {
    let mut s = 0f32;
    for v in x {
        s += v * v;
    }
    s / x.len() as f32
}

/// Q4_0 / Q5_0 with an importance matrix (`quantize_row_q4_0_impl`, `_q5_0_impl`).
fn q4_0_weighted(x: &[f32], qw: &[f32], out: &mut [u8], five: bool) {
    let (nmax, size) = if five { (16, 22) } else { (8, 18) };
    let sigma2 = mean_square(x);
    let blocks = x.chunks_exact(32).zip(qw.chunks_exact(32));
    for ((xb, q), o) in blocks.zip(out.chunks_exact_mut(size)) {
        let mut w = [0f32; 32];
        row_weights(xb, sigma2, q, &mut w);
        let mut l = [0i8; 32];
        let d = make_qx_quants(nmax, xb, &mut l, Some(&w));
        o[..2].copy_from_slice(&f16(d).to_le_bytes());
        put_quants(&l.map(|v| v as u8), five, &mut o[2..]);
    }
}

/// Q4_1 / Q5_1 with an importance matrix (`quantize_row_q4_1_impl`, `_q5_1_impl`).
fn q4_1_weighted(x: &[f32], qw: &[f32], out: &mut [u8], five: bool) {
    let (nmax, size) = if five { (31, 24) } else { (15, 20) };
    let sigma2 = mean_square(x);
    let blocks = x.chunks_exact(32).zip(qw.chunks_exact(32));
    for ((xb, q), o) in blocks.zip(out.chunks_exact_mut(size)) {
        let mut w = [0f32; 32];
        row_weights(xb, sigma2, q, &mut w);
        let mut l = [0u8; 32];
        let (d, min) = make_qkx_quants(nmax, xb, &w, &mut l, SEARCH_WEIGHTED);
        o[..2].copy_from_slice(&f16(d).to_le_bytes());
        o[2..4].copy_from_slice(&f16(-min).to_le_bytes());
        put_quants(&l, five, &mut o[4..]);
    }
}

/// A 32-block's quants into `o`: for 5-bit types the 32 high bits first (value j's in bit j),
/// then the low nibbles, value j in the low half of byte j and value j + 16 in the high half.
fn put_quants(qs: &[u8; 32], five: bool, o: &mut [u8]) {
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

/// ggml's `make_qx_quants` with `rmse_type` 1: the scale of `x`'s values on levels
/// -nmax..nmax-1 (written to `l` offset by nmax), searched over 19 candidate scales for the
/// least weighted squared error; the weights are `qw`, or x^2 without.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8], qw: Option<&[f32]>) -> f32 {
    match qw {
        Some(w) => qx_search(nmax, x, l, &w[..x.len()]),
        None => {
            let mut w = [0f32; 32];
            for (w, &v) in w.iter_mut().zip(x) {
                *w = v * v;
            }
            qx_search(nmax, x, l, &w[..x.len()])
        }
    }
}

/// `make_qx_quants`' search under weights `w` (one per value of `x`).
fn qx_search(nmax: i32, x: &[f32], l: &mut [i8], w: &[f32]) -> f32 {
    let l = &mut l[..x.len()];
    let (max, amax) = largest_magnitude(x);
    if amax < EPS {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let fill = |iscale: f32, l: &mut [i8]| {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (nmax + level(iscale, v)) as i8;
        }
    };
    // The first scale and the 18 candidates ggml tries after it. Each candidate's sums
    // depend only on its own scale, so all 19 are accumulated side by side (each in ggml's
    // order over the values, the same floats) and only the choice among them runs in
    // ggml's order: one pass instead of 19 chains of dependent additions.
    let mut iscales = [0f32; 19];
    iscales[0] = -(nmax as f32) / max;
    for (c, is) in (-9..=9).filter(|&is| is != 0).enumerate() {
        iscales[c + 1] = -(nmax as f32 + 0.1 * is as f32) / max;
    }
    let (mut sumlx, mut suml2) = ([0f32; 19], [0f32; 19]);
    for (&v, &w) in x.iter().zip(w) {
        for c in 0..19 {
            let q = level(iscales[c], v) as f32;
            sumlx[c] += w * v * q;
            suml2[c] += w * q * q;
        }
    }
    let mut chosen = 0;
    let mut scale = if suml2[0] != 0.0 {
        sumlx[0] / suml2[0]
    } else {
        0.0
    };
    let mut best = scale * sumlx[0];
    for c in 1..19 {
        if suml2[c] > 0.0 && sumlx[c] * sumlx[c] > best * suml2[c] {
            chosen = c;
            scale = sumlx[c] / suml2[c];
            best = scale * sumlx[c];
        }
    }
    fill(iscales[chosen], l);
    scale
}

/// ggml's `make_q3_quants` with `do_rmse`: levels -nmax..nmax-1 (written offset by nmax)
/// refined one value at a time, up to five passes, weights x^2.
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = largest_magnitude(x);
    if amax < EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (o, &v) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *o = q as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (o, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let li = *o as f32;
            let mut slx = sumlx - w * v * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new != i32::from(*o) {
                    slx += w * v * new as f32;
                    sl2 += w * new as f32 * new as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *o = new as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for o in l.iter_mut() {
        *o += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// The search grid of `make_qkx_quants`: candidate inverse scales (rmin + rdelta*is + nmax) /
/// range for is in 0..=nstep, judged by weighted absolute (`mad`) or squared error.
#[derive(Clone, Copy)]
struct Search {
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    mad: bool,
}

/// Every type's search with an importance matrix (`make_qkx3_quants`' callers).
const SEARCH_WEIGHTED: Search = Search {
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
    mad: false,
};

/// ggml's `make_qkx2_quants` (and `make_qkx3_quants`, the same computation once its weights
/// are given): the scale and minimum of `x`'s values on levels 0..=nmax under `weights`
/// (levels written to `l`); returns (scale, -min).
fn make_qkx_quants(nmax: i32, x: &[f32], weights: &[f32], l: &mut [u8], s: Search) -> (f32, f32) {
    // Equal lengths up front, so the loops below run without bounds checks.
    let n = x.len();
    let (weights, l) = (&weights[..n], &mut l[..n]);
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if s.mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for ((o, &v), &w) in l.iter_mut().zip(x).zip(weights) {
        let q = nearest_int(iscale * (v - min)).clamp(0, nmax);
        *o = q as u8;
        let diff = scale * q as f32 + min - v;
        best_error += w * err(diff);
    }
    if s.nstep < 1 {
        return (scale, -min);
    }
    let mut aux = [0u8; 32];
    let aux = &mut aux[..n];
    for is in 0..=s.nstep {
        iscale = (s.rmin + s.rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((a, &v), &w) in aux.iter_mut().zip(x).zip(weights) {
            let q = nearest_int(iscale * (v - min)).clamp(0, nmax);
            *a = q as u8;
            let q = q as f32;
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * v;
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
            for ((&a, &v), &w) in aux.iter().zip(x).zip(weights) {
                let diff = this_scale * a as f32 + this_min - v;
                cur_error += w * err(diff);
            }
            if cur_error < best_error {
                l.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qp_quants`: non-negative `x` (scales or minimums of a super-block) on levels
/// 0..=nmax under `qw`, the scale searched over nine candidates then refined one value at a
/// time. The levels are bytes as in C, where a negative level wraps.
fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], qw: &[f32]) -> f32 {
    let mut max = 0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < EPS {
        l.fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for (o, &v) in l.iter_mut().zip(x) {
        *o = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for i in 0..x.len() {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for i in 0..x.len() {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..x.len() {
        let q = nearest_int(iscale * x[i]).min(nmax);
        l[i] = q as u8;
        let w = qw[i];
        sumlx += w * x[i] * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..x.len() {
            let w = qw[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new != i32::from(l[i]) {
                    slx += w * x[i] * new as f32;
                    sl2 += w * new as f32 * new as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Four 2-bit levels per byte, 128 values at a time: byte l of each 32 holds values l,
/// l + 32, l + 64 and l + 96 (Q2_K's and Q3_K's low bits).
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for (k, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            qs[32 * k + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

/// Q2_K (`quantize_row_q2_K_ref`): per 16 values a scale and a minimum by absolute error,
/// both as 4 bits against the super-block's f16 `d` and `dmin`; block: scales[16], qs[64],
/// d, dmin.
fn q2k_ref(x: &[f32], out: &mut [u8]) {
    const Q2: Search = Search {
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        mad: true,
    };
    for (b, o) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(84)) {
        let mut l = [0u8; QK_K];
        let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..16 {
            let xs = &b[16 * j..16 * j + 16];
            let w: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
            let (s, m) = make_qkx_quants(3, xs, &w, &mut l[16 * j..16 * j + 16], Q2);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let mut sc = [0u8; 16];
        let d = if max_scale > 0.0 {
            let iscale = 15.0 / max_scale;
            for j in 0..16 {
                sc[j] = nearest_int(iscale * scales[j]) as u8;
            }
            f16(max_scale / 15.0)
        } else {
            f16(0.0)
        };
        let dmin = if max_min > 0.0 {
            let iscale = 15.0 / max_min;
            for j in 0..16 {
                sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
            }
            f16(max_min / 15.0)
        } else {
            f16(0.0)
        };
        q2k_finish(b, &mut l, sc, d, dmin, o);
    }
}

/// Q2_K with an importance matrix (`quantize_row_q2_K_impl`).
fn q2k_weighted(x: &[f32], qw: &[f32], out: &mut [u8]) {
    let blocks = x.chunks_exact(QK_K).zip(qw.chunks_exact(QK_K));
    for ((b, q), o) in blocks.zip(out.chunks_exact_mut(84)) {
        let mut l = [0u8; QK_K];
        let (mut scales, mut mins, mut sw) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        let sigma2 = mean_square(b);
        for j in 0..16 {
            let xs = &b[16 * j..16 * j + 16];
            let mut w = [0f32; 16];
            sw[j] = row_weights(xs, sigma2, &q[16 * j..16 * j + 16], &mut w);
            let (s, m) = make_qkx_quants(3, xs, &w, &mut l[16 * j..16 * j + 16], SEARCH_WEIGHTED);
            scales[j] = s;
            mins[j] = m;
        }
        let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
        let dm = make_qp_quants(15, &scales, &mut ls, &sw);
        let mm = make_qp_quants(15, &mins, &mut lm, &sw);
        let sc: [u8; 16] = std::array::from_fn(|j| ls[j] | (lm[j] << 4));
        q2k_finish(b, &mut l, sc, f16(dm), f16(mm), o);
    }
}

/// Q2_K's last steps: the values requantized against the stored scales, then the block.
fn q2k_finish(
    b: &[f32],
    l: &mut [u8; QK_K],
    sc: [u8; 16],
    d: half::f16,
    dmin: half::f16,
    o: &mut [u8],
) {
    for j in 0..16 {
        let dj = d.to_f32() * (sc[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * (sc[j] >> 4) as f32;
        for ii in 0..16 {
            l[16 * j + ii] = nearest_int((b[16 * j + ii] + dm) / dj).clamp(0, 3) as u8;
        }
    }
    o[..16].copy_from_slice(&sc);
    pack_2bit(l, &mut o[16..80]);
    o[80..82].copy_from_slice(&d.to_le_bytes());
    o[82..84].copy_from_slice(&dmin.to_le_bytes());
}

/// Q3_K: per 16 values a signed scale (6 bits against the super-block's f16 `d`), 3-bit
/// quants as 2 low bits plus a high-bit mask; block: hmask[32], qs[64], scales[12], d.
/// Without an importance matrix `quantize_row_q3_K_ref`, with one `quantize_row_q3_K_impl`.
fn q3k(x: &[f32], qw: Option<&[f32]>, out: &mut [u8]) {
    for (i, (b, o)) in x
        .chunks_exact(QK_K)
        .zip(out.chunks_exact_mut(110))
        .enumerate()
    {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; 16];
        let mut sc = [0u8; 12];
        // The 16 six-bit scales: low nibbles in bytes 0..8, the high pairs in bytes 8..12.
        let mut put = |j: usize, v: u8| {
            if j < 8 {
                sc[j] = v & 0xF;
            } else {
                sc[j - 8] |= (v & 0xF) << 4;
            }
            sc[j % 4 + 8] |= (v >> 4) << (2 * (j / 4));
        };
        let d = match qw {
            None => {
                for j in 0..16 {
                    scales[j] =
                        make_q3_quants(4, &b[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
                }
                let (max_scale, _) = largest_magnitude(&scales);
                if max_scale != 0.0 {
                    let iscale = -32.0 / max_scale;
                    for (j, &s) in scales.iter().enumerate() {
                        let v = (nearest_int(iscale * s) as i8).clamp(-32, 31) + 32;
                        put(j, v as u8);
                    }
                    f16(1.0 / iscale)
                } else {
                    f16(0.0)
                }
            }
            Some(qw) => {
                let qw = &qw[QK_K * i..QK_K * (i + 1)];
                let sigma2 = 2.0 * mean_square(b);
                let mut sw = [0f32; 16];
                for j in 0..16 {
                    let xs = &b[16 * j..16 * j + 16];
                    let mut w = [0f32; 16];
                    sw[j] = row_weights(xs, sigma2, &qw[16 * j..16 * j + 16], &mut w);
                    scales[j] = make_qx_quants(4, xs, &mut l[16 * j..16 * j + 16], Some(&w));
                }
                let mut ls = [0i8; 16];
                let d = make_qx_quants(32, &scales, &mut ls, Some(&sw));
                for (j, &v) in ls.iter().enumerate() {
                    put(j, v as u8);
                }
                f16(d)
            }
        };
        for j in 0..16 {
            let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
            let s = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 - 32;
            let dj = d.to_f32() * s as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(b[16 * j + ii] / dj).clamp(-4, 3);
                l[16 * j + ii] = (q + 4) as i8;
            }
        }
        let mut lu = [0u8; QK_K];
        let (hmask, rest) = o.split_at_mut(32);
        hmask.fill(0);
        for (j, (u, &v)) in lu.iter_mut().zip(&l).enumerate() {
            let v = v as u8;
            if v > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                *u = v - 4;
            } else {
                *u = v;
            }
        }
        pack_2bit(&lu, &mut rest[..64]);
        rest[64..76].copy_from_slice(&sc);
        rest[76..78].copy_from_slice(&d.to_le_bytes());
    }
}

/// Q4_K (`five`: Q5_K): per 32 values a scale and a minimum, both 6 bits against the
/// super-block's f16 `d` and `dmin`; block: d, dmin, scales[12], (Q5_K: qh[32],) qs[128].
/// Without an importance matrix `quantize_row_q4_K_ref` / `_q5_K_ref`, with one `_impl`.
fn q45k(x: &[f32], qw: Option<&[f32]>, out: &mut [u8], five: bool) {
    let (nmax, size) = if five { (31, 176) } else { (15, 144) };
    let reference = Search {
        rmin: if five { -0.5 } else { -1.0 },
        rdelta: 0.1,
        nstep: if five { 15 } else { 20 },
        mad: false,
    };
    for (i, (b, o)) in x
        .chunks_exact(QK_K)
        .zip(out.chunks_exact_mut(size))
        .enumerate()
    {
        let mut l = [0u8; QK_K];
        let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
        let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
        let (d, dmin) = match qw {
            None => {
                let (mut max_scale, mut max_min) = (0f32, 0f32);
                for j in 0..8 {
                    let xs = &b[32 * j..32 * j + 32];
                    let av_x = (mean_square(xs)).sqrt();
                    let w: [f32; 32] = std::array::from_fn(|k| av_x + xs[k].abs());
                    let (s, m) =
                        make_qkx_quants(nmax, xs, &w, &mut l[32 * j..32 * j + 32], reference);
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
                for j in 0..8 {
                    ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
                    lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
                }
                (f16(max_scale / 63.0), f16(max_min / 63.0))
            }
            Some(qw) => {
                let qw = &qw[QK_K * i..QK_K * (i + 1)];
                let sigma2 = 2.0 * mean_square(b);
                let mut sw = [0f32; 8];
                for j in 0..8 {
                    let xs = &b[32 * j..32 * j + 32];
                    let mut w = [0f32; 32];
                    sw[j] = row_weights(xs, sigma2, &qw[32 * j..32 * j + 32], &mut w);
                    let (s, m) =
                        make_qkx_quants(nmax, xs, &w, &mut l[32 * j..32 * j + 32], SEARCH_WEIGHTED);
                    scales[j] = s;
                    mins[j] = m;
                }
                let d = make_qp_quants(63, &scales, &mut ls, &sw);
                let m = make_qp_quants(63, &mins, &mut lm, &sw);
                if five {
                    ls = ls.map(|v| v.min(63));
                    lm = lm.map(|v| v.min(63));
                }
                (f16(d), f16(m))
            }
        };
        let mut sc = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                sc[j] = ls[j];
                sc[j + 4] = lm[j];
            } else {
                sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
                sc[j - 4] |= (ls[j] >> 4) << 6;
                sc[j] |= (lm[j] >> 4) << 6;
            }
        }
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
                l[32 * j + ii] = nearest_int((b[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
            }
        }
        let q = if five {
            let (qh, q) = o[16..].split_at_mut(32);
            qh.fill(0);
            for (k, n) in (0..QK_K).step_by(64).enumerate() {
                for j in 0..32 {
                    let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
                    if l1 > 15 {
                        l1 -= 16;
                        qh[j] |= 1 << (2 * k);
                    }
                    if l2 > 15 {
                        l2 -= 16;
                        qh[j] |= 2 << (2 * k);
                    }
                    l[n + j] = l1;
                    l[n + j + 32] = l2;
                }
            }
            q
        } else {
            &mut o[16..144]
        };
        for (k, j) in (0..QK_K).step_by(64).enumerate() {
            for i in 0..32 {
                q[32 * k + i] = l[j + i] | (l[j + i + 32] << 4);
            }
        }
    }
}

/// Q6_K: per 16 values a scale from `make_qx_quants` (weighted by the importance matrix when
/// there is one, `quantize_row_q6_K_impl`; else `_ref`), the scales quantized to 8 bits
/// against the super-block's f16 scale, then 6-bit quants; block: ql[128], qh[64],
/// scales[16], d.
fn q6k(x: &[f32], qw: Option<&[f32]>, out: &mut [u8]) {
    for (i, (b, o)) in x
        .chunks_exact(QK_K)
        .zip(out.chunks_exact_mut(210))
        .enumerate()
    {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; 16];
        for ib in 0..16 {
            let w = qw.map(|q| &q[QK_K * i + 16 * ib..QK_K * i + 16 * ib + 16]);
            scales[ib] = make_qx_quants(
                32,
                &b[16 * ib..16 * ib + 16],
                &mut l[16 * ib..16 * ib + 16],
                w,
            );
        }
        let (max_scale, max_abs) = largest_magnitude(&scales);
        o.fill(0);
        if max_abs < EPS {
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16(1.0 / iscale);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `x` quantized to `ty` and read back through candle's dequantizer (an independent reader
    /// of the layout).
    fn round_trip(ty: GgmlType, x: &[f32], qw: Option<&[f32]>) -> Vec<f32> {
        let mut b = vec![0u8; x.len() / ty.block_size() * ty.type_size()];
        quantize_row(ty, x, qw, &mut b);
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            slm_model::weights::candle_type(ty),
            &b,
            vec![x.len()],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        q.dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap()
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
            let y = round_trip(ty, &x, None);
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

    /// The K-quants, and every type with importance weights, read back through candle's
    /// dequantizer near the input. Their scales are searched rather than taken from the range
    /// and (K-quants) quantized again against a super-block scale, so the bound is not half a
    /// step: it is the error measured on this input (printed) with a quarter more, per type,
    /// relative to the block's largest magnitude. The byte-identity tests against
    /// llama-quantize are the real check; this one catches a layout broken on the way.
    #[test]
    fn k_quants_and_weighted_rows_dequantize_near_the_input() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let imatrix: Vec<f32> = (0..512).map(|i| 0.5 + (i % 7) as f32).collect();
        let cases: [(GgmlType, bool, f32); 15] = [
            (GgmlType::Q2K, false, 0.39),
            (GgmlType::Q3K, false, 0.24),
            (GgmlType::Q4K, false, 0.08),
            (GgmlType::Q5K, false, 0.042),
            (GgmlType::Q6K, false, 0.02),
            (GgmlType::Q4_0, true, 0.096),
            (GgmlType::Q4_1, true, 0.102),
            (GgmlType::Q5_0, true, 0.047),
            (GgmlType::Q5_1, true, 0.041),
            (GgmlType::Q8_0, true, 0.005),
            (GgmlType::Q2K, true, 0.48),
            (GgmlType::Q3K, true, 0.26),
            (GgmlType::Q4K, true, 0.116),
            (GgmlType::Q5K, true, 0.041),
            (GgmlType::Q6K, true, 0.032),
        ];
        for (ty, weighted, bound) in cases {
            let qw = weighted.then_some(imatrix.as_slice());
            let y = round_trip(ty, &x, qw);
            let mut worst = 0f32;
            for (xs, ys) in x.chunks(32).zip(y.chunks(32)) {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in xs.iter().zip(ys) {
                    worst = worst.max((a - b).abs() / amax);
                }
            }
            println!("{} weighted {weighted}: {worst:.4}", ty.name());
            assert!(
                worst <= bound,
                "{} weighted {weighted}: {worst} > {bound}",
                ty.name()
            );
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [0.5f32, 1.5, 2.5, -0.5, -1.5, 2.4999, 3.7].map(nearest_int),
            [0, 2, 2, 0, -2, 2, 4]
        );
    }
}
