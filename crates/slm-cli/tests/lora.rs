//! LoRA end to end through the `slm` binary: adapters trained over a tiny base model (a
//! causal LM's on token shards, a classifier's on a task file), written in PEFT's layout,
//! merged with `slm lora merge`; PEFT loads each adapter over the base and gives the logits
//! of slm's merged model; bad recipes and adapters are refused by name.
//!
//! The PEFT comparison needs a Python with torch, transformers and peft (`$SLM_PYTHON`);
//! elsewhere it is ignored, and under CI it runs and fails (build-support/test_assets.rs).

use std::path::{Path, PathBuf};

use candle_core::Device;

mod common;
use common::{corpus_tokenizer_shards, fails, losses, ok, slm, train_tiny};

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    lm: PathBuf,
    cls: PathBuf,
}

const LORA: &str = "[lora]\nr = 4\nalpha = 8\ntargets = [\"q\", \"k\", \"v\", \"o_proj\", \"gate\", \"up\", \"down\"]\n";

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        corpus_tokenizer_shards(d);
        let base = train_tiny(d, "base", 2, false);
        std::fs::write(
            d.join("lm_lora.toml"),
            format!(
                "[run]\nout = \"lm_lora\"\n[data]\nshards = \"shards\"\ntokenizer = \"tok.json\"\n\
                 [model]\nparent = \"base/model\"\ncontext = 32\n[budget]\ntokens = 8192\n\
                 [optim]\nbatch = 8\nlr = 1e-2\nwarmup = 2\n{LORA}"
            ),
        )
        .unwrap();
        ok(slm().args(["train", "lm_lora.toml"]).current_dir(d));
        let rows: String = (0..300)
            .map(|i| {
                let (text, label) = match i % 3 {
                    0 => ("the storm under the deep sea", "storm"),
                    1 => ("the captain sailed the ship", "calm"),
                    _ => ("white whale storm", "storm"),
                };
                format!("{}\n", serde_json::json!({"text": text, "label": label}))
            })
            .collect();
        std::fs::write(d.join("cls.jsonl"), rows).unwrap();
        std::fs::write(
            d.join("cls_lora.toml"),
            format!(
                "[run]\nout = \"cls_lora\"\n[data]\ntrain = \"cls.jsonl\"\n[model]\n\
                 parent = \"base/model\"\n[objective]\nkind = \"classify\"\n[budget]\nepochs = 4\n\
                 [optim]\nbatch = 8\nlr = 1e-2\nwarmup = 2\n{LORA}"
            ),
        )
        .unwrap();
        ok(slm().args(["train", "cls_lora.toml"]).current_dir(d));
        for name in ["lm", "cls"] {
            ok(slm()
                .args(["lora", "merge"])
                .arg(&base)
                .arg(format!("{name}_lora/adapter"))
                .args(["-o", &format!("{name}_merged")])
                .current_dir(d));
        }
        Fixture {
            base,
            lm: d.join("lm_merged"),
            cls: d.join("cls_merged"),
            dir,
        }
    })
}

