//! Whole models from damaged files: a tiny GGUF (written with slm-format's writer) and a
//! tiny Hugging Face folder, mutated at random in their headers, tables, metadata, safetensors
//! header and config.json, each mutant then opened, its tokenizer built, the model loaded and
//! one token generated. Every step may refuse with an error; none may panic, abort or
//! allocate beyond the file (an abort ends this test's process, which fails it). The
//! targeted cases (sizes past the limits, overlapping tensors, a changed tensor type, a
//! partial rotary dimension) are asserted by name.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::Device;
use rand::{rngs::StdRng, Rng, SeedableRng};
use slm_model::gguf::{GgmlType, GgufFile, Value};
use slm_runtime::{generate, GenerateOptions, Session};
use slm_tokenizer::Tokenizer;

const HIDDEN: usize = 64;
const FFN: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const VOCAB: usize = 300;
const CTX: usize = 64;

/// GPT-2's byte-to-character table: the 256 byte tokens of a byte-level BPE.
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap().to_string()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap().to_string()
            }
        })
        .collect()
}

fn config() -> slm_model::Config {
    slm_model::Config::from_hf_json(
        &format!(
            r#"{{"model_type": "llama", "hidden_size": {HIDDEN}, "intermediate_size": {FFN},
            "num_hidden_layers": {LAYERS}, "num_attention_heads": {HEADS},
            "num_key_value_heads": {KV_HEADS}, "vocab_size": {VOCAB},
            "max_position_embeddings": {CTX}, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "bos_token_id": 256, "eos_token_id": 257}}"#
        ),
        "config.json",
    )
    .unwrap()
}

/// Every parameter of `config()`, seeded values: norms near 1, matrices small.
fn weights() -> Vec<(slm_model::Param, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(3);
    config()
        .params()
        .into_iter()
        .map(|p| {
            let norm = p.role.is_norm();
            let data = (0..p.len())
                .map(|_| {
                    let g = rng.random_range(-1f32..1.0);
                    if norm {
                        1.0 + 0.1 * g
                    } else {
                        0.1 * g
                    }
                })
                .collect();
            (p, data)
        })
        .collect()
}

