//! Q4_K matrices with their rows interleaved sixteen at a time, for AVX-512: the same bytes
//! as GGUF's blocks, moved so that one 64-byte load holds four weights of each of sixteen rows,
//! and the sixteen rows' scales of a super-block sit in three 64-byte planes.
//!
//! Why: against GGUF's row-major blocks, a dot product unpacks every row's scales, scales
//! every 32 products and sums lanes horizontally, row after row; decode is made of nothing
//! else. With the rows in the lanes of a register those steps are done once for sixteen rows
//! and the activations are what gets broadcast (`avx512::rows16_q4k`, for every batch: it
//! also outruns the activation groups of `avx512::span` on these matrices). Q4_K is the type
//! llama.cpp repacks, so its rows are all summed as `Sum::Rows`, which needs no lane
//! structure within a row. The other paths read rows rebuilt in GGUF's order
//! (`KMatrix::gguf_row`).
//!
//! Layout of group g (rows 16g..16g+16), super-block b, at `(g * kb + b) * GROUP_BYTES`:
//! the sixteen `d` (f16), the sixteen `dmin`, then the packed 6-bit scales as three planes of
//! sixteen words (plane w holds bytes 4w..4w+3 of each row's twelve), then the quants: vector
//! v = 8j + p, for j < 4 and p < 8, holds bytes 4v..4v+3 of each row's 128 (values 64j + 4p..
//! in the low nibbles, 64j + 32 + 4p.. in the high ones).

use super::{KType, QK_K};

/// Rows interleaved together.
pub(crate) const ROWS: usize = 16;
/// Bytes of one Q4_K block.
const BLOCK: usize = 144;
/// Bytes of sixteen rows' super-block.
pub(crate) const GROUP_BYTES: usize = ROWS * BLOCK;

/// Whether a matrix of `t` with n rows takes this layout on this CPU.
pub(crate) fn applies(t: KType, n: usize) -> bool {
    t == KType::Q4K
        && n.is_multiple_of(ROWS)
        && crate::ggml_math::Isa::best() == Some(crate::ggml_math::Isa::Avx512)
}

/// Row r's block (r < 16) as runs of bytes: (where in the block, where in its group's
/// super-block, how many). Every byte of the block is in one run.
fn runs(r: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let scales = [(0, 2 * r, 2), (2, 2 * ROWS + 2 * r, 2)];
    let planes = (0..3).map(move |w| (4 + 4 * w, 4 * ROWS * (1 + w) + 4 * r, 4));
    // Bytes 4v..4v+4 of the quants (v = 8j + p) are vector v's row r.
    let quants = (0..32).map(move |v| (16 + 4 * v, 16 * ROWS + 4 * ROWS * v + 4 * r, 4));
    scales.into_iter().chain(planes).chain(quants)
}

/// GGUF's Q4_K bytes (n rows of kb blocks, n a multiple of 16) in this layout.
pub(crate) fn interleave(gguf: &[u8], n: usize, kb: usize) -> Vec<u8> {
    assert!(n.is_multiple_of(ROWS) && gguf.len() == n * kb * BLOCK);
    let mut out = vec![0u8; gguf.len()];
    for (j, row) in gguf.chunks_exact(kb * BLOCK).enumerate() {
        let (g, r) = (j / ROWS, j % ROWS);
        for (b, blk) in row.chunks_exact(BLOCK).enumerate() {
            let grp = &mut out[(g * kb + b) * GROUP_BYTES..][..GROUP_BYTES];
            for (from, to, len) in runs(r) {
                grp[to..to + len].copy_from_slice(&blk[from..from + len]);
            }
        }
    }
    out
}

/// Row j's GGUF bytes (kb blocks) from the interleaved matrix `x`, into `out`.
pub(crate) fn gguf_row(x: &[u8], kb: usize, j: usize, out: &mut Vec<u8>) {
    let (g, r) = (j / ROWS, j % ROWS);
    out.resize(kb * BLOCK, 0);
    for (b, blk) in out.chunks_exact_mut(BLOCK).enumerate() {
        let grp = &x[(g * kb + b) * GROUP_BYTES..][..GROUP_BYTES];
        for (at, from, len) in runs(r) {
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
        let mut seen = vec![false; GROUP_BYTES];
        for r in 0..ROWS {
            let mut covered = [false; BLOCK];
            for (at, to, len) in runs(r) {
                for i in 0..len {
                    assert!(!covered[at + i] && !seen[to + i], "row {r} byte {}", at + i);
                    (covered[at + i], seen[to + i]) = (true, true);
                }
            }
            assert!(
                covered.iter().all(|&c| c),
                "row {r}: a byte of its block has no place"
            );
        }
        assert!(seen.iter().all(|&c| c));
        let (n, kb) = (32, 3);
        let gguf: Vec<u8> = (0..n * kb * BLOCK)
            .map(|i| (i * 7919 % 251) as u8)
            .collect();
        let x = interleave(&gguf, n, kb);
        let mut row = Vec::new();
        for j in 0..n {
            gguf_row(&x, kb, j, &mut row);
            assert_eq!(row, &gguf[j * kb * BLOCK..(j + 1) * kb * BLOCK], "row {j}");
        }
    }
}
