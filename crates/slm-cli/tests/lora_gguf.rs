//! LoRA over a quantized GGUF base (SmolLM2-135M-Instruct, Q4_1): the run keeps the file's
//! projections in their blocks, and its adapter is the one a run over the file's Hugging Face
//! export trains, byte for byte; `slm lora merge` over the GGUF file itself gives PEFT's
//! merge_and_unload over the export weight for weight, and logits as close to exact (float64)
//! as PEFT's own.
//!
//! Needs the fetched model (`../shared/fetch-assets.sh models`), and for the PEFT check a
//! Python with torch, transformers and peft (`$SLM_PYTHON`); elsewhere they are ignored, and
//! under CI they run and fail (build-support/test_assets.rs).

use std::path::{Path, PathBuf};

mod common;
use common::{ok, slm};

struct Fixture {
    dir: tempfile::TempDir,
    gguf: PathBuf,
    /// The GGUF's Hugging Face export.
    hf: PathBuf,
    /// The adapters trained over each, and the GGUF run's log.
    over_gguf: PathBuf,
    over_hf: PathBuf,
    log: String,
}

fn recipe(d: &Path, name: &str, parent: &Path) -> PathBuf {
    let path = d.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[run]
out = "{name}"
seed = 3
[data]
train = "chat.jsonl"
valid_fraction = 0.2
[model]
parent = "{}"
[objective]
kind = "sft"
[budget]
tokens = 1200
[optim]
batch = 4
lr = 1e-3
warmup = 2
[eval]
interval = 3
[lora]
r = 4
alpha = 8
dropout = 0.1
targets = ["q", "k", "v", "o", "gate", "up", "down"]
"#,
            parent.display()
        ),
    )
    .unwrap();
    path
}

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let gguf = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let words = ["red", "blue", "green", "sea", "whale", "storm"];
        let rows: String = (0..20)
            .map(|i| {
                let (w, n) = (words[i % words.len()], 2 + i % 5);
                let m = serde_json::json!({"messages": [
                    {"role": "user", "content": format!("Say {w} {n} times.")},
                    {"role": "assistant", "content": vec![w; n].join(" ")},
                ]});
                format!("{m}\n")
            })
            .collect();
        std::fs::write(d.join("chat.jsonl"), rows).unwrap();
        ok(slm()
            .arg("export")
            .arg(&gguf)
            .args(["--format", "hf", "-o", "hf"])
            .current_dir(d));
        let out = slm()
            .arg("train")
            .arg(recipe(d, "over_gguf", &gguf))
            .env("SLM_LOG", "info")
            .current_dir(d)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{log}");
        ok(slm()
            .arg("train")
            .arg(recipe(d, "over_hf", &d.join("hf")))
            .current_dir(d));
        Fixture {
            gguf,
            hf: d.join("hf"),
            over_gguf: d.join("over_gguf/adapter"),
            over_hf: d.join("over_hf/adapter"),
            log,
            dir,
        }
    })
}

#[test]
#[cfg_attr(
    not(smollm2_q4_1),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf (../shared/fetch-assets.sh models)"
)]
fn lora_over_the_q4_1_file_keeps_its_blocks_and_trains_as_over_its_export() {
    let f = fixture();
    // 30 layers x 7 projections in blocks, none widened into variables.
    assert!(
        f.log
            .contains("210 of the parent's projections stay in their GGUF blocks"),
        "{}",
        f.log
    );
    let file = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (a, b) = (file(&f.over_gguf), file(&f.over_hf));
    assert!(
        a == b,
        "the adapters trained over the GGUF and over its export differ"
    );
    let st = candle_core::safetensors::load(
        f.over_gguf.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(st.len(), 30 * 7 * 2);
    // The adapters learnt something (B starts at zero).
    let b = st["base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(b > 0.0, "B did not move");
    let slm_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.over_gguf.join("slm.json")).unwrap())
            .unwrap();
    assert_eq!(slm_json["parent"], f.gguf.display().to_string());
}

#[test]
#[cfg_attr(
    not(all(smollm2_q4_1, python_peft)),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf and a Python with torch, transformers and peft in $SLM_PYTHON"
)]
fn peft_over_the_export_gives_the_logits_of_the_merge_over_the_gguf() {
    let f = fixture();
    let d = f.dir.path();
    ok(slm()
        .args(["lora", "merge"])
        .arg(&f.gguf)
        .arg(&f.over_gguf)
        .args(["-o", "merged"])
        .current_dir(d));
    let tok = slm_tokenizer::Tokenizer::from_folder(&f.hf).unwrap();
    let rows: Vec<Vec<u32>> = ["Say whale 3 times.", "The storm over the sea"]
        .iter()
        .map(|t| tok.encode(t, true).unwrap())
        .collect();
    let py = common::python_with("torch, transformers, peft");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hf_peft.py");
    let out = common::run_python(
        &py,
        script.to_str().unwrap(),
        &[
            f.hf.to_str().unwrap(),
            f.over_gguf.to_str().unwrap(),
            &serde_json::to_string(&rows).unwrap(),
            d.join("merged").to_str().unwrap(),
        ],
    );
    let peft: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // slm's merge is PEFT's merge_and_unload, weight for weight.
    assert_eq!(peft["merge_diff"], 0.0, "PEFT merges to other weights");
    let flat = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter())
            .flat_map(|p| p.as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (theirs, exact) = (flat(&peft["logits"]), flat(&peft["logits_f64"]));
    let ours: Vec<f64> = common::model_logits(&d.join("merged"), &rows)
        .into_iter()
        .flatten()
        .flatten()
        .map(f64::from)
        .collect();
    assert_eq!(ours.len(), theirs.len());
    let worst = |a: &[f64], b: &[f64]| a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    let spread = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
    let (slm_peft, slm_err, peft_err) = (
        worst(&ours, &theirs),
        worst(&ours, &exact),
        worst(&theirs, &exact),
    );
    eprintln!(
        "max |logit difference| (logits up to {spread:.1}): slm's merge vs PEFT {slm_peft:e}; \
         against the merged model in f64: slm {slm_err:e}, PEFT {peft_err:e}"
    );
    // The issue asks for 1e-4 between the two; lora.rs holds that over a 2-layer model. Over
    // these 30 layers each float32 forward alone is about that far from the exact logits
    // (measured: slm 1.1e-4, PEFT 1.3e-4, so 1.8e-4 apart), so the bound here is on slm's own
    // error: no larger than PEFT's, with room for a different draw of the same rounding
    // (the ratio measured is 0.9).
    assert!(
        slm_err <= 1.5 * peft_err,
        "slm's logits are {slm_err} from the exact ones, PEFT's {peft_err}"
    );
}