fn gguf_metadata() -> BTreeMap<String, Value> {
    let mut tokens = byte_tokens();
    tokens.extend((tokens.len()..VOCAB).map(|i| format!("<|s{i}|>")));
    let u = |v: usize| Value::U32(v as u32);
    let mut m = BTreeMap::new();
    m.insert("general.architecture".into(), Value::String("llama".into()));
    m.insert("llama.embedding_length".into(), u(HIDDEN));
    m.insert("llama.feed_forward_length".into(), u(FFN));
    m.insert("llama.block_count".into(), u(LAYERS));
    m.insert("llama.attention.head_count".into(), u(HEADS));
    m.insert("llama.attention.head_count_kv".into(), u(KV_HEADS));
    m.insert("llama.context_length".into(), u(CTX));
    m.insert("llama.rope.dimension_count".into(), u(HIDDEN / HEADS));
    m.insert("llama.rope.freq_base".into(), Value::F32(10000.0));
    m.insert(
        "llama.attention.layer_norm_rms_epsilon".into(),
        Value::F32(1e-5),
    );
    m.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    m.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    m.insert("tokenizer.ggml.merges".into(), Value::Array(Vec::new()));
    m.insert("tokenizer.ggml.bos_token_id".into(), u(256));
    m.insert("tokenizer.ggml.eos_token_id".into(), u(257));
    m.insert(
        "tokenizer.chat_template".into(),
        Value::String("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()),
    );
    m
}

/// Writes the tiny GGUF to `path`, its metadata passed through `edit` first; `f16` names the
/// tensors stored as F16 (the rest are F32).
fn write_gguf(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, Value>), f16: &[&str]) {
    let mut meta = gguf_metadata();
    edit(&mut meta);
    let w = weights();
    let names: Vec<String> = w
        .iter()
        .map(|(p, _)| slm_model::params::hf_to_gguf_name(&p.role.hf_name(p.layer)).unwrap())
        .collect();
    let types: Vec<GgmlType> = names
        .iter()
        .map(|n| {
            if f16.contains(&n.as_str()) {
                GgmlType::F16
            } else {
                GgmlType::F32
            }
        })
        .collect();
    let bytes: Vec<Vec<u8>> = w
        .iter()
        .zip(&types)
        .map(|((_, d), t)| match t {
            GgmlType::F16 => d
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => d.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let out: Vec<slm_model::gguf_write::TensorOut> = (0..w.len())
        .map(|i| slm_model::gguf_write::TensorOut {
            name: &names[i],
            dims: &w[i].0.shape,
            dtype: types[i],
            data: &bytes[i],
        })
        .collect();
    slm_model::gguf_write::write_gguf(path, &meta, &out).unwrap();
}

/// Byte offset of the type id in tensor `name`'s table entry.
fn type_at(b: &[u8], name: &str) -> usize {
    let at = find_entry(b, name) + 8 + name.len();
    let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims
}

/// Byte offset of tensor `name`'s entry (its length prefix) in the tensor table.
fn find_entry(b: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    b.windows(key.len()).rposition(|w| w == key).unwrap()
}

/// Everything a user's `slm generate` does with a model path, as one result.
fn open_and_generate(path: &Path) -> Result<(), String> {
    let source = slm_model::source(path).map_err(|e| e.to_string())?;
    let tok = Tokenizer::for_model(&source).map_err(|e| e.to_string())?;
    let m = slm_model::load(path, &Device::Cpu).map_err(|e| e.to_string())?;
    tok.check_fits(m.model.config.vocab_size, &m.source)
        .map_err(|e| e.to_string())?;
    let ids = tok.encode("hello", false).map_err(|e| e.to_string())?;
    let ids = if ids.is_empty() { vec![1] } else { ids };
    let mut session = Session::new(&m.model);
    let opts = GenerateOptions {
        max_tokens: 1,
        ..Default::default()
    };
    generate(&m.model, &tok, &mut session, &ids, &opts, |_| {
        ControlFlow::Continue(())
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn expect_err(path: &Path, want: &[&str]) {
    match open_and_generate(path) {
        Ok(()) => panic!(
            "{} was accepted; expected an error with {want:?}",
            path.display()
        ),
        Err(e) => assert!(want.iter().all(|w| e.contains(w)), "{e}"),
    }
}

#[test]
fn the_tiny_gguf_generates() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf(&p, |_| {}, &[]);
    open_and_generate(&p).unwrap();
}

/// Sizes past the limits, a partial rotation, heads that do not divide the width, and
/// special ids past the vocabulary: errors naming the key and value.
#[test]
fn bad_gguf_metadata_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "llama.context_length",
            Value::U64(1 << 31),
            vec!["max_position_embeddings", "2147483648", "limit"],
        ),
        (
            "llama.context_length",
            Value::U64(1 << 40),
            vec!["1099511627776", "limit"],
        ),
        (
            "llama.block_count",
            Value::U64(1 << 40),
            vec!["num_hidden_layers", "limit"],
        ),
        (
            "llama.rope.dimension_count",
            Value::U32(0),
            vec!["rope.dimension_count = 0", "16"],
        ),
        (
            "llama.rope.dimension_count",
            Value::U32(63),
            vec!["rope.dimension_count = 63"],
        ),
        (
            "llama.attention.head_count",
            Value::U32(5),
            vec!["embedding_length 64 is not divisible", "head_count 5"],
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(300), vec!["eos"]),
        (
            "llama.rope.freq_base",
            Value::F32(f32::INFINITY),
            vec!["rope_theta inf"],
        ),
        (
            "tokenizer.chat_template",
            Value::U32(5),
            vec!["tokenizer.chat_template", "expected a string"],
        ),
    ];
    for (key, value, want) in cases {
        write_gguf(
            &p,
            |m| {
                m.insert(key.into(), value.clone());
            },
            &[],
        );
        expect_err(&p, &want);
    }
    // A token list shorter than the embedding: entries were lost.
    write_gguf(
        &p,
        |m| {
            if let Some(Value::Array(t)) = m.get_mut("tokenizer.ggml.tokens") {
                t.truncate(290);
            }
            m.insert("llama.vocab_size".into(), Value::U32(VOCAB as u32));
        },
        &[],
    );
    expect_err(&p, &["290 token ids", "300 rows"]);
}

/// A tensor whose type was changed so its bytes run into the next, and a tensor table whose
/// offsets make two tensors share bytes: refused, naming both tensors.
#[test]
fn overlapping_tensor_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    // Stored as F16, then the type changed to F32: twice the bytes, into the next tensor.
    write_gguf(&p, |_| {}, &["blk.0.attn_q.weight"]);
    open_and_generate(&p).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    let t = type_at(&b, "blk.0.attn_q.weight");
    b[t..t + 4].copy_from_slice(&GgmlType::F32.id().to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    expect_err(&p, &["blk.0.attn_q.weight", "run into tensor"]);

    // Two tensors at the same offset.
    write_gguf(&p, |_| {}, &[]);
    let mut b = std::fs::read(&p).unwrap();
    let off = |b: &[u8], name: &str| type_at(b, name) + 4;
    let src = off(&b, "blk.0.attn_k.weight");
    let dst = off(&b, "blk.0.attn_v.weight");
    let v: [u8; 8] = b[src..src + 8].try_into().unwrap();
    b[dst..dst + 8].copy_from_slice(&v);
    std::fs::write(&p, &b).unwrap();
    expect_err(&p, &["run into tensor", "blk.0.attn_"]);
}

/// Random damage to the header, metadata and tensor table of a whole model.
#[test]
fn mutated_gguf_models_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf(&p, |_| {}, &[]);
    let seed = std::fs::read(&p).unwrap();
    let table_end = GgufFile::open(&p).unwrap().tensors[0].start;
    let mut rng = StdRng::seed_from_u64(0x6775_6675);
    let (mut refused, mut ran) = (0, 0);
    for round in 0..300 {
        let mut b = seed.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..table_end.min(b.len()));
            match rng.random_range(0..4) {
                0 => b[at] = rng.random(),
                1 => {
                    let v: u64 = match rng.random_range(0..4) {
                        0 => u64::MAX - rng.random_range(0..4),
                        1 => 1 << rng.random_range(20..63),
                        2 => rng.random_range(0..70),
                        _ => rng.random::<u32>() as u64,
                    };
                    let end = (at + 8).min(b.len());
                    b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                }
                2 => b.truncate(at.max(1)),
                _ => b[at] ^= 1 << rng.random_range(0..8),
            }
        }
        std::fs::write(&p, &b).unwrap();
        match std::panic::catch_unwind(|| open_and_generate(&p)) {
            Ok(Ok(())) => ran += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("round {round}: panicked"),
        }
    }
    assert!(refused > 100 && ran > 0, "refused {refused}, ran {ran}");
}

