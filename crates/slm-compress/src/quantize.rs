//! `slm quantize`: a GGUF file (or a Hugging Face folder, converted first) rewritten with its
//! weight matrices in ggml's block types, byte for byte as llama-quantize writes them: the
//! same row quantizers (`quants`), the same per-tensor type choice (llama-quant.cpp's
//! `llama_tensor_get_type`: the _S/_M mixes, the output projection's type, the fallbacks for
//! rows that are not whole blocks) and, with an importance matrix (`imatrix`), the same
//! importance-weighted searches.

use std::path::Path;

use rayon::prelude::*;
use slm_model::gguf::{GgmlType, GgufFile, Value};
use slm_model::Config;

use crate::export::{ExportError, FloatType};
use crate::imatrix::Imatrix;
use crate::quants::quantize_row;

/// A file type of llama-quantize: the type most weight matrices get, and for the K-quant
/// mixes the rules that give some tensors more bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3KS,
    Q3KM,
    Q3KL,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
}

use FileType as F;

impl FileType {
    const ALL: [(FileType, &'static str, u32); 17] = [
        (F::F32, "f32", 0),
        (F::F16, "f16", 1),
        (F::BF16, "bf16", 32),
        (F::Q8_0, "q8_0", 7),
        (F::Q4_0, "q4_0", 2),
        (F::Q4_1, "q4_1", 3),
        (F::Q5_0, "q5_0", 8),
        (F::Q5_1, "q5_1", 9),
        (F::Q2K, "q2_k", 10),
        (F::Q3KS, "q3_k_s", 11),
        (F::Q3KM, "q3_k_m", 12),
        (F::Q3KL, "q3_k_l", 13),
        (F::Q4KS, "q4_k_s", 14),
        (F::Q4KM, "q4_k_m", 15),
        (F::Q5KS, "q5_k_s", 16),
        (F::Q5KM, "q5_k_m", 17),
        (F::Q6K, "q6_k", 18),
    ];
    /// The names llama-quantize takes, lower case.
    pub fn names() -> impl Iterator<Item = &'static str> {
        Self::ALL.iter().map(|e| e.1)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let s = s.to_ascii_lowercase();
        Self::ALL.iter().find(|e| e.1 == s).map(|e| e.0)
    }
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|e| e.0 == self).map_or("", |e| e.1)
    }
    /// llama.cpp's `llama_ftype` (general.file_type).
    fn id(self) -> u32 {
        Self::ALL.iter().find(|e| e.0 == self).map_or(0, |e| e.2)
    }
    /// `llama_ftype_get_default_type`: the type of a weight matrix no rule singles out.
    fn default_type(self) -> GgmlType {
        match self {
            F::F32 => GgmlType::F32,
            F::F16 => GgmlType::F16,
            F::BF16 => GgmlType::BF16,
            F::Q8_0 => GgmlType::Q8_0,
            F::Q4_0 => GgmlType::Q4_0,
            F::Q4_1 => GgmlType::Q4_1,
            F::Q5_0 => GgmlType::Q5_0,
            F::Q5_1 => GgmlType::Q5_1,
            F::Q2K => GgmlType::Q2K,
            F::Q3KS | F::Q3KM | F::Q3KL => GgmlType::Q3K,
            F::Q4KS | F::Q4KM => GgmlType::Q4K,
            F::Q5KS | F::Q5KM => GgmlType::Q5K,
            F::Q6K => GgmlType::Q6K,
        }
    }
}

/// What `slm quantize` was asked for.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    pub file_type: FileType,
    /// Quantize weights that are already quantized (dequantized first; the errors add).
    pub allow_requantize: bool,
    /// Every weight matrix in the file type's own type: no mix rules, no fallbacks (a tensor
    /// whose rows are not whole blocks is refused).
    pub pure: bool,
    pub imatrix: Option<&'a Imatrix>,
}

