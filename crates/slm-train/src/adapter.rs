//! LoRA adapters in PEFT's layout: a folder with `adapter_config.json` and
//! `adapter_model.safetensors` (tensors named `base_model.model.<module>.lora_A.weight` /
//! `lora_B.weight`, a classifier's head saved whole as `base_model.model.score.*`), which
//! `peft.PeftModel.from_pretrained` loads over the base model; and merging one into its base
//! (W + alpha/r · B·A) as a plain model folder.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use slm_model::{Config, Head, Role};

use crate::init::Rng;
use crate::run::{io, Result, TrainError};
use crate::trainer::LoraConfig;

fn setup(msg: String) -> TrainError {
    TrainError::Setup(msg)
}

/// Fresh adapters in `vars`, as PEFT starts them: A uniform in ±1/√(inputs) (its
/// kaiming_uniform with a = √5), B zero, so the adapted model starts as the base.
pub fn init(vars: &VarMap, cfg: &Config, lora: &LoraConfig, seed: u64) -> Result<()> {
    let mut rng = Rng(seed ^ 0x10ea_10ea);
    let mut data = vars.data().lock().expect("var map lock");
    for p in cfg.lora_params(lora.rank, &lora.targets) {
        let values: Vec<f32> = match p.role {
            Role::LoraA => {
                let bound = 1.0 / (p.shape[1] as f64).sqrt();
                (0..p.len())
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            }
            _ => vec![0.0; p.len()],
        };
        let t = Tensor::from_vec(values, p.shape.as_slice(), &Device::Cpu)?;
        data.insert(p.name(), Var::from_tensor(&t)?);
    }
    Ok(())
}

/// PEFT's task type for a head.
fn task_type(head: &Head) -> &'static str {
    match head {
        Head::Lm => "CAUSAL_LM",
        Head::Sequence { .. } => "SEQ_CLS",
        Head::Token { .. } => "TOKEN_CLS",
    }
}

/// The head's tensors as PEFT saves a module to save.
fn head_names(cfg: &Config) -> Vec<(String, String)> {
    cfg.params()
        .into_iter()
        .filter(|p| matches!(p.role, Role::Score | Role::ScoreBias))
        .map(|p| (p.name(), format!("base_model.model.{}", p.name())))
        .collect()
}

/// Writes the adapter folder `dir` (a new folder, renamed into place whole) from `vars`.
pub fn write(
    dir: &Path,
    cfg: &Config,
    lora: &LoraConfig,
    vars: &VarMap,
    parent: &Path,
    slm: serde_json::Value,
) -> Result<PathBuf> {
    let tmp = dir.with_file_name(format!(
        ".{}.tmp",
        dir.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("adapter")
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let data = vars.data().lock().expect("var map lock");
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for p in cfg.lora_params(lora.rank, &lora.targets) {
        let v = data
            .get(&p.name())
            .ok_or_else(|| setup(format!("no adapter tensor {}", p.name())))?;
        tensors.insert(p.name(), v.as_tensor().to_dtype(DType::F32)?);
    }
    for (ours, peft) in head_names(cfg) {
        let v = data
            .get(&ours)
            .ok_or_else(|| setup(format!("no head tensor {ours}")))?;
        tensors.insert(peft, v.as_tensor().to_dtype(DType::F32)?);
    }
    drop(data);
    let modules: Vec<&str> = Role::LORA_TARGETS
        .iter()
        .filter(|(r, _)| lora.targets.contains(r))
        .map(|t| t.1)
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type(&cfg.head),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": if cfg.head == Head::Lm { serde_json::Value::Null } else { serde_json::json!(["score"]) },
        "base_model_name_or_path": parent.canonicalize().unwrap_or(parent.to_path_buf()).display().to_string(),
    });
    let mut slm = slm;
    slm["config"] = cfg.to_hf_json();
    for (name, bytes) in [
        (
            "adapter_config.json",
            serde_json::to_vec_pretty(&config).expect("json"),
        ),
        ("slm.json", serde_json::to_vec_pretty(&slm).expect("json")),
    ] {
        let p = tmp.join(name);
        std::fs::File::create(&p)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .map_err(io(&p))?;
    }
    let st = tmp.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &st)?;
    std::fs::File::open(&st)
        .and_then(|f| f.sync_all())
        .map_err(io(&st))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    Ok(dir.to_path_buf())
}