/// A tiny Hugging Face folder: config.json, model.safetensors, tokenizer.json.
fn hf_folder(dir: &Path) {
    let cfg = config();
    std::fs::write(dir.join("config.json"), cfg.to_hf_json().to_string()).unwrap();
    let map: std::collections::HashMap<String, candle_core::Tensor> = weights()
        .into_iter()
        .map(|(p, d)| {
            let t = candle_core::Tensor::from_vec(d, p.shape.as_slice(), &Device::Cpu).unwrap();
            (p.role.hf_name(p.layer), t)
        })
        .collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    let text = "the whale and the sea, the ship under the storm ".repeat(50);
    let tok = slm_tokenizer::train::train_bpe(
        std::iter::once(text.as_str()),
        &slm_tokenizer::train::TrainOptions {
            vocab_size: VOCAB,
            min_frequency: 2,
        },
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_string(false).unwrap()).unwrap();
}

/// Random damage to a safetensors header (its length, its JSON) and JSON-level edits of
/// dtypes, shapes and offsets.
#[test]
fn mutated_safetensors_headers_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path());
    let p = dir.path().join("model.safetensors");
    open_and_generate(dir.path()).unwrap();
    let seed = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&seed[8..8 + n]).unwrap();
    let data = &seed[8 + n..];
    let mut rng = StdRng::seed_from_u64(0x5afe);
    let (mut refused, mut ran) = (0, 0);
    for round in 0..300 {
        let bytes = if rng.random_bool(0.5) {
            let mut b = seed.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..8 + n);
                if rng.random_bool(0.2) && at < 8 {
                    b[..8].copy_from_slice(&rng.random::<u64>().to_le_bytes());
                } else {
                    b[at] = rng.random();
                }
            }
            b
        } else {
            let mut h = header.clone();
            let names: Vec<String> = h
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            let name = &names[rng.random_range(0..names.len())];
            let t = &mut h[name];
            match rng.random_range(0..4) {
                0 => {
                    let d = ["F64", "I64", "U8", "F8_E4M3", "BOOL", "F16", "BF16", "X"];
                    t["dtype"] = d[rng.random_range(0..d.len())].into()
                }
                1 => {
                    let v: u64 = [0, 1, 63, 1 << 31, 1 << 40, u64::MAX][rng.random_range(0..6)];
                    let i = rng.random_range(0..t["shape"].as_array().unwrap().len());
                    t["shape"][i] = v.into();
                }
                2 => {
                    let v: u64 = [0, 7, 1 << 20, 1 << 40, u64::MAX][rng.random_range(0..5)];
                    t["data_offsets"][rng.random_range(0..2)] = v.into();
                }
                _ => t["shape"] = serde_json::json!([]),
            }
            let text = h.to_string();
            let mut b = (text.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(text.as_bytes());
            b.extend_from_slice(data);
            b
        };
        std::fs::write(&p, &bytes).unwrap();
        match std::panic::catch_unwind(|| open_and_generate(dir.path())) {
            Ok(Ok(())) => ran += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("round {round}: panicked"),
        }
    }
    assert!(refused > 100, "refused {refused}, ran {ran}");
}

