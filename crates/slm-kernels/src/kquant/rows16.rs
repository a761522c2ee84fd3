//! K-quant matrices (Q2_K to Q6_K) with their rows interleaved sixteen at a time, for AVX-512
//! and AVX2 (whose kernels take a group in two halves of eight rows):
//! the same bytes as GGUF's blocks, moved so that one 64-byte load holds four weights of each
//! of sixteen rows, and a super-block's scales of the sixteen rows sit side by side.
//!
//! Why: against GGUF's row-major blocks, a dot product unpacks every row's scales, scales
//! every 32 products and sums lanes horizontally, row after row; decode is made of nothing
//! else. With the rows in the lanes of a register those steps are done once for sixteen rows
//! and the activations are what gets broadcast (`avx512::rows16_q2k`, `rows16_q3k`,
//! `rows16_q4k`, `rows16_q5k_*` and `rows16_q6k_*`, and `avx2_rows16`'s of the same names;
//! with AVX-512 they also outrun the activation groups of
//! `avx512::span` on these matrices up to a batch size, see `KMatrix::matmul_in`). The other
//! paths read rows rebuilt in GGUF's order (`KMatrix::gguf_row`).
//!
//! Q4_K and Q5_K, group g (rows 16g..16g+16), super-block b, at `(g * kb + b) * group_bytes`:
//! the sixteen `d` (f16), the sixteen `dmin`, then every 4-byte word w of the rest of the
//! block (from byte 4) as a vector of the sixteen rows' word w (`word`). So the packed
//! 6-bit scales are three vectors (vector u holds bytes 4u..4u+3 of each row's twelve); then
//! Q4_K's quants: vector v = 8j + p, for j < 4 and p < 8, holds bytes 4v..4v+3 of each row's
//! 128 (values 64j + 4p.. in the low nibbles, 64j + 32 + 4p.. in the high ones). Q5_K's high
//! bits and quants follow in eight steps (`q5k_step`), in the order its decode reads them: read
//! out of order, the bits streamed from memory slower than GGUF's layout did.
//!
//! Q2_K: the sixteen `d`, the sixteen `dmin`, then every word of the block's first 80 bytes as a
//! vector of the sixteen rows' words (`word`): the packed scales and mins, then the bits.
//! (Its kernel takes a scale's sixteen values in a row, so it reads the bits in their order.)
//!
//! Q3_K: the sixteen `d`, the packed scales as three vectors of words (`Q3K_SCALES`), then the
//! hmask and low bits in eight steps of three vectors (`q3k_step`), in the order its decode
//! reads them.
//!
//! Q6_K: the sixteen `d`, the scales (the sixteen rows' scale of group g of 16 values
//! together), then the bits in sixteen steps of three vectors (`q6k_step`), in the order its
//! decode reads them, so that it streams through memory.

use super::{KType, QK_K};

/// Rows interleaved together.
pub(crate) const ROWS: usize = 16;

/// Bytes of sixteen rows' super-block of `t`.
pub(crate) const fn group_bytes(t: KType) -> usize {
    ROWS * t.block_bytes()
}

/// The block's 4-byte words that this layout keeps as vectors of the sixteen rows' word:
/// (the byte where the first one is, how many). The rest of a block is its f16 scales (`d`,
/// `dmin`: sixteen of each at the start of the group's super-block) and Q6_K's 8-bit scales.
pub(crate) const fn words(t: KType) -> (usize, usize) {
    match t {
        KType::Q2K => (0, 20),
        KType::Q3K => (0, 27),
        KType::Q4K => (4, 35),
        KType::Q5K => (4, 43),
        KType::Q6K => (0, 48),
    }
}

/// Where word w (see `words`) of a block of `t` sits for row 0 in a group's super-block (row
/// r's is 4r further): Q2_K's and Q4_K's in order after the f16 scales; Q5_K's scales so, then
/// its bits by step (`q5k_step`); Q3_K's and Q6_K's bits by step (`q3k_step`, `q6k_step`).
pub(crate) const fn word(t: KType, w: usize) -> usize {
    const VECTOR: usize = 4 * ROWS;
    match (t, w) {
        (KType::Q2K | KType::Q4K, _) | (KType::Q5K, 0..3) => VECTOR * (1 + w),
        (KType::Q5K, 3..11) => q5k_step(w - 3),
        (KType::Q5K, _) => q5k_step((w - 11) % 8) + VECTOR * (1 + (w - 11) / 8),
        (KType::Q3K, 0..24) => q3k_step(w % 8) + VECTOR * (w / 8),
        (KType::Q3K, _) => Q3K_SCALES + VECTOR * (w - 24),
        (KType::Q6K, 0..32) => q6k_step(w / 16, w % 8) + VECTOR * (w % 16 / 8),
        (KType::Q6K, _) => q6k_step((w - 32) / 8, w % 8) + 2 * VECTOR,
    }
}

