//! The model learns correctly: the reference's gradients (candle's autograd through
//! `slm_model::Llama`, which the trainer is held to) equal finite differences, and the
//! trainer memorises one batch.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use slm_model::{Arch, Config, Llama, Weights};
use slm_train::init::init_params;
use slm_train::optim::AdamWConfig;
use slm_train::trainer::Trainer;

fn tiny(vocab: usize) -> Config {
    Config {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: None,
        eos_token_id: None,
        head: Default::default(),
    }
}

fn model(cfg: &Config, map: &VarMap, dtype: DType) -> Llama {
    let vb = VarBuilder::from_varmap(map, dtype, &Device::Cpu);
    Llama::load(cfg, &Weights::Vars(vb), &Device::Cpu).unwrap()
}

fn batch(b: usize, t: usize, vocab: u32, seed: u64) -> (Tensor, Tensor) {
    let mut rng = slm_train::init::Rng(seed);
    let toks: Vec<u32> = (0..b * (t + 1))
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let all = Tensor::from_vec(toks, (b, t + 1), &Device::Cpu).unwrap();
    (all.narrow(1, 0, t).unwrap(), all.narrow(1, 1, t).unwrap())
}

fn loss(m: &Llama, x: &Tensor, y: &Tensor) -> Tensor {
    let logits = m.forward(x, None, false).unwrap();
    let v = logits.dim(2).unwrap();
    candle_nn::loss::cross_entropy(&logits.reshape(((), v)).unwrap(), &y.flatten_all().unwrap())
        .unwrap()
}

#[test]
fn gradients_equal_finite_differences() {
    let mut cfg = tiny(11);
    cfg.attention_bias = true; // Qwen2-style biases get checked too
    let map = init_params(&cfg, DType::F64, 1, &Device::Cpu).unwrap();
    // Larger weights than the training init, so every path carries signal.
    for v in map.all_vars() {
        if v.rank() == 2 {
            v.set(&(v.as_tensor() * 10.0).unwrap()).unwrap();
        } else {
            let t = v.as_tensor();
            v.set(&(t + Tensor::rand(-0.3f64, 0.3, t.shape(), &Device::Cpu).unwrap()).unwrap())
                .unwrap();
        }
    }
    let m = model(&cfg, &map, DType::F64);
    let (x, y) = batch(2, 7, 11, 3);
    let l = loss(&m, &x, &y);
    let grads = l.backward().unwrap();
    let data = map.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut checked = 0;
    let mut rng = slm_train::init::Rng(9);
    for name in names {
        let var = &data[name];
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .expect(name)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for _ in 0..3 {
            let i = (rng.next_u64() % orig.len() as u64) as usize;
            let eps = 1e-6;
            let at = |delta: f64| {
                let mut w = orig.clone();
                w[i] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&m, &x, &y).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (numeric - g[i]).abs();
            assert!(
                err <= 1e-7 + 1e-5 * g[i].abs(),
                "{name}[{i}]: backprop {} vs finite difference {numeric}",
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 50);
}

#[test]
fn loss_falls_when_overfitting_one_batch() {
    let cfg = tiny(13);
    let map = init_params(&cfg, DType::F32, 2, &Device::Cpu).unwrap();
    let (b, t) = (4, cfg.max_position_embeddings);
    let mut tr = Trainer::new(
        &cfg,
        b,
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        &map,
    )
    .unwrap();
    let mut rng = slm_train::init::Rng(5);
    let toks: Vec<u32> = (0..b * (t + 1))
        .map(|_| (rng.next_u64() % 13) as u32)
        .collect();
    let first = tr.loss(&toks).unwrap();
    assert!(
        (first - (13f32).ln()).abs() < 0.1,
        "initial loss {first} should be near ln(vocab)"
    );
    let mut last = first;
    for _ in 0..200 {
        tr.zero_grads();
        last = tr.accumulate(&toks, 1.0).unwrap();
        tr.step(1e-2, 1.0);
    }
    assert!(last < 0.2 * first, "loss {first} -> {last}");
}
