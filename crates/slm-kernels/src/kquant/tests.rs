use super::*;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use half::f16;
use rand::{Rng, SeedableRng};

const TYPES: [KType; 5] = [KType::Q2K, KType::Q3K, KType::Q4K, KType::Q5K, KType::Q6K];

/// Every kernel set this CPU runs, and the portable (scalar) path.
fn isas() -> Vec<Option<Isa>> {
    let mut v: Vec<Option<Isa>> = Isa::available().into_iter().map(Some).collect();
    v.push(None);
    v
}

fn q8k_rows(x: &[f32], k: usize) -> Vec<Q8K> {
    let kb = k / QK_K;
    let mut a = vec![
        Q8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; 16]
        };
        x.len() / k * kb
    ];
    for (xs, a) in x.chunks_exact(k).zip(a.chunks_exact_mut(kb)) {
        quantize_row_q8k(xs, a);
    }
    a
}

/// Random super-blocks of a type: any packed values and scales, block scales finite f16 of
/// moderate size (random bits would be NaN now and then, unequal to themselves).
fn random_blocks(t: KType, blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
    let bb = t.block_bytes();
    let mut w: Vec<u8> = (0..blocks * bb).map(|_| rng.random()).collect();
    for b in w.chunks_exact_mut(bb) {
        let d = f16::from_f32(rng.random_range(-0.02f32..0.02)).to_le_bytes();
        let dmin = f16::from_f32(rng.random_range(-0.02f32..0.02)).to_le_bytes();
        let (at_d, at_min) = t.scales_at();
        b[at_d..at_d + 2].copy_from_slice(&d);
        if let Some(at) = at_min {
            b[at..at + 2].copy_from_slice(&dmin);
        }
    }
    w
}

/// Every way of summing llama.cpp has for `t` (module docs), and its own choice per row
/// (None).
fn sums(t: KType) -> Vec<Option<Sum>> {
    let mut v = vec![None, Some(Sum::Lanes), Some(Sum::Tiled)];
    match t {
        KType::Q4K => v.extend([Some(Sum::Rows(64)), Some(Sum::Rows(256))]),
        KType::Q2K => v.extend([Some(Sum::Rows(128)), Some(Sum::Rows(256))]),
        _ => {}
    }
    v
}

/// Every kernel set, every way of llama.cpp's of summing, against the scalar reference, bit
/// for bit: one and many activation rows (past the four a kernel takes at once, one group of
/// eight and groups with a remainder, past a tile of either), weight rows off the groups of
/// four and eight, k of one and several super-blocks.
#[test]
fn kernels_equal_scalar_reference_on_odd_shapes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for &(n, k, m) in &[
        (1, 256, 1),
        (3, 512, 2),
        (8, 256, 5),
        (9, 768, 3),
        (17, 256, 17),
        (33, 1536, 7),
        (40, 512, 38),
        (16, 256, 8),
        (32, 512, 5),
        (48, 768, 1),
        (32, 256, 70),
        // Interleaved rows against a batch of many groups and a remainder (Q6_K's groups take
        // `avx512::span`, see `rows16_min_groups`; Q4_K's and Q5_K's never do).
        (16, 256, 130),
        (20, 512, 70),
        // Past a tile of groups (112 of them at k = 256: TILE_BYTES), two groups more.
        (3, 256, 1824),
    ] {
        let kb = k / QK_K;
        let x: Vec<f32> = (0..m * k)
            .map(|_| rng.random_range(-3f32..3.0) * rng.random_range(0f32..1.0).powi(3))
            .collect();
        let act = q8k_rows(&x, k);
        for t in TYPES {
            let w = random_blocks(t, n * kb, &mut rng);
            let km = KMatrix::new(t, &w, n, k);
            for sum in sums(t) {
                for isa in isas() {
                    let mut out = vec![f32::NAN; m * n];
                    let o = unsafe { crate::pool::as_uninit(&mut out) };
                    km.matmul_with(&x, m, o, isa, sum).unwrap();
                    let mut buf = Vec::new();
                    for j in 0..n {
                        for i in 0..m {
                            let s = sum.unwrap_or_else(|| Sum::of(t, n, m, i));
                            let want =
                                dot_row(t, s, km.gguf_row(j, &mut buf), &act[i * kb..(i + 1) * kb]);
                            assert_eq!(
                                out[i * n + j].to_bits(),
                                want.to_bits(),
                                "{t:?} {sum:?} {isa:?} n={n} k={k} m={m} cell ({i}, {j}): {} vs {want}",
                                out[i * n + j]
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The reference is the dot product: against the dequantized weights (candle's, as ggml's
/// dequantize_row) times the Q8_K activations in f64, off only by f32 rounding. So the
/// kernels' agreement above is not two copies of one mistake.
#[test]
fn reference_equals_dequantized_product() {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (n, k, m) = (16, 768, 3);
    let kb = k / QK_K;
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1f32..1.0)).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3f32..3.0)).collect();
    let act = q8k_rows(&x, k);
    let wt = Tensor::from_vec(w, (n, k), &dev).unwrap();
    for t in TYPES {
        let q = QTensor::quantize(&wt, t.to_ggml()).unwrap();
        let km = KMatrix::new(t, &q.data().unwrap(), n, k);
        let mut row = vec![0f32; k];
        for sum in sums(t).into_iter().flatten() {
            let mut buf = Vec::new();
            for j in 0..n {
                km.dequantize_row(j, &mut row);
                for i in 0..m {
                    let a = &act[i * kb..(i + 1) * kb];
                    let exact: f64 = (0..k)
                        .map(|c| {
                            row[c] as f64 * (a[c / QK_K].qs[c % QK_K] as f64 * a[c / QK_K].d as f64)
                        })
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|c| {
                            (row[c] as f64 * a[c / QK_K].qs[c % QK_K] as f64 * a[c / QK_K].d as f64)
                                .abs()
                        })
                        .sum();
                    let got = dot_row(t, sum, km.gguf_row(j, &mut buf), a) as f64;
                    // Q2_K/Q4_K/Q5_K take the min term apart from the rest, two sums of
                    // about the row's magnitude each: a few f32 ulps of `scale`.
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + scale),
                        "{t:?} {sum:?} row {j} act {i}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}

/// ggml's Q8_K: the scale from the first value of largest magnitude (-127/max), rounding half
/// to even, sums of 16.
#[test]
fn q8k_is_ggmls() {
    let mut x = vec![0f32; QK_K];
    x[3] = -2.0; // the largest magnitude, first: scale -127/-2
    x[4] = 2.0;
    x[5] = 0.5 * 2.0 / 127.0 * 5.0; // 2.5 steps: to 2
    x[6] = 1.5 * 2.0 / 127.0; // 1.5 steps: to 2
    let mut a = [Q8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; 16],
    }];
    quantize_row_q8k(&x, &mut a);
    assert_eq!(a[0].d, 1.0 / (127.0 / 2.0));
    assert_eq!(&a[0].qs[3..7], &[-127, 127, 2, 2]);
    assert_eq!(a[0].bsums[0], 4);
    let zero = vec![0f32; QK_K];
    quantize_row_q8k(&zero, &mut a);
    assert_eq!((a[0].d, a[0].qs, a[0].bsums), (0.0, [0; QK_K], [0; 16]));
}

/// The AVX2 quantizer (its own search for the largest magnitude) equals the portable one:
/// random rows, rows whose largest magnitude comes twice with either sign first, a NaN, a
/// zero row.
#[test]
fn q8k_kernels_equal_the_portable_quantizer() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut rows: Vec<Vec<f32>> = (0..64)
        .map(|_| (0..QK_K).map(|_| rng.random_range(-3f32..3.0)).collect())
        .collect();
    for (i, j, s) in [(7, 200, 1.0), (200, 7, -1.0), (0, 255, -1.0), (255, 0, 1.0)] {
        let mut r: Vec<f32> = (0..QK_K).map(|_| rng.random_range(-1f32..1.0)).collect();
        r[i] = 4.0 * s;
        r[j] = -4.0 * s;
        rows.push(r);
    }
    let mut nan: Vec<f32> = (0..QK_K).map(|_| rng.random_range(-1f32..1.0)).collect();
    nan[9] = f32::NAN;
    rows.push(nan);
    rows.push(vec![0.0; QK_K]);
    let x: Vec<f32> = rows.concat();
    let blank = Q8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; 16],
    };
    let mut want = vec![blank; rows.len()];
    quantize_row_q8k_portable(&x, &mut want);
    if crate::ggml_math::has_avx2() {
        let mut got = vec![blank; rows.len()];
        // SAFETY: the CPU has AVX2.
        unsafe { avx2::quantize_row_q8k(&x, &mut got) };
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                (g.d.to_bits(), g.qs, g.bsums),
                (w.d.to_bits(), w.qs, w.bsums),
                "block {b}"
            );
        }
    }
}

