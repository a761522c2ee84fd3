//! The model learns correctly: gradients equal finite differences, one batch can be memorised,
//! and AdamW takes the steps its formula gives.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use slm_model::{Arch, Config, Llama, Weights};
use slm_train::init::{decays, init_params};
use slm_train::optim::{AdamW, AdamWConfig};

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
    slm_train::lm_loss(&m.forward(x, None, false).unwrap(), y).unwrap()
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
    let m = model(&cfg, &map, DType::F32);
    let mut opt = AdamW::new(
        &map,
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        decays,
    )
    .unwrap();
    let (x, y) = batch(4, 16, 13, 5);
    let first = loss(&m, &x, &y).to_scalar::<f32>().unwrap();
    assert!(
        (first - (13f32).ln()).abs() < 0.1,
        "initial loss {first} should be near ln(vocab)"
    );
    let mut last = first;
    for _ in 0..200 {
        let l = loss(&m, &x, &y);
        last = l.to_scalar::<f32>().unwrap();
        let g = opt.grads(&l.backward().unwrap());
        opt.step(&g, 1e-2, 1.0).unwrap();
    }
    assert!(last < 0.2 * first, "loss {first} -> {last}");
}

#[test]
fn adamw_takes_the_textbook_steps() {
    // loss = 0.5 * (w + n): gradient 0.5 for both; only w decays. By hand (torch.optim.AdamW,
    // lr 0.1, wd 0.1, betas 0.9/0.95): w 1 -> 0.89 -> 0.7811, n 1 -> 0.9 -> 0.8.
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let w = vb
        .get_with_hints(1, "w", candle_nn::Init::Const(1.0))
        .unwrap();
    let n = vb
        .get_with_hints(1, "n.norm.weight", candle_nn::Init::Const(1.0))
        .unwrap();
    let mut opt = AdamW::new(
        &map,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
        decays,
    )
    .unwrap();
    let mut vals = Vec::new();
    for _ in 0..2 {
        let l = ((&w + &n).unwrap().sum_all().unwrap() * 0.5).unwrap();
        let g = opt.grads(&l.backward().unwrap());
        opt.step(&g, 0.1, 1.0).unwrap();
        let get = |name: &str| {
            map.data().lock().unwrap()[name]
                .as_tensor()
                .to_vec1::<f64>()
                .unwrap()[0]
        };
        vals.push((get("w"), get("n.norm.weight")));
    }
    let close = |a: f64, b: f64| (a - b).abs() < 1e-7;
    assert!(
        close(vals[0].0, 0.89) && close(vals[1].0, 0.7811),
        "{vals:?}"
    );
    assert!(close(vals[0].1, 0.9) && close(vals[1].1, 0.8), "{vals:?}");

    // Saved moments restore the same trajectory.
    let state = opt.state();
    let mut again = AdamW::new(
        &map,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
        decays,
    )
    .unwrap();
    again.load_state(&state, opt.steps()).unwrap();
    assert_eq!(again.steps(), 2);
}

/// The training loss the trainer uses (the output projection fused with cross-entropy) follows
/// the reference path (logits, then cross-entropy) step for step: twenty AdamW updates from
/// the same weights on one batch (memorised, so the loss moves) give the same losses within
/// float tolerance.
#[test]
fn fused_head_loss_trains_like_the_reference() {
    let cfg = tiny(37);
    let run = |fused: bool| -> Vec<f32> {
        let map = init_params(&cfg, DType::F32, 4, &Device::Cpu).unwrap();
        let m = model(&cfg, &map, DType::F32);
        assert!(m.head_weight().is_some(), "a trained model's head is dense");
        let mut opt = AdamW::new(&map, AdamWConfig::default(), decays).unwrap();
        let (x, y) = batch(3, 11, 37, 100);
        (0..20)
            .map(|_| {
                let l = if fused {
                    slm_train::model_loss(&m, &x, &y).unwrap()
                } else {
                    loss(&m, &x, &y)
                };
                let g = opt.grads(&l.backward().unwrap());
                opt.step(&g, 1e-2, 1.0).unwrap();
                l.to_scalar::<f32>().unwrap()
            })
            .collect()
    };
    let (fused, reference) = (run(true), run(false));
    for (i, (a, b)) in fused.iter().zip(&reference).enumerate() {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "step {i}: {a} vs {b}");
    }
    assert!(fused[19] < 0.7 * fused[0], "the loss falls: {fused:?}");
}