#[test]
fn adapters_are_written_in_peft_layout_merged_and_bad_ones_refused() {
    let f = fixture();
    let d = f.dir.path();
    // The adapter folder: PEFT's files and names, only the adapters (and the head).
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("cls_lora/adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    let st = candle_core::safetensors::load(
        d.join("cls_lora/adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // 2 layers x 7 projections x (A, B), and the head.
    assert_eq!(st.len(), 2 * 7 * 2 + 1, "{:?}", st.keys());
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert!(st.contains_key("base_model.model.score.weight"));
    // The merged models differ from the base (the adapters learnt something) and the
    // classifier classifies.
    let tok = slm_tokenizer::Tokenizer::from_folder(&f.base).unwrap();
    let ids = vec![tok.encode("the white whale sailed", true).unwrap()];
    let (base, lm) = (
        common::model_logits(&f.base, &ids),
        common::model_logits(&f.lm, &ids),
    );
    let moved = base[0]
        .iter()
        .flatten()
        .zip(lm[0].iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 1e-3, "the LM adapter changed nothing ({moved})");
    std::fs::write(
        d.join("cls_test.jsonl"),
        "{\"text\": \"the storm under the deep sea\", \"label\": \"storm\"}\n\
         {\"text\": \"the captain sailed the ship\", \"label\": \"calm\"}\n",
    )
    .unwrap();
    ok(slm()
        .arg("eval")
        .arg(&f.cls)
        .args(["--task", "classify:cls_test.jsonl", "--out", "cls.json"])
        .current_dir(d));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("cls.json")).unwrap()).unwrap();
    assert_eq!(r["tasks"][0]["metrics"]["acc"]["value"], 1.0);

    // The LM adapter as llama.cpp's LoRA GGUF: its keys, and A and B under llama.cpp's
    // names (B's q and k rows in GGUF's rotary order, as the base's q and k are).
    ok(slm()
        .args([
            "export",
            "lm_lora/adapter",
            "--format",
            "gguf",
            "-o",
            "lora.gguf",
        ])
        .current_dir(d));
    let g = slm_model::GgufFile::open(d.join("lora.gguf")).unwrap();
    assert_eq!(g.get_str("general.type").unwrap(), Some("adapter"));
    assert_eq!(g.get_str("adapter.type").unwrap(), Some("lora"));
    assert_eq!(g.get_f64("adapter.lora.alpha").unwrap(), Some(8.0));
    assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
    let st = candle_core::safetensors::load(
        d.join("lm_lora/adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(g.tensors.len(), st.len());
    let values = |name: &str| -> Vec<f32> {
        let info = g.tensor_info(name).unwrap();
        g.tensor_bytes(info)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let peft = |name: &str| -> Vec<f32> { st[name].flatten_all().unwrap().to_vec1().unwrap() };
    assert_eq!(
        g.tensor_info("blk.1.ffn_down.weight.lora_a").unwrap().dims,
        [4, 96]
    );
    assert_eq!(
        values("blk.1.ffn_down.weight.lora_a"),
        peft("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
    );
    assert_eq!(
        values("blk.0.attn_v.weight.lora_b"),
        peft("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    );
    // q's B: 4 heads of 16 rows, each head's halves interleaved (row 2j + s from s*8 + j).
    let (ours, theirs) = (
        values("blk.0.attn_q.weight.lora_b"),
        peft("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
    );
    for h in 0..4 {
        for j in 0..8 {
            for s in 0..2 {
                let (g_row, hf_row) = (h * 16 + 2 * j + s, h * 16 + s * 8 + j);
                assert_eq!(
                    ours[g_row * 4..g_row * 4 + 4],
                    theirs[hf_row * 4..hf_row * 4 + 4]
                );
            }
        }
    }
    let e = fails(
        slm()
            .args([
                "export",
                "cls_lora/adapter",
                "--format",
                "gguf",
                "-o",
                "cls.gguf",
            ])
            .current_dir(d),
    );
    assert!(
        e.contains("sequence-classification head") && e.contains("slm lora merge"),
        "{e}"
    );

    // Bad input.
    let recipe = std::fs::read_to_string(d.join("cls_lora.toml")).unwrap();
    std::fs::write(
        d.join("bad_target.toml"),
        recipe.replace("\"down\"]", "\"qkv_proj\"]"),
    )
    .unwrap();
    let e = fails(slm().args(["train", "bad_target.toml"]).current_dir(d));
    assert!(
        e.contains("lora.targets") && e.contains("qkv_proj") && e.contains("no projection"),
        "{e}"
    );
    std::fs::write(
        d.join("bad_dropout.toml"),
        recipe.replace("alpha = 8", "alpha = 8\ndropout = 1.0"),
    )
    .unwrap();
    let e = fails(slm().args(["train", "bad_dropout.toml"]).current_dir(d));
    assert!(
        e.contains("lora.dropout = 1") && e.contains("0 <= dropout < 1"),
        "{e}"
    );
    let e = fails(
        slm()
            .args(["lora", "merge"])
            .arg(&f.base)
            .arg("lm_lora/adapter")
            .args(["-o", "lm_merged"])
            .current_dir(d),
    );
    assert!(e.contains("already exists"), "{e}");
    // An adapter whose tensors do not fit the base.
    let other = train_tiny(d, "other", 1, true);
    let e = fails(
        slm()
            .args(["lora", "merge"])
            .arg(&other)
            .arg("lm_lora/adapter")
            .args(["-o", "mismatch"])
            .current_dir(d),
    );
    assert!(e.contains("has shape") && e.contains("lora_"), "{e}");
    assert!(!d.join("mismatch").exists());
    // A GGUF parent that is not there, and one whose RoPE scaling (llama3's rope_freqs
    // tensor) training does not apply.
    std::fs::write(
        d.join("missing_parent.toml"),
        recipe.replace("parent = \"base/model\"", "parent = \"nowhere.gguf\""),
    )
    .unwrap();
    let e = fails(slm().args(["train", "missing_parent.toml"]).current_dir(d));
    assert!(e.contains("nowhere.gguf"), "{e}");
    ok(slm()
        .arg("export")
        .arg(&f.base)
        .args(["--format", "gguf", "-o", "base.gguf"])
        .current_dir(d));
    let g = slm_model::GgufFile::open(d.join("base.gguf")).unwrap();
    let freqs = vec![0u8; 4 * 8];
    let tensors: Vec<slm_model::gguf_write::TensorOut> = g
        .tensors
        .iter()
        .map(|t| slm_model::gguf_write::TensorOut {
            name: &t.name,
            dims: &t.dims,
            dtype: t.dtype,
            data: g.tensor_bytes(t),
        })
        .chain([slm_model::gguf_write::TensorOut {
            name: "rope_freqs.weight",
            dims: &[8],
            dtype: slm_model::gguf::GgmlType::F32,
            data: &freqs,
        }])
        .collect();
    slm_model::gguf_write::write_gguf(&d.join("scaled.gguf"), &g.metadata, &tensors).unwrap();
    std::fs::write(
        d.join("scaled_parent.toml"),
        recipe.replace("parent = \"base/model\"", "parent = \"scaled.gguf\""),
    )
    .unwrap();
    let e = fails(slm().args(["train", "scaled_parent.toml"]).current_dir(d));
    assert!(
        e.contains("scaled.gguf") && e.contains("rope_freqs.weight"),
        "{e}"
    );
}

/// A LoRA run with adapter dropout, stopped after a checkpoint and resumed, computes the
/// losses of the unbroken run, to the bit: the checkpoint holds the adapters and their moments
/// (not the frozen base, which is the parent's), and the dropout masks follow the update count.
#[test]
fn a_resumed_lora_run_with_dropout_matches_the_unbroken_one() {
    let f = fixture();
    let d = f.dir.path();
    let recipe = std::fs::read_to_string(d.join("lm_lora.toml"))
        .unwrap()
        .replace("out = \"lm_lora\"", "out = \"resumed\"")
        .replace("alpha = 8", "alpha = 8\ndropout = 0.2")
        .replace("[lora]", "[checkpoint]\ninterval = 8\nkeep = 10\n[lora]");
    std::fs::write(d.join("resumed.toml"), recipe).unwrap();
    ok(slm().args(["train", "resumed.toml"]).current_dir(d));
    let run = d.join("resumed");
    let want = losses(&run);
    assert_eq!(want.len(), 32);
    // What a checkpoint of a LoRA run holds: the adapters, not the base.
    let ck = run.join("checkpoints/step-00000016");
    let st = candle_core::safetensors::load(ck.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(st.len(), 2 * 7 * 2, "{:?}", st.keys());
    assert!(st.keys().all(|k| k.contains(".lora_")), "{:?}", st.keys());
    for late in ["step-00000024", "step-00000032"] {
        std::fs::remove_dir_all(run.join("checkpoints").join(late)).unwrap();
    }
    std::fs::remove_dir_all(run.join("adapter")).unwrap();
    ok(slm()
        .args(["train", "resumed.toml", "--resume"])
        .current_dir(d));
    assert_eq!(losses(&run), want);
    // Without dropout the losses differ: the masks did drop.
    assert_ne!(want, losses(&d.join("lm_lora")));
}

#[test]
#[cfg_attr(
    not(python_peft),
    ignore = "needs a Python with torch, transformers and peft in $SLM_PYTHON (.ci/run makes one)"
)]
fn peft_loads_the_adapters_with_the_merged_models_logits() {
    let f = fixture();
    let d = f.dir.path();
    let py = common::python_with("torch, transformers, peft");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hf_peft.py");
    let tok = slm_tokenizer::Tokenizer::from_folder(&f.base).unwrap();
    let rows: Vec<Vec<u32>> = ["the white whale sailed under the storm", "deep sea captain"]
        .iter()
        .map(|t| tok.encode(t, true).unwrap())
        .collect();
    for (name, merged, per_row) in [("lm", &f.lm, false), ("cls", &f.cls, true)] {
        let adapter = d.join(format!("{name}_lora/adapter"));
        let out = common::run_python(
            &py,
            script.to_str().unwrap(),
            &[
                f.base.to_str().unwrap(),
                adapter.to_str().unwrap(),
                &serde_json::to_string(&rows).unwrap(),
            ],
        );
        let peft: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let theirs: Vec<f32> = peft["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                let r = r.as_array().unwrap().clone();
                if per_row {
                    r
                } else {
                    r.iter()
                        .flat_map(|x| x.as_array().unwrap().clone())
                        .collect()
                }
            })
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let ours: Vec<f32> = common::model_logits(merged, &rows)
            .into_iter()
            .flat_map(|r| {
                if per_row {
                    r.last().unwrap().clone()
                } else {
                    r.concat()
                }
            })
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let worst = ours
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let spread = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("{name}: PEFT vs slm's merged model, max |logit difference| {worst:e} (logits up to {spread})");
        assert!(spread > 0.5, "{name}: logits too flat ({spread})");
        // The issue's bound: PEFT's unmerged forward against slm's merged weights, f32.
        assert!(worst < 1e-4, "{name}: logits differ by {worst}");
    }
}