/// `word` of every word of `t`, as the indices of gathers of sixteen (up to 48 words, Q6_K's;
/// the unused ones 0).
pub(crate) const fn word_table(t: KType) -> [i32; 48] {
    let mut out = [0i32; 48];
    let mut w = 0;
    while w < words(t).1 {
        out[w] = word(t, w) as i32;
        w += 1;
    }
    out
}

/// Where step p (< 8) of a Q5_K group's super-block starts: five vectors of 4 bytes of each
/// row, in the order a decode step reads them: high bits 4p.. of each row's 32, then quants
/// 32j + 4p.. of its 128 for j < 4 (values 64j + 4p.. and 64j + 32 + 4p..).
pub(crate) const fn q5k_step(p: usize) -> usize {
    4 * ROWS * (4 + 5 * p)
}

/// Where Q3_K's parts start in a group's super-block: after the sixteen `d`, the packed scales
/// as three vectors of the sixteen rows' words (`Q3K_SCALES + 64 u`: bytes 4u..4u+3 of each
/// row's twelve), then the bits in eight steps (`q3k_step`).
pub(crate) const Q3K_SCALES: usize = 2 * ROWS;

/// Where step p (< 8) of a Q3_K group's super-block starts: three vectors of 4 bytes of each
/// row, in the order a decode step reads them: hmask bytes 4p.. of each row's 32, then its low
/// bits 4p.. and 32 + 4p.. of 64 (values 32s + 4p.. and 128 + 32s + 4p.., s < 4).
pub(crate) const fn q3k_step(p: usize) -> usize {
    Q3K_SCALES + 4 * ROWS * (3 + 3 * p)
}

/// Where Q6_K's parts start in a group's super-block: the scales (16 per row, by group of 16
/// values: the sixteen rows' scale g at `Q6K_SCALES + 16 g`), then the bits, by step
/// (`q6k_step`).
pub(crate) const Q6K_SCALES: usize = 2 * ROWS;
const Q6K_BITS: usize = Q6K_SCALES + 16 * ROWS;

/// Where step (j, p) of a Q6_K group's super-block starts (j < 2, p < 8): three vectors of 4
/// bytes of each row: low bits 64j + 4p.. and 64j + 32 + 4p.. of each row's 128, then high
/// bits 32j + 4p.. of its 64. The four values 128j + 32t + 4p.. (t < 4) come out of these
/// three. Lane p's two steps are side by side, in the order its decode reads them.
pub(crate) const fn q6k_step(j: usize, p: usize) -> usize {
    Q6K_BITS + (2 * p + j) * 3 * 4 * ROWS
}

/// Whether a matrix of n rows takes this layout on this CPU (every K-quant type has it).
pub(crate) fn applies(n: usize) -> bool {
    // Both kernel sets have kernels for it (`avx512::rows16_*`, `avx2_rows16`).
    n.is_multiple_of(ROWS) && crate::ggml_math::Isa::best().is_some()
}

/// Row r's block (r < 16) as runs of bytes, into `out`: (where in the block, where in its
/// group's super-block, how many). Every byte of the block is in one run.
fn runs(t: KType, r: usize, out: &mut Vec<(usize, usize, usize)>) {
    out.clear();
    let (first, n) = words(t);
    match t {
        KType::Q2K => out.extend([(80, 2 * r, 2), (82, 2 * ROWS + 2 * r, 2)]),
        KType::Q3K => out.push((108, 2 * r, 2)),
        KType::Q4K | KType::Q5K => out.extend([(0, 2 * r, 2), (2, 2 * ROWS + 2 * r, 2)]),
        KType::Q6K => {
            out.push((208, 2 * r, 2));
            out.extend((0..16).map(|g| (192 + g, Q6K_SCALES + ROWS * g + r, 1)));
        }
    }
    out.extend((0..n).map(|w| (first + 4 * w, word(t, w) + 4 * r, 4)));
}

/// GGUF's bytes of `t` (n rows of kb blocks, n a multiple of 16) in this layout.
pub(crate) fn interleave(t: KType, gguf: &[u8], n: usize, kb: usize) -> Vec<u8> {
    let (bb, gb) = (t.block_bytes(), group_bytes(t));
    assert!(n.is_multiple_of(ROWS) && gguf.len() == n * kb * bb);
    let mut out = vec![0u8; gguf.len()];
    let mut rs = Vec::new();
    for (j, row) in gguf.chunks_exact(kb * bb).enumerate() {
        let (g, r) = (j / ROWS, j % ROWS);
        runs(t, r, &mut rs);
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let grp = &mut out[(g * kb + b) * gb..][..gb];
            for &(from, to, len) in &rs {
                grp[to..to + len].copy_from_slice(&blk[from..from + len]);
            }
        }
    }
    out
}