/// An adapter folder as read back: its settings and tensors, and the model configuration
/// (the base's, with the head the adapter was trained with).
pub struct Adapter {
    pub lora: LoraConfig,
    pub tensors: HashMap<String, Tensor>,
    pub config: Config,
}

/// Reads `dir` (PEFT's layout) for the base model `base` (a folder or a GGUF file): the
/// config's rank, alpha and target modules, every tensor they imply at the shape the base
/// implies, and no other.
pub fn read(dir: &Path, base: &Path) -> Result<Adapter> {
    read_over(dir, crate::parent::config_of(base)?)
}

/// `read` for a base whose configuration is `config`.
fn read_over(dir: &Path, mut config: Config) -> Result<Adapter> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let name = cfg_path.display().to_string();
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| setup(format!("{name}: {e}")))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    if field("peft_type").and_then(|x| x.as_str()) != Some("LORA") {
        return Err(setup(format!("{name}: peft_type is not LORA")));
    }
    let rank = field("r")
        .and_then(|x| x.as_u64())
        .filter(|&r| r > 0 && r <= 1 << 16)
        .ok_or_else(|| setup(format!("{name}: r must be an integer from 1 to 65536")))?
        as usize;
    let alpha = field("lora_alpha")
        .and_then(|x| x.as_f64())
        .filter(|a| a.is_finite() && *a > 0.0)
        .ok_or_else(|| setup(format!("{name}: lora_alpha must be a positive number")))?;
    for (k, ok) in [
        ("use_rslora", false),
        ("use_dora", false),
        ("fan_in_fan_out", false),
    ] {
        if field(k).and_then(|x| x.as_bool()).unwrap_or(ok) != ok {
            return Err(setup(format!("{name}: {k} = true is not supported")));
        }
    }
    let modules: Vec<String> = field("target_modules")
        .and_then(|x| x.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str().map(str::to_string))
                .collect()
        })
        .ok_or_else(|| {
            setup(format!(
                "{name}: target_modules must be a list of module names"
            ))
        })?;
    let mut targets = Vec::new();
    for m in &modules {
        match Role::LORA_TARGETS.iter().find(|t| t.1 == m) {
            Some(t) => targets.push(t.0),
            None => {
                return Err(setup(format!(
                    "{name}: target module {m:?} is not one slm adapts ({:?})",
                    Role::LORA_TARGETS.iter().map(|t| t.1).collect::<Vec<_>>()
                )))
            }
        }
    }
    // The head: as slm wrote it (slm.json), or labels named by position for an adapter made
    // elsewhere with a score module.
    let st = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu)
        .map_err(|e| setup(format!("{}: {e}", st.display())))?;
    let slm_head = std::fs::read_to_string(dir.join("slm.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| serde_json::to_string(&v["config"]).ok())
        .and_then(|t| Config::from_hf_json(&t, "slm.json").ok())
        .map(|c| c.head);
    let task = field("task_type")
        .and_then(|x| x.as_str())
        .unwrap_or("CAUSAL_LM");
    config.head = match (task, slm_head) {
        ("CAUSAL_LM", _) => Head::Lm,
        (_, Some(h)) if h != Head::Lm => h,
        ("SEQ_CLS" | "TOKEN_CLS", None | Some(Head::Lm)) => {
            let w = tensors
                .get("base_model.model.score.weight")
                .ok_or_else(|| {
                    setup(format!(
                        "{}: a {task} adapter without score.weight",
                        st.display()
                    ))
                })?;
            let labels = (0..w.dim(0)?).map(|i| format!("LABEL_{i}")).collect();
            if task == "SEQ_CLS" {
                Head::Sequence {
                    labels,
                    pad_token_id: config.eos_token_id,
                }
            } else {
                Head::Token {
                    labels,
                    echo: false,
                }
            }
        }
        (other, _) => return Err(setup(format!("{name}: task_type {other} is not supported"))),
    };
    config.validate(&name).map_err(|e| setup(e.to_string()))?;
    let mut want: HashMap<String, Vec<usize>> = config
        .lora_params(rank, &targets)
        .into_iter()
        .map(|p| (p.name(), p.shape))
        .collect();
    for p in config.params() {
        if matches!(p.role, Role::Score | Role::ScoreBias) {
            want.insert(format!("base_model.model.{}", p.name()), p.shape);
        }
    }
    for (k, shape) in &want {
        let t = tensors
            .get(k)
            .ok_or_else(|| setup(format!("{}: no tensor {k}", st.display())))?;
        if t.dims() != shape.as_slice() {
            return Err(setup(format!(
                "{}: {k} has shape {:?}, the base model implies {shape:?}",
                st.display(),
                t.dims()
            )));
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !want.contains_key(*k)) {
        return Err(setup(format!(
            "{}: tensor {extra} is not part of a LoRA adapter over {:?}",
            st.display(),
            modules
        )));
    }
    Ok(Adapter {
        lora: LoraConfig {
            rank,
            alpha,
            targets,
            // Inference does not drop; the value is the training run's.
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
        },
        tensors,
        config,
    })
}

/// `slm lora merge`: the base's weights (a folder, or a GGUF file widened to f32) with every
/// adapter folded in (W + alpha/r · B·A, in f32) and the adapter's head, written as a model
/// folder `out` (a new folder, renamed into place whole) with the base's tokenizer files.
pub fn merge(base: &Path, adapter_dir: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        return Err(setup(format!(
            "{}: already exists; merge into a new folder",
            out.display()
        )));
    }
    let parent = crate::parent::Parent::open(base)?;
    let adapter = read_over(adapter_dir, parent.cfg.clone())?;
    let mut weights = parent.weights(|_| true)?;
    let cfg = &adapter.config;
    let scale = adapter.lora.alpha / adapter.lora.rank as f64;
    let lp = cfg.lora_params(adapter.lora.rank, &adapter.lora.targets);
    for pair in lp.chunks(2) {
        let (a, b) = (
            &adapter.tensors[&pair[0].name()],
            &adapter.tensors[&pair[1].name()],
        );
        let name = pair[0].target.expect("adapter").hf_name(pair[0].layer);
        let w = weights
            .get(&name)
            .ok_or_else(|| setup(format!("{}: no tensor {name}", base.display())))?;
        let merged = (w + (b.matmul(a)? * scale)?)?;
        weights.insert(name, merged);
    }
    // The merged model holds exactly the tensors its configuration lists.
    let mut kept: HashMap<String, Tensor> = HashMap::new();
    for p in cfg.params() {
        let t = match p.role {
            Role::Score | Role::ScoreBias => {
                adapter.tensors[&format!("base_model.model.{}", p.name())].clone()
            }
            _ => weights
                .get(&p.name())
                .ok_or_else(|| setup(format!("{}: no tensor {}", base.display(), p.name())))?
                .clone(),
        };
        kept.insert(p.name(), t);
    }
    let tmp = out.with_file_name(format!(
        ".{}.tmp",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("merged")
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut config = cfg.to_hf_json();
    config["torch_dtype"] = "float32".into();
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .map_err(io(&tmp))?;
    for (f, bytes) in parent.tokenizer_files() {
        std::fs::write(tmp.join(f), bytes).map_err(io(&tmp.join(f)))?;
    }
    if base.join("special_tokens_map.json").is_file() {
        let f = "special_tokens_map.json";
        std::fs::copy(base.join(f), tmp.join(f)).map_err(io(&base.join(f)))?;
    }
    candle_core::safetensors::save(&kept, tmp.join("model.safetensors"))?;
    for e in std::fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
        std::fs::File::open(e.path())
            .and_then(|f| f.sync_all())
            .map_err(io(&e.path()))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(())
}
