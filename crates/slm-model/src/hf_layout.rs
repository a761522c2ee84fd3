//! A GGUF model's parameters in Hugging Face's layout, for the exporter (GGUF <-> Hugging
//! Face folder) and for training over a GGUF parent, so that both see the same values.
//!
//! llama.cpp's converter stores a Llama q or k projection (and bias) with the rows of each
//! head reordered from Hugging Face's halves (pair i with i + d/2) to adjacent pairs, for its
//! interleaved RoPE; Qwen2 files keep Hugging Face's order. Whole rows move, so a projection
//! in GGUF blocks is put in Hugging Face's order by moving its rows of blocks, exactly.

use slm_format::config::{Arch, Config};
use slm_format::gguf::{GgufError, GgufFile};
use slm_format::{Param, Role};
use slm_kernels::quant::{BlockMatrix, BlockType, QK};

use crate::weights::{candle_type, gguf_qtensor, Result};

/// Row `h*d + 2j + s` of the GGUF tensor is row `h*d + s*d/2 + j` of Hugging Face's: the pairs
/// (Hugging Face row, GGUF row) of a tensor of `rows` rows in `heads` heads.
fn rope_rows(rows: usize, heads: usize) -> impl Iterator<Item = (usize, usize)> {
    let d = rows / heads;
    let half = d / 2;
    (0..heads).flat_map(move |h| {
        (0..half).flat_map(move |j| (0..2).map(move |s| (h * d + s * half + j, h * d + 2 * j + s)))
    })
}

/// Rows of `from` (rows of `cols` values) moved so that row `a` lands at row `b` for each
/// pair `(a, b)`.
fn move_rows<T: Copy + Default>(
    from: &[T],
    cols: usize,
    pairs: impl Iterator<Item = (usize, usize)>,
) -> Vec<T> {
    let mut to = vec![T::default(); from.len()];
    for (a, b) in pairs {
        to[b * cols..(b + 1) * cols].copy_from_slice(&from[a * cols..(a + 1) * cols]);
    }
    to
}

/// A GGUF q or k tensor (rows of `cols` values) in Hugging Face's row order.
pub fn unpermute_rows<T: Copy + Default>(gguf: &[T], heads: usize, cols: usize) -> Vec<T> {
    move_rows(
        gguf,
        cols,
        rope_rows(gguf.len() / cols, heads).map(|(h, g)| (g, h)),
    )
}

/// A Hugging Face q or k tensor (rows of `cols` values) in llama.cpp's converter's order.
pub fn permute_rows<T: Copy + Default>(hf: &[T], heads: usize, cols: usize) -> Vec<T> {
    move_rows(hf, cols, rope_rows(hf.len() / cols, heads))
}

/// The heads whose rows `cfg`'s GGUF files store permuted for tensor `role`, if they do.
pub fn permuted_heads(cfg: &Config, role: Role) -> Option<usize> {
    if cfg.arch == Arch::Qwen2 {
        return None;
    }
    match role {
        Role::Q | Role::QBias => Some(cfg.num_attention_heads),
        Role::K | Role::KBias => Some(cfg.num_key_value_heads),
        _ => None,
    }
}

/// `param` read from `file`, widened to f32 (candle's dequantization) in Hugging Face's layout.
pub fn hf_values(file: &GgufFile, cfg: &Config, param: &Param) -> Result<Vec<f32>> {
    let name = param.gguf_name();
    let q = gguf_qtensor(file, &name, &candle_core::Device::Cpu)?;
    // The copy is made; the file's pages of this tensor may go.
    if let Some(info) = file.tensor_info(&name) {
        file.release(info);
    }
    let v: Vec<f32> = q
        .dequantize(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    if v.len() != param.len() {
        return Err(GgufError::Tensor {
            path: file.path().to_path_buf(),
            tensor: name,
            what: format!(
                "has {} values, the configuration needs {:?}",
                v.len(),
                param.shape
            ),
        }
        .into());
    }
    let cols = if param.role.is_bias() {
        1
    } else {
        cfg.hidden_size
    };
    Ok(match permuted_heads(cfg, param.role) {
        Some(heads) => unpermute_rows(&v, heads, cols),
        None => v,
    })
}

/// A weight matrix `param` kept in its GGUF blocks, its rows in Hugging Face's order: `None`
/// when the file stores it in a type slm's block kernels do not take (floats, K-quants).
/// Widened (`BlockMatrix::dequantize_row`) it holds `hf_values`'s values.
pub fn hf_blocks(file: &GgufFile, cfg: &Config, param: &Param) -> Result<Option<BlockMatrix>> {
    let name = param.gguf_name();
    let Some(info) = file.tensor_info(&name) else {
        return Err(GgufError::Tensor {
            path: file.path().to_path_buf(),
            tensor: name,
            what: "not found in the file".into(),
        }
        .into());
    };
    let Some(t) = BlockType::from_ggml(candle_type(info.dtype)) else {
        return Ok(None);
    };
    let [n, k] = param.shape[..] else {
        return Ok(None);
    };
    if info.dims != [n, k] || !k.is_multiple_of(QK) {
        return Err(GgufError::Tensor {
            path: file.path().to_path_buf(),
            tensor: name,
            what: format!(
                "has shape {:?}, the configuration implies {:?}",
                info.dims, param.shape
            ),
        }
        .into());
    }
    let bytes = file.tensor_bytes(info);
    let row = k / QK * t.block_bytes();
    let w = match permuted_heads(cfg, param.role) {
        Some(heads) => BlockMatrix::new(t, &unpermute_rows(bytes, heads, row), n, k),
        None => BlockMatrix::new(t, bytes, n, k),
    };
    file.release(info);
    Ok(Some(w))
}
