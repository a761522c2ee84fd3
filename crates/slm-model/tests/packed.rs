//! A packed forward (contexts and their continuations laid end to end, see slm_model::packed)
//! gives the logits that running each full sequence on its own gives.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use slm_model::{Arch, Config, Llama, Pack, Weights};

fn tiny() -> Config {
    Config {
        arch: Arch::Llama,
        vocab_size: 23,
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        attention_bias: true,
        bos_token_id: None,
        eos_token_id: None,
        head: Default::default(),
    }
}

fn random_model(cfg: &Config) -> Llama {
    let dev = Device::Cpu;
    let mut ts = HashMap::new();
    for (name, shape) in cfg.params().into_iter().map(|p| (p.name(), p.shape)) {
        let t = Tensor::randn(0f32, 0.5, shape.as_slice(), &dev).unwrap();
        // Norm weights near one, as trained models have them.
        let t = if shape.len() == 1 && name.contains("norm") {
            (t + 1.0).unwrap()
        } else {
            t
        };
        ts.insert(name, t);
    }
    let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
    Llama::load(cfg, &Weights::Vars(vb), &dev).unwrap()
}

fn plain_logits(m: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&x, None, false)
        .unwrap()
        .i(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn packed_rows_equal_each_sequence_run_alone() {
    let cfg = tiny();
    let m = random_model(&cfg);
    // Two contexts with two and one continuations, and a lone sequence between them.
    let ctx_a: Vec<u32> = vec![1, 5, 9, 2, 7];
    let conts_a: Vec<Vec<u32>> = vec![vec![3, 3, 8], vec![11]];
    let lone: Vec<u32> = vec![4, 4, 20, 13];
    let ctx_b: Vec<u32> = vec![17, 2];
    let conts_b: Vec<Vec<u32>> = vec![vec![6, 1, 0, 22, 5]];

    let mut pack = Pack::new();
    let mut ids = Vec::new();
    // (row in pack, full sequence, position in that sequence)
    let mut expect: Vec<(usize, Vec<u32>, usize)> = Vec::new();
    let mut add_context = |pack: &mut Pack, ids: &mut Vec<u32>, ctx: &[u32], conts: &[Vec<u32>]| {
        let start = ids.len();
        let root = pack.push_root(ctx.len());
        ids.extend_from_slice(ctx);
        for (i, _) in ctx.iter().enumerate() {
            expect.push((start + i, ctx.to_vec(), i));
        }
        for c in conts {
            let start = ids.len();
            pack.push_child(root, c.len());
            ids.extend_from_slice(c);
            let full: Vec<u32> = ctx.iter().chain(c).copied().collect();
            for i in 0..c.len() {
                expect.push((start + i, full.clone(), ctx.len() + i));
            }
        }
    };
    add_context(&mut pack, &mut ids, &ctx_a, &conts_a);
    add_context(&mut pack, &mut ids, &lone, &[]);
    add_context(&mut pack, &mut ids, &ctx_b, &conts_b);
    assert_eq!(ids.len(), pack.len());

    let rows: Vec<u32> = expect.iter().map(|e| e.0 as u32).collect();
    let packed = m
        .forward_packed(&ids, &pack, &rows)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut worst = 0f32;
    for ((_, full, pos), got) in expect.iter().zip(&packed) {
        let want = &plain_logits(&m, full)[*pos];
        for (a, b) in got.iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
    }
    // Same arithmetic up to summation order in attention.
    assert!(
        worst < 1e-4,
        "packed logits differ from plain ones by {worst}"
    );

    // Only the asked-for rows come back, in the asked-for order (the output projection's
    // gemm blocks 2 rows differently from 20, hence not bit-equal).
    let some = m
        .forward_packed(&ids, &pack, &[rows[7], rows[0]])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (got, want) in some.iter().zip([&packed[7], &packed[0]]) {
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

#[test]
fn dequantized_model_gives_the_same_logits_for_dense_weights() {
    // Same weights; candle's norm/SiLU/RoPE kernels instead of ggml's rounding order.
    let m = random_model(&tiny());
    let d = m.dequantized().unwrap();
    let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
    for (a, b) in plain_logits(&m, &ids).iter().zip(plain_logits(&d, &ids)) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
}

#[test]
fn positions_past_the_context_are_an_error() {
    let cfg = tiny();
    let m = random_model(&cfg);
    let mut pack = Pack::new();
    let root = pack.push_root(40);
    pack.push_child(root, 30);
    let ids = vec![1u32; 70];
    let err = m.forward_packed(&ids, &pack, &[0]).unwrap_err().to_string();
    assert!(err.contains("context length 64"), "{err}");
}
