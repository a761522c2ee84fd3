//! Byte-level BPE training (the GPT-2 / SmolLM scheme) with the `tokenizers` crate's trainer:
//! every byte is in the base alphabet, so any text encodes without an unknown token.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::{Result, TokenizerError};

/// Ends every document in token shards; also the model's EOS.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// ChatML turn markers, reserved now so a pretrained model can later be chat-tuned.
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

pub struct TrainOptions {
    pub vocab_size: usize,
    /// Merges of pairs seen fewer times than this are not learned.
    pub min_frequency: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            min_frequency: 2,
        }
    }
}

/// The smallest vocabulary that holds the 256 byte symbols and the special tokens.
pub const MIN_VOCAB: usize = 256 + 3;

/// Learns a byte-level BPE vocabulary of `vocab_size` tokens from `docs`. Special tokens get
/// ids 0 (`<|endoftext|>`), 1 and 2 (the ChatML markers).
pub fn train_bpe<I, S>(docs: I, opts: &TrainOptions) -> Result<tokenizers::Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    if opts.vocab_size < MIN_VOCAB {
        return Err(TokenizerError::Tokenizers(format!(
            "--vocab {} is below the minimum {MIN_VOCAB} (256 bytes + 3 special tokens)",
            opts.vocab_size
        )));
    }
    // The trainer sizes its tables from the target vocabulary.
    let max = slm_format::limits::MAX_VOCAB;
    if opts.vocab_size > max {
        return Err(TokenizerError::Tokenizers(format!(
            "--vocab {} is beyond slm's limit of {max} (see the README's limits)",
            opts.vocab_size
        )));
    }
    let specials: Vec<AddedToken> = [END_OF_TEXT, IM_START, IM_END]
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevelDecoder::default().into()))
    .build()
    .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
    tok.train(&mut trainer, docs)
        .map_err(|e| TokenizerError::Tokenizers(format!("training failed: {e}")))?;
    Ok(tokenizers::Tokenizer::from(tok))
}

/// tokenizer_config.json for a model folder with a tokenizer from `train_bpe`: EOS, no BOS,
/// and a ChatML chat template.
pub fn tokenizer_config_json(model_max_length: usize) -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "unk_token": null,
        "add_bos_token": false,
        "add_eos_token": false,
        "model_max_length": model_max_length,
        "chat_template": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        (0..200)
            .map(|i| {
                format!(
                    "The whale number {i} swam across the sea. Call me Ishmael, said the sailor {}.\n\
                     Über naïve café — 東京 🐋 tabs\there.",
                    i * 7
                )
            })
            .collect()
    }

    /// A 400-token BPE of `corpus`.
    fn trained() -> tokenizers::Tokenizer {
        train_bpe(
            corpus().into_iter(),
            &TrainOptions {
                vocab_size: 400,
                min_frequency: 2,
            },
        )
        .unwrap()
    }

    #[test]
    fn learns_merges_and_round_trips_any_text() {
        let tok = trained();
        assert_eq!(tok.get_vocab_size(true), 400);
        assert_eq!(tok.token_to_id(END_OF_TEXT), Some(0));
        assert_eq!(tok.token_to_id(IM_END), Some(2));
        let text = "Call me Ishmael. Never-seen text: ζ∑ 🦀 \u{0}\r\n";
        let enc = tok.encode(text, false).unwrap();
        // Learned merges make common words shorter than their bytes.
        let whale = tok.encode("The whale", false).unwrap();
        assert!(
            whale.get_ids().len() < "The whale".len() / 2,
            "{:?}",
            whale.get_tokens()
        );
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        let special = tok.encode("a<|endoftext|>b", false).unwrap();
        assert!(special.get_ids().contains(&0));
    }

    /// tokenizer.json -> GGUF metadata -> tokenizer: the same ids for every text, specials
    /// included, and padding rows past the vocabulary named as llama.cpp names them.
    #[test]
    fn a_trained_tokenizer_survives_the_trip_through_gguf_metadata() {
        let tok = trained();
        let json = tok.to_string(false).unwrap();
        let rows = tok.get_vocab_size(true) + 5;
        let meta = crate::to_gguf_metadata(&json, rows, "t.json").unwrap();
        assert_eq!(meta["tokenizer.ggml.pre"].as_str(), Some("gpt-2"));
        let tokens = meta["tokenizer.ggml.tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), rows);
        assert_eq!(
            tokens[rows - 1].as_str(),
            Some(format!("[PAD{}]", rows - 1).as_str())
        );
        let back = crate::from_gguf_metadata(&meta, "t.gguf")
            .unwrap()
            .tokenizer;
        for text in corpus().iter().take(20).map(String::as_str).chain([
            "<|im_start|>user\nHi<|im_end|>",
            " leading  spaces\n\n",
            "12345 ünï",
        ]) {
            let a = tok.encode(text, false).unwrap();
            let b = back.encode(text, false).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
        }
        // A pre-tokenizer llama.cpp has no name for is refused by name.
        let odd = json.replace("\"use_regex\":true", "\"use_regex\":false");
        let e = crate::to_gguf_metadata(&odd, rows, "t.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.json") && e.contains("pre_tokenizer"), "{e}");
    }

    #[test]
    fn too_small_a_vocabulary_is_an_error() {
        let e = train_bpe(
            corpus().into_iter(),
            &TrainOptions {
                vocab_size: 100,
                min_frequency: 2,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("--vocab 100"), "{e}");
    }
}
