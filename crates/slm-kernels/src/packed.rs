//! Many short sequences that share prefixes, run as one forward pass.
//!
//! Scoring a multiple-choice question needs the context once and then each choice after it.
//! With a KV cache that is one prefill of the context and one small forward per choice, and
//! small forwards leave the matrix units idle. Here the context and every choice are laid
//! end to end as rows of one matrix ("segments"); a choice's rows attend to its parent's rows
//! (the context, computed once) and causally to its own, at the positions they would have had
//! after the context. Several questions go into one pack, so every linear layer is one large
//! matmul.

use crate::attention::{self, TiledShape};
use crate::ggml_math::Isa;

/// A run of consecutive rows; a child segment continues its parent (a root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub parent: Option<usize>,
}

/// The layout of a packed forward: segments over rows, and each row's position.
#[derive(Debug, Clone, Default)]
pub struct Pack {
    segments: Vec<Segment>,
    positions: Vec<u32>,
}

impl Pack {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows so far.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// A new sequence of `len` rows at positions 0..len; returns its segment index.
    pub fn push_root(&mut self, len: usize) -> usize {
        let start = self.len();
        self.positions.extend(0..len as u32);
        self.segments.push(Segment {
            start,
            len,
            parent: None,
        });
        self.segments.len() - 1
    }

    /// `len` rows that continue root segment `parent`: they see all of it, at the positions
    /// after it. Panics if `parent` is not a root segment of this pack (a caller's bug).
    pub fn push_child(&mut self, parent: usize, len: usize) -> usize {
        let p = self.segments[parent];
        assert!(p.parent.is_none(), "segment {parent} is not a root");
        let start = self.len();
        self.positions.extend((p.len as u32)..(p.len + len) as u32);
        self.segments.push(Segment {
            start,
            len,
            parent: Some(parent),
        });
        self.segments.len() - 1
    }

    /// Position after the last row of segment `s` (its sequence length so far).
    pub fn end_position(&self, s: usize) -> usize {
        let seg = self.segments[s];
        seg.parent.map(|p| self.segments[p].len).unwrap_or(0) + seg.len
    }
}

/// softmax(q k^T / sqrt(hd)) v over the pack's visibility, in f32.
/// q: [n_heads][rows][hd], k and v: [n_kv][rows][hd] (heads-major, roped);
/// returns [rows][n_heads][hd], the layout the output projection takes.
///
/// Each segment is the tiled flash attention of a prompt (`attention::tiled`, in its
/// arithmetic but over f32 keys and values): its rows are the new queries and its parent's
/// rows the past, so a segment's keys are widened once into that path's tiles.
pub fn attend(
    pack: &Pack,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_heads: usize,
    n_kv: usize,
    hd: usize,
) -> Vec<f32> {
    let n = pack.len();
    let width = n_heads * hd;
    let mut out = vec![0f32; n * width];
    assert!(pack.segments.iter().map(|s| s.len).sum::<usize>() == n);
    assert!(q.len() >= n * width && k.len() >= n * n_kv * hd && v.len() >= n * n_kv * hd);
    let isa = Isa::best();
    // Segments own disjoint, consecutive output rows, so they run as tasks of the kernel
    // pool (rayon here had its workers spin against the pool's, on the same cores).
    let o = crate::pool::OutPtr(out.as_mut_ptr());
    crate::pool::global().run(pack.segments.len(), |si| {
        let seg = pack.segments[si];
        if seg.len == 0 {
            return;
        }
        let parent = seg.parent.map(|p| pack.segments[p]);
        let past = parent.map_or(0, |p| p.len);
        // Key j of the segment's sequence: its parent's rows, then its own.
        let row_of = |j: usize| match parent {
            Some(p) if j < past => p.start + j,
            _ => seg.start + j - past,
        };
        let (k32, v32) = attention::widen(past + seg.len, n_kv, hd, |j, g| {
            let at = (g * n + row_of(j)) * hd;
            (&k[at..at + hd], &v[at..at + hd])
        });
        let shape = TiledShape {
            t: seg.len,
            past,
            n_heads,
            n_kv,
            hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        for h in 0..n_heads {
            let query = |i: usize| &q[(h * n + seg.start + i) * hd..][..hd];
            // SAFETY: segment si's rows seg.start..seg.start + seg.len are written by this
            // task only (segments tile 0..n in order, asserted above), within out's n * width.
            let write = |i: usize, row: &[f32]| unsafe {
                std::slice::from_raw_parts_mut(o.get().add((seg.start + i) * width + h * hd), hd)
                    .copy_from_slice(row)
            };
            attention::tiled(&k32, &v32, query, shape, h, 0..seg.len, isa, write);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// softmax(q k^T / sqrt(hd)) v in f64 over the keys each row of the pack sees.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        pack: &Pack,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n_heads: usize,
        n_kv: usize,
        hd: usize,
    ) -> Vec<f64> {
        let n = pack.len();
        let mut out = vec![0f64; n * n_heads * hd];
        for seg in pack.segments() {
            let mut keys: Vec<usize> = seg
                .parent
                .map(|p| pack.segments()[p])
                .map(|p| (p.start..p.start + p.len).collect())
                .unwrap_or_default();
            let shared = keys.len();
            keys.extend(seg.start..seg.start + seg.len);
            for i in 0..seg.len {
                let row = seg.start + i;
                for h in 0..n_heads {
                    let g = h / (n_heads / n_kv);
                    let at = |x: &[f32], r: usize, hh: usize| -> Vec<f64> {
                        x[(hh * n + r) * hd..][..hd]
                            .iter()
                            .map(|&y| y as f64)
                            .collect()
                    };
                    let qr = at(q, row, h);
                    let s: Vec<f64> = keys[..shared + i + 1]
                        .iter()
                        .map(|&j| {
                            let kr = at(k, j, g);
                            qr.iter().zip(&kr).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for (w, &j) in e.iter().zip(&keys) {
                        let vr = at(v, j, g);
                        for d in 0..hd {
                            out[(row * n_heads + h) * hd + d] += w / sum * vr[d];
                        }
                    }
                }
            }
        }
        out
    }

    /// Segments longer than a tile of keys and of queries, children after a long parent and
    /// after a short one, and a lone root: every row equals an f64 reference to f32 rounding
    /// (measured within 1e-6 of it; the bound leaves room for another seed's draw).
    #[test]
    fn attention_matches_an_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (nh, nkv, hd) = (6, 2, 64);
        let mut pack = Pack::new();
        let a = pack.push_root(100);
        pack.push_child(a, 3);
        pack.push_child(a, 70);
        pack.push_root(1);
        let b = pack.push_root(5);
        pack.push_child(b, 66);
        let n = pack.len();
        let mut r =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-2f32..2.0)).collect() };
        let (q, k, v) = (r(nh * n * hd), r(nkv * n * hd), r(nkv * n * hd));
        let got = attend(&pack, &q, &k, &v, nh, nkv, hd);
        let want = reference(&pack, &q, &k, &v, nh, nkv, hd);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-5, "value {i}: {a} vs {b}");
        }
    }

    #[test]
    fn children_continue_their_parent_positions() {
        let mut p = Pack::new();
        let a = p.push_root(3);
        let c1 = p.push_child(a, 2);
        let b = p.push_root(1);
        let c2 = p.push_child(a, 1);
        assert_eq!(p.positions(), &[0, 1, 2, 3, 4, 0, 3]);
        assert_eq!(p.end_position(c1), 5);
        assert_eq!(p.end_position(b), 1);
        assert_eq!(p.end_position(c2), 4);
        assert_eq!(p.segments()[c2].start, 6);
    }
}
