//! What slm refuses, in one place. Every size read from a model file, a config.json or a
//! recipe is checked against these before anything is allocated from it, so a corrupt or
//! hostile file gets an error naming the field instead of an abort. Each bound sits well above
//! the largest published model of the Llama family (the README's limit table gives the
//! reasons), so no real model is refused.

/// Positions of context. Published Llama-family models go to 131,072 (Llama 3.1, Qwen2.5) and
/// a few long-context variants to 1,048,576.
pub const MAX_CONTEXT: usize = 1 << 20;
/// Transformer blocks. The deepest published dense models have 126.
pub const MAX_LAYERS: usize = 1024;
/// Vocabulary entries. The largest published vocabularies have 262,144.
pub const MAX_VOCAB: usize = 1 << 20;
/// Width of the residual stream. The widest published Llama is 16,384.
pub const MAX_HIDDEN: usize = 1 << 16;
/// Width of the feed-forward layer. The widest published Llama is 53,248.
pub const MAX_FFN: usize = 1 << 18;
/// Attention heads (query heads). Published models have at most 128.
pub const MAX_HEADS: usize = 1024;
/// Width of one attention head. Published models use 64 to 256.
pub const MAX_HEAD_DIM: usize = 1024;
/// Labels of a classification head: far more than any task has (WNUT-17 has 13 BIO tags),
/// few enough that a hostile config.json cannot size a large head.
pub const MAX_LABELS: usize = 1 << 16;
/// Instructions a chat template may execute per rendering (minijinja's fuel). A real template
/// renders a long conversation in a few thousand; a runaway loop stops here within a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Bytes of one downloaded file whose listing gives no size: the Hugging Face hub refuses
/// files over 50 GB, so no file it serves is larger.
pub const MAX_DOWNLOAD_BYTES: u64 = 50_000_000_000;
/// Worker threads. More threads than this only add scheduling cost on any machine slm runs
/// on; the bound keeps `--threads 100000` from spawning a hundred thousand.
pub const MAX_THREADS: usize = 1024;

/// `value` when it is within `1..=max`, else a message naming the field, the value and the
/// bound.
pub fn check(field: &str, value: usize, max: usize) -> Result<usize, String> {
    if value == 0 {
        Err(format!("{field} is 0, expected 1 to {max}"))
    } else if value > max {
        Err(format!(
            "{field} = {value} is beyond slm's limit of {max} (see the README's limits)"
        ))
    } else {
        Ok(value)
    }
}