/// The model facts the mix rules read (llama-quant.cpp's `quantize_state_impl` and hparams).
struct Model {
    layers: usize,
    attn_v: usize,
    /// Query heads per KV head.
    gqa: usize,
    /// llama.cpp's LLM_TYPE_70B, whose attn_v get more bits.
    is_70b: bool,
    tied: bool,
}

/// `tensor_allows_quantization` for the architectures slm runs: matrices named `*weight`,
/// norms excepted.
fn quantizable(name: &str, dims: &[usize]) -> bool {
    dims.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight")
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer between them.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize).rem_euclid(3) == 2
}

/// The type of each tensor of `tensors` (name, dims) in a file of `opts.file_type`, in
/// llama-quantize's order of visiting (`weight_name_comparer`: by layer, then name), whose
/// counters the attn_v and ffn_down rules read. `None` where the tensor keeps its type.
fn choose_types(
    tensors: &[(&str, &[usize])],
    m: &Model,
    opts: &Options,
) -> Result<Vec<Option<GgmlType>>, String> {
    let layer = |name: &str| -> i64 {
        name.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    };
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, nb) = (tensors[a].0, tensors[b].0);
        layer(na).cmp(&layer(nb)).then(na.cmp(nb))
    });
    let ft = opts.file_type;
    let default = ft.default_type();
    let quantized = default.block_size() > 1;
    let (mut i_attn_v, mut i_ffn_down) = (0, 0);
    let mut out = vec![None; tensors.len()];
    for i in order {
        let (name, dims) = tensors[i];
        if !quantizable(name, dims) {
            continue;
        }
        let cols = dims[dims.len() - 1];
        let mut ty = default;
        if quantized && !opts.pure {
            ty = mix_type(
                name,
                cols,
                m,
                ft,
                opts.imatrix.is_some(),
                &mut i_attn_v,
                &mut i_ffn_down,
            );
        }
        if quantized && !cols.is_multiple_of(ty.block_size()) {
            if opts.pure {
                return Err(format!(
                    "tensor '{name}' has rows of {cols} values, not whole {} blocks of {}; \
                     without --pure such tensors fall back to a 32-value type",
                    ty.name(),
                    ty.block_size()
                ));
            }
            ty = fallback(ty);
            if !cols.is_multiple_of(ty.block_size()) {
                ty = GgmlType::F16;
            }
        }
        out[i] = Some(ty);
    }
    Ok(out)
}

/// `tensor_type_fallback`: a type of 32-value blocks for a 256-value type whose blocks do
/// not fit the rows.
fn fallback(ty: GgmlType) -> GgmlType {
    match ty {
        GgmlType::Q2K | GgmlType::Q3K => GgmlType::Q4_0,
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    }
}

/// `llama_tensor_get_type_impl` for the file types slm writes (no MoE, no Falcon).
fn mix_type(
    name: &str,
    cols: usize,
    m: &Model,
    ft: FileType,
    has_imatrix: bool,
    i_attn_v: &mut usize,
    i_ffn_down: &mut usize,
) -> GgmlType {
    use GgmlType as T;
    let default = ft.default_type();
    if name == "output.weight" || (m.tied && name == "token_embd.weight") {
        return if !cols.is_multiple_of(default.block_size()) {
            T::Q8_0
        } else if default != T::Q8_0 {
            T::Q6K
        } else {
            default
        };
    }
    if name.contains("attn_v.weight") {
        let i = *i_attn_v;
        *i_attn_v += 1;
        let mut ty = match ft {
            F::Q2K if m.gqa >= 4 => T::Q4K,
            F::Q2K => T::Q3K,
            F::Q3KM if i < 2 => T::Q5K,
            F::Q3KM => T::Q4K,
            F::Q3KL => T::Q5K,
            F::Q4KM | F::Q5KM if use_more_bits(i, m.attn_v) => T::Q6K,
            F::Q4KS if i < 4 => T::Q5K,
            _ => default,
        };
        if m.is_70b && matches!(ty, T::Q3K | T::Q4K) {
            ty = T::Q5K;
        }
        return ty;
    }
    if name.contains("ffn_down") {
        let (i, n) = (*i_ffn_down, m.layers);
        *i_ffn_down += 1;
        return match ft {
            F::Q2K => T::Q3K,
            F::Q3KM if i < n / 16 => T::Q5K,
            F::Q3KM => T::Q4K,
            F::Q3KL => T::Q5K,
            F::Q4KM | F::Q5KM if use_more_bits(i, n) => T::Q6K,
            F::Q4KS if i < n / 8 => T::Q5K,
            F::Q4_0 if has_imatrix && i < n / 8 => T::Q4_1,
            F::Q5_0 if has_imatrix && i < n / 8 => T::Q5_1,
            _ => default,
        };
    }
    if name.contains("attn_output.weight") {
        return match ft {
            F::Q2K => T::Q3K,
            F::Q3KM => T::Q4K,
            F::Q3KL => T::Q5K,
            _ => default,
        };
    }
    default
}