/// Row j's GGUF bytes (kb blocks of `t`) from the interleaved matrix `x`, into `out`: Q2_K's,
/// Q3_K's and Q6_K's by gathers (`avx512::words_of`) where the CPU has AVX-512, the rest by
/// `copy_row`. Copied word by word,
/// those rows were slow enough to lose the activation groups of `avx512::span`, which rebuild
/// every weight row they take (the other types never take them, see `KMatrix::matmul_in`).
pub(crate) fn gguf_row(t: KType, x: &[u8], kb: usize, j: usize, out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if matches!(t, KType::Q2K | KType::Q3K | KType::Q6K)
        && crate::ggml_math::Isa::best() == Some(crate::ggml_math::Isa::Avx512)
    {
        const TABLES: [[i32; 48]; 3] = [
            word_table(KType::Q2K),
            word_table(KType::Q3K),
            word_table(KType::Q6K),
        ];
        let table = &TABLES[match t {
            KType::Q2K => 0,
            KType::Q3K => 1,
            _ => 2,
        }];
        let (first, n) = words(t);
        let (bb, gb) = (t.block_bytes(), group_bytes(t));
        let (g, r) = (j / ROWS, j % ROWS);
        out.resize(kb * bb, 0);
        for (b, blk) in out.chunks_exact_mut(bb).enumerate() {
            let grp = &x[(g * kb + b) * gb..][..gb];
            // SAFETY: the CPU has AVX-512 F; a whole group's super-block of t, r < 16.
            unsafe { super::avx512::words_of(grp, r, table, n, &mut blk[first..]) };
            match t {
                KType::Q2K => {
                    blk[80..82].copy_from_slice(&grp[2 * r..2 * r + 2]);
                    blk[82..84].copy_from_slice(&grp[2 * ROWS + 2 * r..2 * ROWS + 2 * r + 2]);
                }
                KType::Q3K => blk[108..110].copy_from_slice(&grp[2 * r..2 * r + 2]),
                _ => {
                    for q in 0..16 {
                        blk[192 + q] = grp[Q6K_SCALES + ROWS * q + r];
                    }
                    blk[208..210].copy_from_slice(&grp[2 * r..2 * r + 2]);
                }
            }
        }
        return;
    }
    copy_row(t, x, kb, j, out)
}

/// `gguf_row` by the runs of `runs`, on any CPU.
fn copy_row(t: KType, x: &[u8], kb: usize, j: usize, out: &mut Vec<u8>) {
    let (bb, gb) = (t.block_bytes(), group_bytes(t));
    let (g, r) = (j / ROWS, j % ROWS);
    let mut rs = Vec::new();
    runs(t, r, &mut rs);
    out.resize(kb * bb, 0);
    for (b, blk) in out.chunks_exact_mut(bb).enumerate() {
        let grp = &x[(g * kb + b) * gb..][..gb];
        for &(at, from, len) in &rs {
            blk[at..at + len].copy_from_slice(&grp[from..from + len]);
        }
    }
}

const _: () = assert!(QK_K == 256);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte of sixteen blocks has a place of its own, and rows come back as they were.
    #[test]
    fn layout_is_a_permutation_and_rows_round_trip() {
        for t in [KType::Q2K, KType::Q3K, KType::Q4K, KType::Q5K, KType::Q6K] {
            let (bb, gb) = (t.block_bytes(), group_bytes(t));
            let mut seen = vec![false; gb];
            let mut rs = Vec::new();
            for r in 0..ROWS {
                let mut covered = vec![false; bb];
                runs(t, r, &mut rs);
                for &(at, to, len) in &rs {
                    for i in 0..len {
                        assert!(
                            !covered[at + i] && !seen[to + i],
                            "{t:?} row {r} byte {}",
                            at + i
                        );
                        (covered[at + i], seen[to + i]) = (true, true);
                    }
                }
                assert!(
                    covered.iter().all(|&c| c),
                    "{t:?} row {r}: a byte has no place"
                );
            }
            assert!(seen.iter().all(|&c| c), "{t:?}");
            let (n, kb) = (32, 3);
            let gguf: Vec<u8> = (0..n * kb * bb).map(|i| (i * 7919 % 251) as u8).collect();
            let x = interleave(t, &gguf, n, kb);
            let mut row = Vec::new();
            for j in 0..n {
                let want = &gguf[j * kb * bb..(j + 1) * kb * bb];
                gguf_row(t, &x, kb, j, &mut row);
                assert_eq!(row, want, "{t:?} row {j}");
                copy_row(t, &x, kb, j, &mut row);
                assert_eq!(row, want, "{t:?} row {j}, copied by runs");
            }
        }
    }
}
