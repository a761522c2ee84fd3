//! Matrix products on slices through the `gemm` crate (the kernels candle's CPU matmul
//! calls), with strides, so transposed operands and one head's columns inside a wider row
//! are read where they lie instead of being copied out first.

/// A matrix read through strides: element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct View<T> {
    pub ptr: *const T,
    pub rs: usize,
    pub cs: usize,
}

impl<T> View<T> {
    /// Row-major with `rs` values per row.
    pub fn rows(data: &[T], rs: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `rs` values per row.
    pub fn transposed(data: &[T], rs: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: 1,
            cs: rs,
        }
    }
}

/// dst (m x n, `dst_rs` values per row) = [dst +] scale * lhs (m x k) · rhs (k x n); on
/// rayon's threads when `parallel`, else on the calling thread (inside a parallel task).
///
/// # Safety
/// Every element the views and `dst`'s stride address lies inside live allocations, and no
/// other thread writes `dst`'s elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: 'static + num_traits::Float>(
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    scale: T,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(T::zero());
            }
        }
        return;
    }
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.ptr,
        rhs.cs as isize,
        rhs.rs as isize,
        T::one(),
        scale,
        false,
        false,
        false,
        par,
    )
}

/// The three products of a linear layer `y = x · wᵀ` (x: n x k rows, w: m x k), on all threads.
/// Lengths are checked: the callers size every buffer from one model shape.
pub mod linear {
    use super::{gemm, View};

    fn check(what: &str, len: usize, want: usize) {
        assert!(len >= want, "{what}: {len} values, {want} needed");
    }

    /// y (n x m) = x · wᵀ, added to y's values when `accumulate` (a residual connection).
    pub fn forward(
        y: &mut [f32],
        x: &[f32],
        w: &[f32],
        (n, k, m): (usize, usize, usize),
        accumulate: bool,
    ) {
        check("linear output", y.len(), n * m);
        check("linear input", x.len(), n * k);
        check("linear weight", w.len(), m * k);
        // SAFETY: the checks above bound every addressed element.
        unsafe {
            gemm(
                y.as_mut_ptr(),
                m,
                accumulate,
                (n, m, k),
                View::rows(x, k),
                View::transposed(w, k),
                1.0,
                true,
            )
        }
    }

    /// dx (n x k) = dy (n x m) · w, added to dx's values when `accumulate`.
    pub fn input_grad(
        dx: &mut [f32],
        dy: &[f32],
        w: &[f32],
        (n, k, m): (usize, usize, usize),
        accumulate: bool,
    ) {
        check("input gradient", dx.len(), n * k);
        check("output gradient", dy.len(), n * m);
        check("linear weight", w.len(), m * k);
        // SAFETY: as in `forward`.
        unsafe {
            gemm(
                dx.as_mut_ptr(),
                k,
                accumulate,
                (n, k, m),
                View::rows(dy, m),
                View::rows(w, k),
                1.0,
                true,
            )
        }
    }

    /// Both gradients of `y = x · wᵀ` from dy: dx written (it feeds a norm's backward, which
    /// adds it into the residual stream's gradient), dw accumulated.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        dx: &mut [f32],
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        dims: (usize, usize, usize),
        partials: &mut Vec<f32>,
    ) {
        input_grad(dx, dy, w, dims, false);
        weight_grad(dw, dy, x, dims, partials);
    }

    /// Weight gradients of at most this many values are summed from one partial product per
    /// thread over its share of the rows, instead of gemm splitting the (small) output
    /// between threads. Measured on 2 threads (GFLOP/s, gemm's split -> ours): 768x256
    /// 235 -> 289, 256x688 223 -> 281, 512x512 243 -> 297, 512x1376 278 -> 293; but 1536x512
    /// 248 -> 241 and 2752x512 266 -> 254, where the partials outgrow L2.
    const SPLIT_ROWS_MAX: usize = 512 * 1376;

    /// dw (m x k) += dyᵀ · x; `partials` is scratch kept between calls.
    pub fn weight_grad(
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        (n, k, m): (usize, usize, usize),
        partials: &mut Vec<f32>,
    ) {
        use rayon::prelude::*;
        check("weight gradient", dw.len(), m * k);
        check("output gradient", dy.len(), n * m);
        check("linear input", x.len(), n * k);
        let threads = rayon::current_num_threads();
        if threads < 2 || m * k > SPLIT_ROWS_MAX || n < 2 * threads {
            // SAFETY: as in `forward`.
            unsafe {
                gemm(
                    dw.as_mut_ptr(),
                    k,
                    true,
                    (m, k, n),
                    View::transposed(dy, m),
                    View::rows(x, k),
                    1.0,
                    true,
                )
            };
            return;
        }
        let rows = n.div_ceil(threads);
        partials.resize(threads * m * k, 0.0);
        partials
            .par_chunks_mut(m * k)
            .enumerate()
            .for_each(|(i, part)| {
                let r0 = (i * rows).min(n);
                let r = rows.min(n - r0);
                // SAFETY: rows r0..r0 + r of dy and x lie inside them (checked above);
                // `part` is this task's own m x k.
                unsafe {
                    gemm(
                        part.as_mut_ptr(),
                        k,
                        false,
                        (m, k, r),
                        View::transposed(&dy[r0 * m..], m),
                        View::rows(&x[r0 * k..], k),
                        1.0,
                        false,
                    )
                }
            });
        const CHUNK: usize = 1 << 12;
        let parts = &partials[..threads * m * k];
        dw[..m * k]
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, out)| {
                for part in parts.chunks_exact(m * k) {
                    let src = &part[c * CHUNK..c * CHUNK + out.len()];
                    out.iter_mut().zip(src).for_each(|(o, v)| *o += v);
                }
            });
    }
}
