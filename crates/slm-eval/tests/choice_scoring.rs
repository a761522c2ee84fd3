//! Multiple-choice scoring on a tiny hand-built model and tokenizer: the context/choice split
//! follows lm-evaluation-harness's `_encode_pair`, each option's log-likelihood equals the sum
//! computed directly from a plain forward pass over context + continuation, and acc, acc_norm
//! and acc_bytes follow from the log-likelihoods by the harness's arithmetic.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use slm_eval::choice::{self, ChoiceOptions, DocScore};
use slm_eval::task::Doc;
use slm_model::{Arch, Config, Llama, Weights};
use slm_tokenizer::Tokenizer;

/// Characters, a space, an end-of-text token, and one merge ("a" + "b" -> "ab") that can
/// straddle the boundary between a context and its continuation.
fn tokenizer() -> Tokenizer {
    let chars = ["a", "b", "c", "x", "y", " ", "é", "e", "\n", ":"];
    let mut vocab: Vec<(String, u32)> = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    vocab.push(("ab".into(), vocab.len() as u32));
    vocab.push(("<eos>".into(), vocab.len() as u32));
    let vocab: serde_json::Map<String, serde_json::Value> =
        vocab.into_iter().map(|(k, v)| (k, v.into())).collect();
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [{"id": 11, "content": "<eos>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": null,
        "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"], "dropout": null,
                  "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false}
    });
    let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
    let mut tok = Tokenizer::new(inner);
    tok.eos = Some(11);
    tok.stop_ids = vec![11];
    tok
}

fn model(vocab: usize) -> Llama {
    let cfg = Config {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: None,
        eos_token_id: Some(11),
        head: Default::default(),
    };
    let dev = Device::Cpu;
    // Fixed weights (a deterministic pattern, not an RNG) so the model is the same everywhere.
    let mut ts = HashMap::new();
    for (k, (name, shape)) in cfg
        .params()
        .into_iter()
        .map(|p| (p.name(), p.shape))
        .enumerate()
    {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 + k * 104_729) % 1000) as f32 / 1000.0 - 0.5)
            .map(|v| {
                if shape.len() == 1 {
                    1.0 + v * 0.2
                } else {
                    v * 1.5
                }
            })
            .collect();
        ts.insert(
            name,
            Tensor::from_vec(vals, shape.as_slice(), &dev).unwrap(),
        );
    }
    let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
    Llama::load(&cfg, &Weights::Vars(vb), &dev).unwrap()
}