/// config.json with fields set to hostile values (zero, negative, fractional, huge, wrong
/// type) and random bytes changed.
#[test]
fn mutated_config_json_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path());
    let p = dir.path().join("config.json");
    let seed = std::fs::read_to_string(&p).unwrap();
    let v: serde_json::Value = serde_json::from_str(&seed).unwrap();
    let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    let values: Vec<serde_json::Value> = serde_json::from_str(
        r#"[0, -1, 1, 1.5, 2, 5, 63, 2147483648, 1099511627776, 18446744073709551615, 1e308,
            -1e308, "x", null, [], {}, true]"#,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(0xc0f1);
    let (mut refused, mut ran) = (0, 0);
    for round in 0..300 {
        let text = if rng.random_bool(0.7) {
            let mut v = v.clone();
            for _ in 0..rng.random_range(1..3) {
                let k = &keys[rng.random_range(0..keys.len())];
                v[k] = values[rng.random_range(0..values.len())].clone();
            }
            v.to_string()
        } else {
            let mut b = seed.clone().into_bytes();
            let at = rng.random_range(0..b.len());
            b[at] = b"0123456789-.eE,:{}[]\" x"[rng.random_range(0..23)];
            String::from_utf8_lossy(&b).into_owned()
        };
        std::fs::write(&p, &text).unwrap();
        match std::panic::catch_unwind(|| open_and_generate(dir.path())) {
            Ok(Ok(())) => ran += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("round {round}: panicked on {text}"),
        }
    }
    assert!(refused > 100 && ran > 0, "refused {refused}, ran {ran}");
}

/// A folder whose embedding has more rows than its tokenizer has ids (as Qwen2 pads its
/// embedding): loads, and never samples a row without text.
#[test]
fn padding_rows_past_the_tokenizer_are_never_sampled() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path());
    let m = slm_model::load(dir.path(), &Device::Cpu).unwrap();
    let tok = Tokenizer::from_folder(dir.path()).unwrap();
    let ids = tok.vocab_size();
    assert!(
        ids < VOCAB,
        "the test needs padding rows: {ids} ids, {VOCAB} rows"
    );
    tok.check_fits(VOCAB, &m.source).unwrap();
    let prompt = tok.encode("the whale", false).unwrap();
    let mut session = Session::new(&m.model);
    let opts = GenerateOptions {
        max_tokens: 60,
        sampling: slm_runtime::SamplingParams {
            temperature: 5.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let g = generate(&m.model, &tok, &mut session, &prompt, &opts, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(!g.tokens.is_empty());
    assert!(
        g.tokens.iter().all(|&t| (t as usize) < ids),
        "{:?}",
        g.tokens
    );
}