/// A tied embedding's lookup: the rows as candle dequantizes the whole matrix.
#[test]
fn dequantize_row_equals_candles() {
    let dev = Device::Cpu;
    let (n, k) = (5, 512);
    let w: Vec<f32> = (0..n * k)
        .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let wt = Tensor::from_vec(w, (n, k), &dev).unwrap();
    for t in TYPES {
        let q = QTensor::quantize(&wt, t.to_ggml()).unwrap();
        let want: Vec<f32> = q
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let km = KMatrix::new(t, &q.data().unwrap(), n, k);
        let mut got = vec![f32::NAN; n * k];
        for (j, row) in got.chunks_exact_mut(k).enumerate() {
            km.dequantize_row(j, row);
        }
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{t:?}"
        );
    }
}

/// llama.cpp's way of summing is that of the build `ggml_math::flavor` reproduces, on any CPU
/// (an AVX2-only machine gives an AVX-512 build's outputs by default): Q4_K repacked in both
/// builds, Q2_K only with AVX-512; the repacked kernels' last m % 4 rows by the whole block;
/// the others' dot products below 8 rows and tiles from 8.
#[test]
fn sums_are_the_reproduced_builds_whatever_the_cpu() {
    use crate::ggml_math::{flavor, Flavor};
    let q2k = match flavor() {
        Flavor::Avx512 => [Sum::Rows(128), Sum::Rows(QK_K), Sum::Rows(QK_K)],
        Flavor::Avx2 => [Sum::Tiled, Sum::Tiled, Sum::Lanes],
    };
    assert_eq!(
        [Sum::of(KType::Q2K, 16, 9, 0), Sum::of(KType::Q2K, 16, 9, 8)],
        [q2k[0], q2k[1]]
    );
    assert_eq!(Sum::of(KType::Q2K, 16, 3, 0), q2k[2]);
    assert_eq!(Sum::of(KType::Q4K, 16, 9, 0), Sum::Rows(64));
    assert_eq!(Sum::of(KType::Q4K, 16, 9, 8), Sum::Rows(QK_K));
    // Rows not a multiple of 8 are not repacked.
    assert_eq!(Sum::of(KType::Q4K, 12, 9, 0), Sum::Tiled);
    for t in [KType::Q3K, KType::Q5K, KType::Q6K] {
        assert_eq!(Sum::of(t, 16, 8, 0), Sum::Tiled);
        assert_eq!(Sum::of(t, 16, 7, 0), Sum::Lanes);
    }
}