/// sum_j log p(cont[j] | ctx, cont[..j]) from one plain forward over ctx + cont (without
/// cont's last token, which nothing is predicted from).
fn direct_ll(m: &Llama, ctx: &[u32], cont: &[u32]) -> f64 {
    let ids: Vec<u32> = ctx.iter().chain(&cont[..cont.len() - 1]).copied().collect();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = m
        .forward(&x, None, false)
        .unwrap()
        .i(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    cont.iter()
        .enumerate()
        .map(|(j, &t)| {
            let row = &logits[ctx.len() - 1 + j];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row[t as usize] as f64 - lse
        })
        .sum()
}

#[test]
fn context_and_choice_split_as_lm_eval_does() {
    let tok = tokenizer();
    let id = |s: &str| tok.inner.token_to_id(s).unwrap();
    // Plain case: the boundary falls between tokens.
    let (c, k) = choice::encode_pair(&tok, "xy:", "c").unwrap();
    assert_eq!((c, k), (vec![id("x"), id("y"), id(":")], vec![id("c")]));
    // Trailing whitespace of the context moves to the continuation.
    let (c, k) = choice::encode_pair(&tok, "x \n", "c").unwrap();
    assert_eq!((c, k), (vec![id("x")], vec![id(" "), id("\n"), id("c")]));
    // A merge across the boundary: the whole text is "x" "ab" "c", the context alone "x" "a";
    // the continuation is what follows the context's own length in the whole: just "c".
    let (c, k) = choice::encode_pair(&tok, "xa", "bc").unwrap();
    assert_eq!((c, k), (vec![id("x"), id("a")], vec![id("c")]));
    // An empty context starts from end-of-text, as lm-eval's eot_token_id.
    let (c, k) = choice::encode_pair(&tok, "", "ab").unwrap();
    assert_eq!((c, k), (vec![id("<eos>")], vec![id("ab")]));
    // So does a context of whitespace only, its whitespace moved to the continuation.
    let (c, k) = choice::encode_pair(&tok, " ", "c").unwrap();
    assert_eq!((c, k), (vec![id("<eos>")], vec![id(" "), id("c")]));
}

#[test]
fn option_scores_equal_direct_sums_of_log_probabilities() {
    let tok = tokenizer();
    let m = model(tok.vocab_size());
    let docs = vec![
        Doc::Choice {
            context: "xy:".into(),
            choices: vec![" ab".into(), " cc".into(), " yééx".into(), " abab".into()],
            answer: 2,
        },
        Doc::Contexts {
            contexts: vec!["xx a".into(), "yy b".into(), "xa".into()],
            continuation: " cab".into(),
            answer: 0,
        },
        Doc::Choice {
            context: "c ".into(),
            choices: vec!["e".into(), "x\n".into()],
            answer: 1,
        },
    ];
    // One document per pass, and all in one pass: the same numbers.
    let one = ChoiceOptions {
        batch_tokens: 1,
        ..Default::default()
    };
    let (each, rows) = choice::score(&m, &tok, &docs, &one).unwrap();
    let (all, rows_all) = choice::score(&m, &tok, &docs, &ChoiceOptions::default()).unwrap();
    assert_eq!(rows, rows_all);
    for (d, (a, b)) in docs.iter().zip(each.iter().zip(&all)) {
        for (x, y) in a.lls.iter().zip(&b.lls) {
            assert!((x - y).abs() < 1e-5, "{d:?}: {x} vs {y}");
        }
    }
    let mut checked = 0;
    for (d, s) in docs.iter().zip(&all) {
        for (o, (ctx, cont)) in d.requests("").iter().enumerate() {
            let (c, k) = choice::encode_pair(&tok, ctx, cont).unwrap();
            assert_eq!(s.tokens[o], k.len());
            let want = direct_ll(&m, &c, &k);
            assert!(
                (s.lls[o] - want).abs() < 1e-4,
                "{d:?} option {o}: packed {} vs direct {want}",
                s.lls[o]
            );
            assert!(s.lls[o] < 0.0);
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}

#[test]
fn few_shot_prompts_prefix_solved_examples_from_the_same_file() {
    let tok = tokenizer();
    let m = model(tok.vocab_size());
    let docs: Vec<Doc> = ["xy:", "yx:", "xx:", "cc:"]
        .iter()
        .map(|c| Doc::Choice {
            context: c.to_string(),
            choices: vec![" a".into(), " b".into()],
            answer: 1,
        })
        .collect();
    let shots = ChoiceOptions {
        shots: 2,
        ..Default::default()
    };
    let (zero, rows0) = choice::score(&m, &tok, &docs, &ChoiceOptions::default()).unwrap();
    let (two, rows2) = choice::score(&m, &tok, &docs, &shots).unwrap();
    // Each prompt grows by two examples ("ctx b" = 5 tokens) and their separators.
    assert_eq!(rows2 - rows0, docs.len() * 2 * (5 + 2));
    assert_ne!(zero[0].lls, two[0].lls);
    // Reproducible: the draw depends on the seed and the document only.
    assert_eq!(two, choice::score(&m, &tok, &docs, &shots).unwrap().0);
}

#[test]
fn acc_acc_norm_and_acc_bytes_by_hand() {
    let doc = |choices: &[&str], answer| Doc::Choice {
        context: "q".into(),
        choices: choices.iter().map(|c| c.to_string()).collect(),
        answer,
    };
    let score = |lls: &[f64]| DocScore {
        lls: lls.to_vec(),
        tokens: vec![1; lls.len()],
    };
    let docs = vec![
        // Longer option: lower sum (acc says 0) but higher per character (acc_norm says 1).
        doc(&[" ab", " abcdef"], 1),
        // "é" is 1 character but 2 bytes: per character option 1 wins (-1.75 > -2),
        // per byte option 0 wins (-1 > -1.75).
        doc(&["é", "ee"], 0),
        // Equal scores: the first option, as numpy's argmax.
        doc(&[" a", " b"], 0),
        // Per-option contexts normalise by the contexts' lengths, as the harness does.
        Doc::Contexts {
            contexts: vec!["aaaa".into(), "a".into()],
            continuation: " x".into(),
            answer: 0,
        },
    ];
    let scores = vec![
        score(&[-4.0, -6.0]),
        score(&[-2.0, -3.5]),
        score(&[-1.0, -1.0]),
        score(&[-3.0, -2.0]),
    ];
    let m = choice::metrics(&docs, &scores);
    // acc: [0, 1, 1, 0]; acc_norm: [1, 0, 1, 1] (-0.75 > -2); acc_bytes: [1, 1, 1, 1].
    assert_eq!(m["acc"].value, 0.5);
    assert_eq!(m["acc_norm"].value, 0.75);
    assert_eq!(m["acc_bytes"].value, 1.0);
    // Sample standard deviation over sqrt(n): [0,1,1,0] -> sqrt(1/3)/2.
    assert!((m["acc"].stderr - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
    assert_eq!(m["acc_bytes"].stderr, 0.0);
    assert_eq!(choice::predictions(&scores), vec![0, 0, 0, 1]);
}

#[test]
fn a_long_context_loses_its_beginning_as_in_lm_eval() {
    let tok = tokenizer();
    let m = model(tok.vocab_size());
    // 100 context tokens and 3 continuation tokens in a 64-position model: the context keeps
    // its last 62 tokens, so the 2 rows fed of the continuation end at position 63.
    let context: String = "xy".repeat(50);
    let docs = vec![Doc::Choice {
        context: context.clone(),
        choices: vec![" cc".into(), " yx".into()],
        answer: 0,
    }];
    let (scores, rows) = choice::score(&m, &tok, &docs, &ChoiceOptions::default()).unwrap();
    assert_eq!(rows, 62 + 2 + 2);
    for (o, cont) in [" cc", " yx"].iter().enumerate() {
        let (c, k) = choice::encode_pair(&tok, &context, cont).unwrap();
        let want = direct_ll(&m, &c[c.len() - 62..], &k);
        assert!(
            (scores[0].lls[o] - want).abs() < 1e-4,
            "{} vs {want}",
            scores[0].lls[o]
        );
    }
}

#[test]
fn impossible_inputs_are_clear_errors() {
    let tok = tokenizer();
    let m = model(tok.vocab_size());
    let one = |context: &str, choice: &str| {
        vec![Doc::Choice {
            context: context.into(),
            choices: vec![choice.into(), " c".into()],
            answer: 0,
        }]
    };
    // A continuation longer than the model's context.
    let err = choice::score(
        &m,
        &tok,
        &one("x", &"c".repeat(70)),
        &ChoiceOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "document 0: a continuation of 70 tokens does not fit the model's context of 64"
        ),
        "{err}"
    );
    // A tokenizer that knows more tokens than the model: "ab" is id 10, the model has 10.
    let small = model(10);
    let err = choice::score(&small, &tok, &one("x", " ab"), &ChoiceOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token id 10 is outside the model's vocabulary of 10"),
        "{err}"
    );
    // An empty context with neither BOS nor EOS to start from.
    let mut bare = tokenizer();
    bare.eos = None;
    let err = choice::encode_pair(&bare, "", " c")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("an empty context needs a BOS or EOS token"),
        "{err}"
    );
}