/// llama.cpp's loader order of tensor names (`weight_name_comparer`): those outside the
/// blocks first, then block by block, by name within each.
fn loader_order(a: &str, b: &str) -> std::cmp::Ordering {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|d| d.parse().ok())
            .unwrap_or(-1)
    };
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

/// Quantizes the GGUF `model` into `out` as `opts` asks.
pub fn quantize_gguf(
    model: &Path,
    out: &Path,
    opts: &Options,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<(), ExportError> {
    let err = |what: String| ExportError::Model {
        path: model.to_path_buf(),
        what,
    };
    let file = GgufFile::open(model)?;
    // Only a model slm can load is quantized (its configuration checked).
    let cfg = Config::from_gguf(&file)?;
    let names: Vec<(&str, &[usize])> = file
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    let facts = Model {
        layers: cfg.num_hidden_layers,
        attn_v: names
            .iter()
            .filter(|t| t.0.contains("attn_v.weight"))
            .count(),
        gqa: cfg.num_attention_heads / cfg.num_key_value_heads.max(1),
        is_70b: cfg.num_hidden_layers == 80
            && (cfg.arch != slm_model::config::Arch::Llama
                || cfg.num_attention_heads != cfg.num_key_value_heads),
        tied: file.tensor_info("output.weight").is_none(),
    };
    let chosen = choose_types(&names, &facts, opts).map_err(err)?;
    if let Some(im) = opts.imatrix {
        im.check_fits(&names).map_err(err)?;
    }
    let mut plan = Vec::new();
    for (t, target) in file.tensors.iter().zip(&chosen) {
        let ty = target.unwrap_or(t.dtype);
        if ty != t.dtype && FloatType::of_ggml(t.dtype).is_none() && !opts.allow_requantize {
            return Err(err(format!(
                "tensor '{}' is already {}: requantizing loses more than quantizing the original; \
                 pass --allow-requantize to do it anyway",
                t.name,
                t.dtype.name()
            )));
        }
        plan.push(ty);
    }
    // llama-quantize's file: the input's metadata in its order, the quantization version
    // and file type moved to the end, then the imatrix's provenance; tensors in its loader's
    // order. Its bytes are then ours.
    let mut extra = vec![
        ("general.quantization_version".to_string(), Value::U32(2)),
        (
            "general.file_type".to_string(),
            Value::U32(opts.file_type.id()),
        ),
    ];
    if let Some(im) = opts.imatrix {
        extra.extend(im.provenance());
    }
    let mut meta: Vec<(String, Value)> = file
        .metadata_in_file_order()
        .into_iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .collect();
    meta.extend(extra);
    let mut order: Vec<usize> = (0..file.tensors.len()).collect();
    order.sort_by(|&a, &b| loader_order(&file.tensors[a].name, &file.tensors[b].name));
    let specs: Vec<slm_model::gguf_write::TensorSpec> = order
        .iter()
        .map(|&i| slm_model::gguf_write::TensorSpec {
            name: &file.tensors[i].name,
            dims: &file.tensors[i].dims,
            dtype: plan[i],
        })
        .collect();
    let n = file.tensors.len();
    let write = slm_model::gguf_write::write_gguf_streamed(out, &meta, &specs, |s| {
        let i = order[s];
        let t = &file.tensors[i];
        let ty = plan[i];
        progress(s, n);
        if ty == t.dtype {
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
        if let Some(f) = FloatType::of_ggml(ty) {
            return Ok(f.bytes(&values));
        }
        let row_bytes = cols / ty.block_size() * ty.type_size();
        let weights = opts.imatrix.and_then(|im| im.weights(&t.name, cols));
        let mut out = vec![0u8; values.len() / cols * row_bytes];
        out.par_chunks_mut(row_bytes)
            .zip(values.par_chunks(cols))
            .for_each(|(o, r)| quantize_row(ty, r, weights, o));
        Ok(out)
    });
    write.map_err(|e| ExportError::Model {
        path: out.to_path_buf(),
        what: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlType as T;

    /// SmolLM2-135M's tensors (30 layers, 576 wide, FFN 1536, 9 query heads on 3 KV heads).
    fn smollm2() -> (Vec<(String, Vec<usize>)>, Model) {
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![49152, 576]),
            ("output_norm.weight".to_string(), vec![576]),
        ];
        for l in 0..30 {
            for (n, d) in [
                ("attn_q", vec![576, 576]),
                ("attn_k", vec![192, 576]),
                ("attn_v", vec![192, 576]),
                ("attn_output", vec![576, 576]),
                ("ffn_gate", vec![1536, 576]),
                ("ffn_up", vec![1536, 576]),
                ("ffn_down", vec![576, 1536]),
                ("attn_norm", vec![576]),
            ] {
                t.push((format!("blk.{l}.{n}.weight"), d));
            }
        }
        let m = Model {
            layers: 30,
            attn_v: 30,
            gqa: 3,
            is_70b: false,
            tied: true,
        };
        (t, m)
    }

    /// llama.cpp's loader order: tensors outside the blocks first, then by block number
    /// (numerically), then by name.
    #[test]
    fn tensors_are_written_in_llama_cpps_loader_order() {
        let mut names = vec![
            "blk.10.attn_q.weight",
            "blk.2.ffn_up.weight",
            "token_embd.weight",
            "blk.2.attn_q.weight",
            "output_norm.weight",
        ];
        names.sort_by(|a, b| loader_order(a, b));
        assert_eq!(
            names,
            [
                "output_norm.weight",
                "token_embd.weight",
                "blk.2.attn_q.weight",
                "blk.2.ffn_up.weight",
                "blk.10.attn_q.weight",
            ]
        );
    }

    fn types(
        ft: FileType,
        pure: bool,
        imatrix: bool,
    ) -> Result<std::collections::BTreeMap<String, GgmlType>, String> {
        let (t, m) = smollm2();
        let names: Vec<(&str, &[usize])> =
            t.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let im = Imatrix::default();
        let opts = Options {
            file_type: ft,
            allow_requantize: false,
            pure,
            imatrix: imatrix.then_some(&im),
        };
        let chosen = choose_types(&names, &m, &opts)?;
        Ok(t.iter()
            .zip(chosen)
            .filter_map(|((n, _), ty)| Some((n.clone(), ty?)))
            .collect())
    }

    /// The layers `use_more_bits` picks of 30: the first three, the last four, every third
    /// between (llama-quantize's q4_k_m of SmolLM2 has Q6_K ffn_down in exactly these).
    #[test]
    fn more_bits_go_to_the_ends_and_every_third_layer() {
        let picked: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }

    /// q4_k_m of SmolLM2 as llama-quantize types it: rows of 576 take the 32-value fallbacks
    /// (Q4_K -> Q5_0, Q6_K -> Q8_0), ffn_down's rows of 1536 keep the K-quants, the tied
    /// embedding is the output projection (Q8_0: its rows are not whole 256-blocks), norms
    /// keep their type.
    #[test]
    fn q4_k_m_mix_of_smollm2() {
        let ty = types(FileType::Q4KM, false, false).unwrap();
        assert_eq!(ty["token_embd.weight"], T::Q8_0);
        assert!(!ty.contains_key("blk.0.attn_norm.weight"));
        for l in 0..30 {
            let more = use_more_bits(l, 30);
            let at = |n: &str| ty[&format!("blk.{l}.{n}.weight")];
            assert_eq!(at("attn_q"), T::Q5_0);
            assert_eq!(at("attn_v"), if more { T::Q8_0 } else { T::Q5_0 });
            assert_eq!(at("ffn_down"), if more { T::Q6K } else { T::Q4K });
        }
        // q3_k_m: attn_v of the first two layers Q5_K (-> Q5_1), attn_output Q4_K (-> Q5_0),
        // ffn_down Q5_K in the first 30/16 layers, else Q4_K.
        let ty = types(FileType::Q3KM, false, false).unwrap();
        assert_eq!(ty["blk.0.attn_v.weight"], T::Q5_1);
        assert_eq!(ty["blk.2.attn_v.weight"], T::Q5_0);
        assert_eq!(ty["blk.3.attn_output.weight"], T::Q5_0);
        assert_eq!(ty["blk.0.ffn_down.weight"], T::Q5K);
        assert_eq!(ty["blk.1.ffn_down.weight"], T::Q4K);
        assert_eq!(ty["blk.1.ffn_up.weight"], T::Q4_0);
        // The float file types convert every matrix, the embedding included.
        let ty = types(FileType::F16, false, false).unwrap();
        assert_eq!(ty["token_embd.weight"], T::F16);
        assert_eq!(ty["blk.3.ffn_down.weight"], T::F16);
    }

    /// With an importance matrix, q4_0 and q5_0 give the first eighth of ffn_down the type
    /// with a minimum (llama.cpp's guard against "craziness" there).
    #[test]
    fn an_imatrix_guards_the_first_ffn_down_layers_of_q4_0() {
        let ty = types(FileType::Q4_0, false, true).unwrap();
        assert_eq!(ty["blk.2.ffn_down.weight"], T::Q4_1);
        assert_eq!(ty["blk.3.ffn_down.weight"], T::Q4_0);
        let ty = types(FileType::Q4_0, false, false).unwrap();
        assert_eq!(ty["blk.2.ffn_down.weight"], T::Q4_0);
    }

    /// --pure: one type for every matrix, and rows it does not fit are refused by name.
    #[test]
    fn pure_refuses_rows_that_are_not_whole_blocks() {
        let e = types(FileType::Q4KM, true, false).unwrap_err();
        assert!(
            e.contains("'token_embd.weight' has rows of 576 values, not whole Q4_K blocks of 256"),
            "{e}"
        );
        let ty = types(FileType::Q8_0, true, false).unwrap();
        assert_eq!(ty["token_embd.weight"], T::Q8_0);
        let legacy = types(FileType::Q4_0, false, false).unwrap();
        assert_eq!(legacy["token_embd.weight"], T::Q8_0);
        assert_eq!(
            types(FileType::Q4_0, true, false).unwrap()["token_embd.weight"],
            T::Q4_0
        );
    }

    #[test]
    fn every_name_parses_to_its_type() {
        for n in FileType::names() {
            assert_eq!(FileType::parse(n).unwrap().name(), n);
        }
        assert_eq!(FileType::parse("Q4_K_M"), Some(FileType::Q4KM));
        assert_eq!(FileType::parse("q4_k"), None);
    }
}
