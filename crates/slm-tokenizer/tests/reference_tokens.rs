//! Token ids from the GGUF-built tokenizer against llama.cpp's (../shared/fixtures/reference).

use std::path::PathBuf;

use serde_json::Value;
use slm_format::{gguf::GgufFile, ModelSource};
use slm_tokenizer::{Message, Tokenizer};

fn tokenizer(path: &std::path::Path) -> Tokenizer {
    let g = GgufFile::open(path).unwrap();
    let source = ModelSource::Gguf {
        path: path.into(),
        metadata: g.metadata.clone(),
        tensor_types: Default::default(),
        file_bytes: 0,
    };
    Tokenizer::for_model(&source).unwrap()
}

#[test]
#[cfg_attr(
    not(smollm2_q4_1),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf: run ../shared/fetch-assets.sh models"
)]
fn token_ids_equal_llama_cpp() {
    let path = slm_format::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = tokenizer(&path);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/fixtures/reference/smollm2-tokenization.llamacpp.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for case in reference["tokenization"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        // HF tokenizers always parse special tokens written in the text; llama.cpp's
        // parse_special=false case (the special token split into ordinary pieces) has no
        // counterpart, and slm never needs it: chat prompts are rendered with the tokens parsed.
        if case["parse_special"] == Value::Bool(false)
            && case["text"].as_str().unwrap().contains("<|im_")
        {
            continue;
        }
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(case["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(got, want, "case {name}");
        // And back: decoding gives the text again.
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            case["text"].as_str().unwrap(),
            "decode {name}"
        );
        checked += 1;
    }
    let total = reference["tokenization"].as_array().unwrap().len();
    assert_eq!(
        checked,
        total - 1,
        "exactly the one unparsed-special case is skipped"
    );
}

#[test]
#[cfg_attr(
    not(smollm2_q4_1),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf: run ../shared/fetch-assets.sh models"
)]
fn chat_template_renders_the_reference_chat_prompt() {
    let path = slm_format::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = tokenizer(&path);
    let reference: Value =
        serde_json::from_str(
            &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(
                "../../../shared/fixtures/reference/smollm2-135m-instruct-q4_1.llamacpp.json",
            ))
            .unwrap(),
        )
        .unwrap();
    let chat = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["parse_special"] == Value::Bool(true))
        .unwrap();
    let want: Vec<u32> = chat["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // The model's own template renders the reference's system and user turns, with the
    // generation prompt, into exactly the text llama.cpp was given, which encodes (special
    // tokens parsed) to its ids.
    let template = tok
        .chat_template
        .as_ref()
        .expect("the GGUF carries a chat template");
    let rendered = template
        .render(
            &[
                Message::new(
                    "system",
                    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                ),
                Message::new("user", "What is the capital of France?"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap());
    let got = tok.encode(&rendered, false).unwrap();
    assert_eq!(got, want);
    assert!(
        tok.stop_ids.contains(&2),
        "<|im_end|> must stop generation: {:?}",
        tok.stop_ids
    );
    assert!(tok.chat_template.is_some());
}

/// A tagged sentence's words map onto the tokens of the sentence as one text: each word's
/// first token is where its own tokens start (they decode back to the word, its space
/// included), including words of several tokens, punctuation and non-ASCII.
#[test]
#[cfg_attr(
    not(smollm2_q4_1),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf: run ../shared/fetch-assets.sh models"
)]
fn words_map_to_their_first_tokens() {
    let path = slm_format::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = tokenizer(&path);
    let words = [
        "@paulwalk",
        "It",
        "'s",
        "the",
        "Empire",
        "State",
        "Building",
        "=",
        "ESB",
        ".",
        "Zürich",
        "東京",
        "#driverless",
    ];
    let (ids, first) = tok.encode_words(&words).unwrap();
    assert_eq!(ids, tok.encode(&words.join(" "), true).unwrap());
    assert_eq!(first.len(), words.len());
    for (i, w) in words.iter().enumerate() {
        let end = first.get(i + 1).copied().unwrap_or(ids.len());
        assert!(first[i] < end, "word {i} {w:?} has no token");
        let text = tok.decode(&ids[first[i]..end], false).unwrap();
        assert_eq!(text.trim_start(), *w, "word {i}");
    }
    // Echoed: BOS, the sentence, the sentence again; each word read in the second copy.
    let (echoed, second) = tok.encode_words_echoed(&words).unwrap();
    let bos = usize::from(tok.add_bos && tok.bos.is_some());
    let body = &ids[bos..];
    assert_eq!(echoed, [&ids[..bos], body, body].concat());
    for (f, s) in first.iter().zip(&second) {
        assert_eq!(*s, f + body.len());
        assert_eq!(echoed[*s], ids[*f]);
    }
}
