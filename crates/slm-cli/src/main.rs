//! The `slm` command: one subcommand per pipeline stage, thin over the crates.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use slm_model::{LoadedModel, ModelSource};
use slm_runtime::{generate, GenerateOptions, SamplingParams, Session};
use slm_tokenizer::{Message, Tokenizer};

#[derive(Parser)]
#[command(
    name = "slm",
    version,
    about = "Build and run small language models locally"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, size, quantization, context, tokenizer and chat template of a model.
    Info { model: PathBuf },
    /// One completion of a prompt, streamed to stdout.
    Generate {
        model: PathBuf,
        #[arg(short, long)]
        prompt: String,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Interactive multi-turn chat (/reset clears the conversation, Ctrl-C stops a reply).
    Chat {
        model: PathBuf,
        /// System prompt (default: the template's own).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Serve models over HTTP: OpenAI's API (/v1/chat/completions, /v1/completions,
    /// /v1/embeddings, /v1/models), /tokenize, /detokenize, /health, /metrics and a chat page
    /// at /. Binds 127.0.0.1 unless told otherwise.
    Serve {
        /// Generative models (GGUF files or model folders), chosen by the request's `model`
        /// (the file or folder name without .gguf).
        #[arg(required_unless_present = "embed")]
        models: Vec<PathBuf>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Require `Authorization: Bearer KEY` on the API.
        #[arg(long, conflicts_with = "api_key_file")]
        api_key: Option<String>,
        /// Read the API key from a file (keeps it out of the process list).
        #[arg(long)]
        api_key_file: Option<PathBuf>,
        /// Sequences generated at once per model (continuous batching).
        #[arg(long, default_value_t = 4, value_parser = parallel_arg)]
        parallel: usize,
        /// Context (positions) per sequence; at most the model's own.
        #[arg(long, default_value_t = 4096, value_parser = ctx_arg)]
        ctx: usize,
        /// Requests that may wait for a place in the batch, per model; more get 429.
        #[arg(long, default_value_t = 256)]
        queue: usize,
        /// Serve Prometheus metrics at /metrics.
        #[arg(long)]
        metrics: bool,
        /// Allow browser pages of this origin (e.g. http://localhost:3000) to call the API.
        #[arg(long)]
        cors: Option<String>,
        /// Sentence-embedding models (sentence-transformers folders) for /v1/embeddings.
        #[arg(long)]
        embed: Vec<PathBuf>,
        /// Largest request body in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        max_body: usize,
        /// Seconds one request may generate before it ends with finish_reason "length".
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[arg(long, value_parser = threads_arg)]
        threads: Option<usize>,
    },
    /// Evaluate a model: --task choice:FILE.jsonl (multiple choice by log-likelihood, as
    /// lm-evaluation-harness), classify:FILE.jsonl (with the model's classification head:
    /// accuracy, macro-F1, confusion matrix; zero-shot through label choices for a language
    /// model), tag:FILE.jsonl (entity precision/recall/F1 by seqeval's rules, with a
    /// token-classification head), perplexity:FILE (llama-perplexity's method), or --suite core.
    Eval {
        model: PathBuf,
        /// KIND:FILE (repeatable).
        #[arg(long, required_unless_present = "suite")]
        task: Vec<String>,
        /// A named set of tasks: core (HellaSwag, ARC-Easy, PIQA, BoolQ, SST-2, RTE).
        #[arg(long)]
        suite: Option<String>,
        /// Folder with the suite's files (default: $SLM_EVALS).
        #[arg(long)]
        evals: Option<PathBuf>,
        /// Only the first N documents of each task (N windows for perplexity).
        #[arg(long, value_parser = positive)]
        limit: Option<usize>,
        /// Solved examples from the same file before each question.
        #[arg(long, default_value_t = 0)]
        shots: usize,
        /// Window length for perplexity.
        #[arg(long, default_value_t = 512, value_parser = positive)]
        ctx: usize,
        /// Prompt for classify files: {text} or {premise} and {hypothesis}, and {labels}.
        #[arg(long)]
        prompt: Option<String>,
        /// Write metrics, standard errors, model lineage and timings here (JSON).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Tokens per packed forward pass (larger: bigger matmuls, more memory).
        #[arg(long, default_value_t = 2048, value_parser = positive)]
        batch_tokens: usize,
        #[arg(long, value_parser = threads_arg)]
        threads: Option<usize>,
    },
    /// Label a file with a model's classification head: each {"text"} (or premise and
    /// hypothesis) row gets its label and the probabilities of all labels, each {"tokens"}
    /// row its tags, written as JSON Lines.
    Predict {
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// LoRA adapters: `slm lora merge BASE ADAPTER -o DIR` folds an adapter (PEFT's layout, as
    /// a `[lora]` training run writes it) into its base (a model folder, or the GGUF file it
    /// was trained over, widened to f32), written as a model folder.
    Lora {
        #[command(subcommand)]
        cmd: LoraCmd,
    },
    /// Knowledge distillation: `slm distill cache TEACHER --data SHARDS --top-k 64 -o DIR`
    /// computes the teacher's targets once for a recipe's `[teacher] cache = DIR`.
    Distill {
        #[command(subcommand)]
        cmd: DistillCmd,
    },
    /// Synthetic training text: N distinct documents sampled from TEACHER, continuing the
    /// prompts of a JSON Lines file ({"prompt": ...}) in turn, several at once; written as
    /// {"text", "index", "prompt"} lines that `slm data prepare` reads, with the settings and
    /// the teacher's sha256 in OUT.synth.json. Rerun the same command to continue.
    Synth {
        teacher: PathBuf,
        #[arg(long)]
        prompts: PathBuf,
        #[arg(short)]
        n: usize,
        #[arg(long, default_value_t = 0.8)]
        temp: f32,
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Render each prompt as a user turn with the teacher's chat template.
        #[arg(long)]
        chat: bool,
        /// Keep the prompt in front of each document (openings); default: the reply alone.
        #[arg(long)]
        keep_prompt: bool,
        /// Documents generated at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// An HTML report comparing results files: tables, bar and line charts.
    Report {
        #[arg(required = true)]
        results: Vec<PathBuf>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Download a model from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN) into the store
    /// ($SLM_HOME, default ~/.cache/slm); resumes interrupted downloads, verifies checksums.
    Pull {
        /// Repository id, OWNER/NAME.
        repo: String,
        /// One file of the repository (e.g. a GGUF file among several).
        #[arg(long)]
        file: Option<String>,
        /// Branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
    },
    /// Rewrite a model for other tools: a GGUF file as a Hugging Face folder (config.json,
    /// model.safetensors, tokenizer.json, tokenizer_config.json with the chat template) that
    /// transformers loads, a Hugging Face folder as a GGUF file that llama.cpp runs, or a LoRA
    /// adapter folder as the LoRA GGUF llama.cpp's --lora loads.
    Export {
        model: PathBuf,
        /// hf (from a GGUF file) or gguf (from a Hugging Face folder).
        #[arg(long, value_parser = ["hf", "gguf"])]
        format: String,
        /// Weight type: f32, f16 or bf16.
        #[arg(long = "type", default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
        ty: String,
        /// The folder (hf, must not exist) or file (gguf) to write.
        #[arg(short, long)]
        output: PathBuf,
        /// For a LoRA adapter folder: its base model folder (default: the adapter's
        /// base_model_name_or_path).
        #[arg(long)]
        base: Option<PathBuf>,
    },
    /// Quantize a model's weight matrices as llama-quantize does (the same types per tensor,
    /// the same bytes): a float type, a legacy block type, or a K-quant mix. MODEL is a GGUF
    /// file (F32/F16/BF16) or a Hugging Face folder.
    Quantize {
        model: PathBuf,
        #[arg(long = "type", value_parser = clap::builder::PossibleValuesParser::new(
            slm_compress::quantize::FileType::names()
        ))]
        ty: String,
        #[arg(short, long)]
        output: PathBuf,
        /// Importance matrix (`slm imatrix` or llama-imatrix) to weigh the quantization errors.
        #[arg(long)]
        imatrix: Option<PathBuf>,
        /// Quantize weights that are already quantized (dequantized first; the errors add).
        #[arg(long)]
        allow_requantize: bool,
        /// Every weight matrix in the type itself: no mix, no fallback for rows that are not
        /// whole blocks (those are refused).
        #[arg(long)]
        pure: bool,
    },
    /// An importance matrix of a model over calibration text, in llama-imatrix's format and
    /// by its method, for `slm quantize --imatrix`.
    Imatrix {
        model: PathBuf,
        /// Calibration text (plain UTF-8).
        #[arg(long)]
        calib: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// At most N windows of the text (default: all).
        #[arg(long, value_parser = positive)]
        chunks: Option<usize>,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512, value_parser = positive)]
        ctx: usize,
    },
    /// Tokenizers: `slm tokenizer train CORPUS... --vocab 8192 -o tokenizer.json`.
    Tokenizer {
        #[command(subcommand)]
        cmd: TokenizerCmd,
    },
    /// Training data: `slm data prepare CORPUS... --tokenizer T -o SHARDS`.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Train a model from a recipe (TOML); Ctrl-C checkpoints and stops, --resume continues.
    Train {
        recipe: PathBuf,
        /// Continue from the run folder's last checkpoint.
        #[arg(long)]
        resume: bool,
    },
    /// The end-to-end demo: train a tokenizer and a ~5M-parameter model on public-domain text
    /// for a fixed time, then report held-out perplexity and sample text.
    Quickstart {
        /// Training time budget.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder for the tokenizer, shards, run and model (must not exist yet).
        #[arg(long, default_value = "runs/quickstart")]
        out: PathBuf,
        /// Corpus instead of the fetched one (or the bundled fallback).
        #[arg(long)]
        corpus: Vec<PathBuf>,
    },
    /// Prompt processing (pp128, pp512) and decode (tg128) speed, peak memory; or, with
    /// --train, training tokens/s of a fixed shape on random tokens.
    Bench {
        #[arg(required_unless_present = "train")]
        model: Option<PathBuf>,
        /// tiny (d256 L4 ctx256 batch16) or small (d512 L8 ctx512 batch8), vocab 8192; or
        /// smollm2 (SmolLM2-135M's shape, ctx128 batch16).
        #[arg(long, conflicts_with = "model")]
        train: Option<slm_train::bench::Shape>,
        /// With --train: rank-R LoRA adapters (alpha 2R) on every projection of the frozen
        /// model instead of full training.
        #[arg(long, requires = "train", value_parser = positive)]
        lora: Option<usize>,
        /// Timed training updates (after two untimed ones).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, value_parser = threads_arg)]
        threads: Option<usize>,
        #[arg(long)]
        json: bool,
        /// Repetitions of each measurement, after one untimed warm-up as llama-bench does (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

#[derive(Subcommand)]
enum LoraCmd {
    /// Write BASE's weights with the adapter folded in (W + alpha/r B A) as a new model folder.
    Merge {
        base: PathBuf,
        adapter: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum DistillCmd {
    /// The teacher's top k per position of every training window of SHARDS (windows of
    /// --context positions, as a distillation run of that model.context draws them), with
    /// the remaining mass, at --temperature. Rerun the same command to continue an
    /// interrupted build.
    Cache {
        teacher: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// The shards' tokenizer.json (default: the teacher's, which must be the one the
        /// shards were made with).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// The student's model.context.
        #[arg(long)]
        context: usize,
        /// Windows per forward pass of the teacher.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Learn a byte-level BPE tokenizer. CORPUS: text files, folders of .txt/.md, or .jsonl
    /// with a "text" field.
    Train {
        #[arg(required = true)]
        corpus: Vec<PathBuf>,
        #[arg(long, default_value_t = 8192)]
        vocab: usize,
        /// Pairs seen fewer times are not merged.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Tokenize a corpus into train/valid token shards (split by document).
    Prepare {
        #[arg(required = true)]
        corpus: Vec<PathBuf>,
        /// tokenizer.json to encode with (its hash is stored in the shards).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Share of documents held out for validation.
        #[arg(long, default_value_t = 0.05)]
        valid_fraction: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The token that ends each document.
        #[arg(long, default_value = "<|endoftext|>")]
        eos: String,
    },
}

#[derive(Args, Clone)]
struct GenArgs {
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Drop the start of a prompt that does not fit the context.
    #[arg(long)]
    truncate: bool,
    /// Context length (default: the model's).
    #[arg(long)]
    ctx: Option<usize>,
}

impl GenArgs {
    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                seed: self.seed,
                ..SamplingParams::default()
            },
            stop: self.stop.clone(),
            truncate: self.truncate,
            context: self.ctx,
        }
    }
}

impl Cmd {
    fn model_mut(&mut self) -> Option<&mut PathBuf> {
        match self {
            Cmd::Info { model }
            | Cmd::Generate { model, .. }
            | Cmd::Chat { model, .. }
            | Cmd::Eval { model, .. }
            | Cmd::Predict { model, .. }
            | Cmd::Export { model, .. }
            | Cmd::Quantize { model, .. }
            | Cmd::Imatrix { model, .. } => Some(model),
            Cmd::Distill {
                cmd: DistillCmd::Cache { teacher, .. },
            }
            | Cmd::Synth { teacher, .. } => Some(teacher),
            Cmd::Bench { model, .. } => model.as_mut(),
            Cmd::Pull { .. }
            | Cmd::Tokenizer { .. }
            | Cmd::Lora { .. }
            | Cmd::Data { .. }
            | Cmd::Train { .. }
            | Cmd::Report { .. }
            | Cmd::Serve { .. }
            | Cmd::Quickstart { .. } => None,
        }
    }
}

/// A count that must be at least 1.
fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("expected at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Fails now, not after hours of work, when `out` cannot be written: its folder must exist
/// and take a new file, and `out` must not be one of the `inputs`.
fn check_writable(out: &Path, inputs: &[&Path]) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if let Some(input) = inputs.iter().find(|i| same(out, i)) {
        bail!(
            "{}: the output would overwrite the input {}; choose another output file",
            out.display(),
            input.display()
        );
    }
    if out.is_dir() {
        bail!("{}: is a folder; the output is a file", out.display());
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let probe = dir.join(format!(".slm-write-probe.{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{}: cannot write there", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// `--parallel`: 1 to 1024 sequences.
fn parallel_arg(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    slm_model::limits::check("--parallel", n, 1024)
}

/// `--ctx`: 1 to `limits::MAX_CONTEXT`.
fn ctx_arg(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    slm_model::limits::check("--ctx", n, slm_model::limits::MAX_CONTEXT)
}

/// `--threads`: 1 to `limits::MAX_THREADS`.
fn threads_arg(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    slm_model::limits::check("--threads", n, slm_model::limits::MAX_THREADS)
}

/// A MODEL argument: a path, else a name in the store (OWNER/NAME or OWNER/NAME/FILE).
fn resolve_model(arg: &Path) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let store = slm_hub::Store::from_env();
    if let Some(p) = arg.to_str().and_then(|name| store.resolve(name)) {
        return Ok(p);
    }
    bail!(
        "{}: no such file or folder, and no model of that name in the store ({}); \
         `slm pull OWNER/NAME` downloads one",
        arg.display(),
        store.root().join("models").display()
    )
}

fn pull(repo: &str, file: Option<&str>, revision: &str) -> Result<()> {
    let store = slm_hub::Store::from_env();
    let hub = slm_hub::Hub::from_env();
    let style = indicatif::ProgressStyle::with_template(
        "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )?
    .progress_chars("=> ");
    let mut bar: Option<indicatif::ProgressBar> = None;
    let path = hub.pull(&store, repo, revision, file, &mut |p| match p {
        slm_hub::Progress::Start { file, total, from } => {
            let b = indicatif::ProgressBar::new(total.unwrap_or(0)).with_style(style.clone());
            b.set_message(file);
            b.set_position(from);
            b.reset_eta();
            bar = Some(b);
        }
        slm_hub::Progress::Advance(n) => {
            if let Some(b) = &bar {
                b.inc(n)
            }
        }
        slm_hub::Progress::Done { file, cached } => match bar.take() {
            Some(b) => b.finish(),
            None if cached => eprintln!("{file}: already in the store, verified"),
            None => {}
        },
    })?;
    println!("{}", path.display());
    Ok(())
}

fn tokenizer_train(
    docs: &[slm_data::Document],
    vocab: usize,
    min_frequency: u64,
    out: &Path,
) -> Result<()> {
    let t = Instant::now();
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    eprintln!(
        "training a {vocab}-token BPE on {} documents ({:.1} MB)",
        docs.len(),
        bytes as f64 / 1e6
    );
    let size = slm_train::prepare::train_tokenizer(docs, vocab, min_frequency, out)?;
    eprintln!(
        "wrote {} ({size} tokens) in {:.1}s",
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn data_prepare(
    docs: &[slm_data::Document],
    tokenizer: &Path,
    out: &Path,
    valid_fraction: f64,
    seed: u64,
    eos: &str,
) -> Result<()> {
    let total: usize = docs.iter().map(|d| d.text.len()).sum();
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "tokenizing [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    let m = slm_train::prepare::prepare_shards(
        docs,
        tokenizer,
        out,
        &slm_data::PrepareOptions {
            valid_fraction,
            seed,
            ..Default::default()
        },
        eos,
        &mut |n| bar.inc(n as u64),
    )?;
    bar.finish_and_clear();
    eprintln!(
        "{}: train {} tokens ({} documents), valid {} tokens ({} documents)",
        out.display(),
        m.train.tokens,
        m.train.documents,
        m.valid.tokens,
        m.valid.documents
    );
    Ok(())
}

/// `slm distill cache`: settings checked as a recipe's `[teacher]` checks them.
#[allow(clippy::too_many_arguments)]
fn distill_cache(
    teacher: &Path,
    shards: &Path,
    tokenizer: Option<&Path>,
    top_k: usize,
    temperature: f64,
    context: usize,
    batch: usize,
    output: &Path,
) -> Result<()> {
    use slm_train::recipe::{MAX_TEMPERATURE, MAX_TOP_K};
    if top_k == 0 || top_k > MAX_TOP_K {
        anyhow::bail!("--top-k {top_k}: expected 1 to {MAX_TOP_K}");
    }
    if !(temperature > 0.0 && temperature <= MAX_TEMPERATURE) {
        anyhow::bail!("--temperature {temperature}: expected 0 < temperature <= {MAX_TEMPERATURE}");
    }
    if context == 0 || context > slm_model::limits::MAX_CONTEXT {
        anyhow::bail!(
            "--context {context}: expected 1 to {}",
            slm_model::limits::MAX_CONTEXT
        );
    }
    if batch == 0 || batch > 4096 {
        anyhow::bail!("--batch {batch}: expected 1 to 4096 windows");
    }
    let (model, data) = slm_train::kd_cache::open_inputs(teacher, shards, tokenizer, context)?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "teacher targets [{bar:30}] {pos}/{len} windows, {per_sec} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let meta = slm_train::kd_cache::build(
        &model,
        &data,
        top_k,
        temperature,
        context,
        batch,
        output,
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )?;
    bar.finish_and_clear();
    let tokens = meta.windows as f64 * context as f64;
    eprintln!(
        "{}: {} windows of {context} positions, top {top_k}, {} bytes a position ({:.0} tokens/s)",
        output.display(),
        meta.windows,
        meta.record_bytes(),
        tokens / started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs a recipe with a progress bar; Ctrl-C checkpoints and stops.
fn run_training(
    recipe: &slm_train::recipe::Recipe,
    resume: bool,
) -> Result<slm_train::run::Outcome> {
    let stop = interrupt_flag();
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} updates, {msg} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    bar.set_prefix("training");
    let mut valid = String::new();
    let mut on_step = |r: &slm_train::run::StepReport| {
        if r.total_steps > 0 {
            bar.set_length(r.total_steps);
        }
        bar.set_position(r.step);
        valid = match (r.valid_loss, r.valid_accuracy) {
            (Some(v), Some(a)) => format!(", valid {v:.3} (acc {a:.3})"),
            (Some(v), None) => format!(", valid {v:.3} (ppl {:.1})", (v as f64).exp()),
            _ => std::mem::take(&mut valid),
        };
        bar.set_message(format!(
            "loss {:.3}{valid}, {:.0} tok/s, lr {:.2e}",
            r.loss, r.tokens_per_s, r.lr
        ));
    };
    let outcome = slm_train::run::train(
        recipe,
        slm_train::run::RunOptions {
            resume,
            stop: &stop,
            on_step: &mut on_step,
        },
    )?;
    bar.finish_and_clear();
    let s = &outcome.state;
    eprintln!(
        "{} updates, {} tokens in {:.0}s; train loss {:.3}{}",
        s.step,
        s.tokens,
        s.elapsed_s,
        outcome.train_loss,
        match (outcome.valid_loss, outcome.valid_accuracy) {
            (Some(v), Some(a)) => format!(", valid loss {v:.3}, accuracy {a:.4}"),
            (Some(v), None) => format!(", valid loss {v:.3} (ppl {:.2})", (v as f64).exp()),
            _ => String::new(),
        }
    );
    Ok(outcome)
}

fn train(recipe_path: &Path, resume: bool) -> Result<()> {
    let recipe = slm_train::recipe::Recipe::load(recipe_path)?;
    let outcome = run_training(&recipe, resume)?;
    match outcome.model_dir {
        Some(dir) => println!("{}", dir.display()),
        None => eprintln!(
            "stopped; `slm train {} --resume` continues from the checkpoint",
            recipe_path.display()
        ),
    }
    Ok(())
}

/// The bundled end-to-end demo (slm_train::quickstart): a tokenizer, shards, a short
/// training run, then its held-out perplexity against the unigram baseline and samples.
fn quickstart(minutes: f64, seed: u64, out: &Path, corpus: Vec<PathBuf>) -> Result<()> {
    use slm_train::quickstart as qs;
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!(
            "{} already exists: remove it or choose another --out (an interrupted run continues \
             with `slm train {}/recipe.toml --resume`)",
            out.display(),
            out.display()
        );
    }
    std::fs::create_dir_all(out)?;
    let (docs, origin) = qs::documents(&corpus)?;
    eprintln!("corpus: {origin}");
    let t0 = Instant::now();
    let tok_path = out.join("tokenizer.json");
    tokenizer_train(&docs, qs::VOCAB, qs::MIN_FREQUENCY, &tok_path)?;
    let shards = out.join("shards");
    data_prepare(&docs, &tok_path, &shards, 0.05, seed, qs::EOS)?;
    drop(docs);
    let recipe_path = out.join("recipe.toml");
    slm_data::shard::write_atomic(&recipe_path, |f| {
        f.write_all(qs::recipe(seed, minutes).as_bytes())
    })?;
    let recipe = slm_train::recipe::Recipe::load(&recipe_path)?;
    let outcome = run_training(&recipe, false)?;
    let Some(model_dir) = outcome.model_dir else {
        eprintln!(
            "stopped; `slm train {} --resume` continues",
            recipe_path.display()
        );
        return Ok(());
    };

    let tok_json = std::fs::read(&tok_path)?;
    let data = slm_data::Dataset::open(&shards, &slm_data::tokenizer_sha256(&tok_json))?;
    let valid = qs::held_out(&data);
    let unigram = slm_eval::perplexity::unigram_perplexity(
        qs::train_tokens(&data),
        &valid,
        data.manifest.vocab_size as usize,
    );
    let (m, tok) = load(&model_dir)?;
    let ppl = slm_eval::perplexity::perplexity(&m.model, &valid, 128, None, false)?;
    println!();
    println!(
        "held-out perplexity {:.1} +/- {:.1} (unigram baseline of the same tokenizer: {unigram:.1}), {} tokens scored",
        ppl.ppl, ppl.stderr, ppl.scored_tokens
    );
    for (i, prompt) in qs::PROMPTS.iter().enumerate() {
        let ids = tok.encode(prompt, true)?;
        let mut session = Session::new(&m.model);
        let opts = GenerateOptions {
            max_tokens: 40,
            sampling: SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
                repeat_penalty: 1.1,
                repeat_last_n: 64,
                seed: seed + i as u64,
                ..SamplingParams::default()
            },
            stop: Vec::new(),
            truncate: true,
            context: None,
        };
        let g = generate(&m.model, &tok, &mut session, &ids, &opts, |_| {
            ControlFlow::Continue(())
        })?;
        println!("sample: {prompt}{}", g.text.replace('\n', " "));
    }
    println!(
        "model   {} (try: slm chat {} or slm generate {} -p \"Call me\")",
        model_dir.display(),
        model_dir.display(),
        model_dir.display()
    );
    println!("metrics {}", recipe.run.out.join("metrics.jsonl").display());
    println!("total   {:.1} minutes", t0.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

fn load(path: &Path) -> Result<(LoadedModel, Tokenizer)> {
    let t = Instant::now();
    // The tokenizer first, then its construction's transient memory (~30 MB for a 49k
    // vocabulary, see slm_model::source) goes back to the system before the weights arrive:
    // kept, as `keep_freed_memory` has glibc do, it stayed on top of them as the peak.
    let source = slm_model::source(path).with_context(|| format!("loading {}", path.display()))?;
    let tok = Tokenizer::for_model(&source)?;
    drop(source);
    slm_kernels::process::release_freed_memory();
    let loaded = slm_model::load(path, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))?;
    tok.check_fits(loaded.model.config.vocab_size, &loaded.source)?;
    tracing::info!(
        "loaded {} in {:.2}s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    Ok((loaded, tok))
}

/// The base model folder of a LoRA adapter: `--base`, else the adapter config's
/// base_model_name_or_path when that is a folder here.
fn lora_base(adapter: &Path, base: Option<&Path>) -> Result<PathBuf> {
    if let Some(b) = base {
        return Ok(b.to_path_buf());
    }
    let cfg = adapter.join("adapter_config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg)?)
        .with_context(|| format!("reading {}", cfg.display()))?;
    match v["base_model_name_or_path"].as_str().map(PathBuf::from) {
        Some(p) if p.join("config.json").is_file() || p.is_file() => Ok(p),
        other => bail!(
            "{}: base_model_name_or_path {:?} is not a model folder or file here; give --base MODEL",
            cfg.display(),
            other
        ),
    }
}

/// `load` for a command that predicts tokens (a classifier is refused by name).
fn load_lm(path: &Path) -> Result<(LoadedModel, Tokenizer)> {
    let (m, tok) = load(path)?;
    m.model.config.require_lm(&path.display().to_string())?;
    Ok((m, tok))
}

/// An error reads as one message with its causes ("error: loading m.gguf: ..."), whatever
/// RUST_BACKTRACE says: a bad input is the user's to fix, not a crash to debug.
fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    slm_kernels::process::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Causes that the message above them already quotes are not repeated.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            eprintln!("error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(mut cli: Cli) -> Result<()> {
    if let Some(m) = cli.cmd.model_mut() {
        *m = resolve_model(m)?;
    }
    match cli.cmd {
        Cmd::Pull {
            repo,
            file,
            revision,
        } => pull(&repo, file.as_deref(), &revision),
        Cmd::Info { model } => info(&model),
        Cmd::Quantize {
            model,
            ty,
            output,
            imatrix,
            allow_requantize,
            pure,
        } => quantize(
            &model,
            &ty,
            &output,
            imatrix.as_deref(),
            allow_requantize,
            pure,
        ),
        Cmd::Imatrix {
            model,
            calib,
            output,
            chunks,
            ctx,
        } => imatrix(&model, &calib, &output, chunks, ctx),
        Cmd::Export {
            model,
            format,
            ty,
            output,
            base,
        } => {
            let ty = slm_compress::export::FloatType::parse(&ty).context("--type")?;
            let t = Instant::now();
            match (format.as_str(), model.is_dir()) {
                ("gguf", true) if model.join("adapter_config.json").is_file() => {
                    check_writable(&output, &[])?;
                    let base = lora_base(&model, base.as_deref())?;
                    slm_compress::export::lora_to_gguf(&model, &base, &output, ty)?
                }
                ("hf", false) => slm_compress::export::gguf_to_hf(&model, &output, ty)?,
                ("gguf", true) => {
                    check_writable(&output, &[])?;
                    slm_compress::export::hf_to_gguf(&model, &output, ty)?
                }
                (f, _) => bail!(
                    "{}: --format {f} writes {} and reads {}",
                    model.display(),
                    if f == "hf" {
                        "a Hugging Face folder"
                    } else {
                        "a GGUF file"
                    },
                    if f == "hf" {
                        "a GGUF file"
                    } else {
                        "a Hugging Face folder"
                    }
                ),
            }
            written(&output, t);
            Ok(())
        }
        Cmd::Train { recipe, resume } => train(&recipe, resume),
        Cmd::Quickstart {
            minutes,
            seed,
            out,
            corpus,
        } => quickstart(minutes, seed, &out, corpus),
        Cmd::Tokenizer {
            cmd:
                TokenizerCmd::Train {
                    corpus,
                    vocab,
                    min_frequency,
                    output,
                },
        } => tokenizer_train(
            &slm_data::read_corpus(&corpus)?,
            vocab,
            min_frequency,
            &output,
        ),
        Cmd::Data {
            cmd:
                DataCmd::Prepare {
                    corpus,
                    tokenizer,
                    output,
                    valid_fraction,
                    seed,
                    eos,
                },
        } => {
            if !(0.0..1.0).contains(&valid_fraction) {
                bail!("--valid-fraction {valid_fraction}: expected a number in [0, 1)");
            }
            let docs = slm_data::read_corpus(&corpus)?;
            data_prepare(&docs, &tokenizer, &output, valid_fraction, seed, &eos)
        }
        Cmd::Generate { model, prompt, gen } => {
            let (m, tok) = load_lm(&model)?;
            let ids = tok.encode(&prompt, true)?;
            let mut session = Session::new(&m.model);
            let stop = interrupt_flag();
            let mut out = std::io::stdout().lock();
            write!(out, "{prompt}")?;
            let g = generate(
                &m.model,
                &tok,
                &mut session,
                &ids,
                &gen.options(),
                stream_to(&mut out, &stop),
            )?;
            writeln!(out)?;
            eprintln!(
                "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, finish: {}]",
                g.prompt_tokens,
                g.prompt_tps(),
                g.tokens.len(),
                g.gen_tps(),
                g.finish.as_str()
            );
            Ok(())
        }
        Cmd::Chat { model, system, gen } => chat(&model, system, &gen),
        Cmd::Serve {
            models,
            host,
            port,
            api_key,
            api_key_file,
            parallel,
            ctx,
            queue,
            metrics,
            cors,
            embed,
            max_body,
            timeout,
            threads,
        } => {
            slm_kernels::process::init_threads(threads);
            let api_key = match api_key_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("--api-key-file {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                None => api_key,
            };
            if api_key.as_deref() == Some("") {
                bail!("the API key is empty");
            }
            let models = models
                .iter()
                .map(|m| resolve_model(m))
                .collect::<Result<Vec<_>>>()?;
            for p in models.iter().chain(&embed) {
                if !p.exists() {
                    bail!("{}: no such file or folder", p.display());
                }
            }
            let loopback = matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1");
            if !loopback && api_key.is_none() {
                eprintln!(
                    "WARNING: serving on {host} without --api-key: anyone who can reach this \
                     machine can use the models. Pass --api-key or --api-key-file."
                );
                tracing::warn!("serving on {host} without an API key");
            }
            let config = slm_serve::ServeConfig {
                host,
                port,
                api_key,
                cors,
                metrics,
                parallel,
                ctx,
                queue,
                max_body,
                timeout: std::time::Duration::from_secs(timeout),
            };
            slm_serve::run(config, models, embed, |addr| {
                eprintln!("listening on http://{addr}/ (models load now; /health says when ready)");
            })
            .map_err(anyhow::Error::msg)
        }
        Cmd::Predict {
            model,
            input,
            output,
        } => predict(&model, &input, &output),
        Cmd::Synth {
            teacher,
            prompts,
            n,
            temp,
            top_p,
            max_tokens,
            seed,
            chat,
            keep_prompt,
            parallel,
            output,
        } => {
            if n == 0 || n > 100_000_000 {
                bail!("-n {n}: expected 1 to 100000000 documents");
            }
            if !(temp.is_finite() && temp >= 0.0 && top_p > 0.0 && top_p <= 1.0) {
                bail!("--temp {temp} / --top-p {top_p}: expected temp >= 0 and 0 < top-p <= 1");
            }
            if max_tokens == 0 || parallel == 0 || parallel > 256 {
                bail!("--max-tokens {max_tokens} / --parallel {parallel}: expected positive, parallel at most 256");
            }
            let list = slm_runtime::synth::read_prompts(&prompts)?;
            let settings = slm_runtime::synth::SynthSettings {
                teacher: teacher.clone(),
                teacher_sha256: slm_train::teacher::weights_sha256(&teacher)?,
                prompts: prompts.clone(),
                prompts_sha256: slm_data::file_sha256(&prompts)
                    .with_context(|| format!("reading {}", prompts.display()))?,
                n,
                max_tokens,
                temperature: temp,
                top_p,
                seed,
                chat,
                keep_prompt,
            };
            let (m, tok) = load_lm(&teacher)?;
            let bar = indicatif::ProgressBar::new(n as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "synth [{bar:30}] {pos}/{len} documents, {per_sec} eta {eta}",
                )?
                .progress_chars("=> "),
            );
            let (written, dropped) = slm_runtime::synth::synth(
                m.model,
                tok,
                &list,
                &settings,
                parallel,
                &output,
                &mut |done, _| bar.set_position(done as u64),
            )?;
            bar.finish_and_clear();
            eprintln!(
                "{}: {written} documents ({dropped} duplicates or empty dropped this run)",
                output.display()
            );
            if written < n {
                bail!("only {written} distinct documents of {n} in {} tries: raise --temp or add prompts", 4 * n);
            }
            Ok(())
        }
        Cmd::Distill {
            cmd:
                DistillCmd::Cache {
                    teacher,
                    data,
                    tokenizer,
                    top_k,
                    temperature,
                    context,
                    batch,
                    output,
                },
        } => distill_cache(
            &teacher,
            &data,
            tokenizer.as_deref(),
            top_k,
            temperature,
            context,
            batch,
            &output,
        ),
        Cmd::Lora {
            cmd:
                LoraCmd::Merge {
                    base,
                    adapter,
                    output,
                },
        } => {
            slm_train::adapter::merge(&base, &adapter, &output)?;
            eprintln!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Eval {
            model,
            task,
            suite,
            evals,
            limit,
            shots,
            ctx,
            prompt,
            out,
            batch_tokens,
            threads,
        } => {
            let threads = slm_kernels::process::init_threads(threads);
            let mut specs = task
                .iter()
                .map(|t| slm_eval::run::TaskSpec::parse(t))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            if let Some(name) = suite {
                let dir = evals
                    .or_else(|| std::env::var_os("SLM_EVALS").map(PathBuf::from))
                    .context("--suite needs the folder of its files: --evals DIR or SLM_EVALS")?;
                specs.extend(slm_eval::run::suite(&name, &dir).map_err(anyhow::Error::msg)?);
            }
            let opts = slm_eval::run::RunOptions {
                choice: slm_eval::choice::ChoiceOptions {
                    shots,
                    batch_tokens: batch_tokens.max(1),
                    progress: true,
                    ..Default::default()
                },
                limit,
                ctx,
                prompt,
                arithmetic: "ggml".into(),
            };
            eval(&model, &specs, &opts, threads, out.as_deref())
        }
        Cmd::Report { results, output } => report(&results, &output),
        Cmd::Bench {
            model,
            train,
            steps,
            threads,
            json,
            reps,
            lora,
        } => {
            let threads = slm_kernels::process::init_threads(threads);
            match (train, model) {
                (Some(shape), _) => bench_train(shape, steps, threads, json, lora),
                (None, Some(model)) => bench(&model, threads, json, reps),
                (None, None) => bail!("bench needs a MODEL or --train tiny|small|smollm2"),
            }
        }
    }
}

/// Ctrl-C sets the flag (a reply stops) instead of killing the process; a second Ctrl-C while
/// the flag is still set exits.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    flag
}

/// The token callback of `generate`: print each piece as it comes, stop on Ctrl-C.
fn stream_to<'a>(
    out: &'a mut impl Write,
    stop: &'a AtomicBool,
) -> impl FnMut(&str) -> ControlFlow<()> + 'a {
    move |text| {
        let _ = write!(out, "{text}");
        let _ = out.flush();
        if stop.swap(false, Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

fn info(path: &Path) -> Result<()> {
    let (m, tok) = load(path)?;
    let c = &m.model.config;
    println!("model        {}", path.display());
    println!(
        "architecture {:?} ({}{})",
        c.arch,
        c.arch.hf_prefix(),
        c.to_hf_json()["architectures"][0]
            .as_str()
            .and_then(|s| s.strip_prefix(c.arch.hf_prefix()))
            .unwrap_or("")
    );
    println!("parameters   {:.1}M", c.num_params() as f64 / 1e6);
    println!(
        "shape        {} layers, hidden {}, ffn {}, heads {} (kv {}), head dim {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!("context      {}", c.max_position_embeddings);
    println!(
        "rope         theta {}{}",
        c.rope_theta,
        if c.rope_scaling.is_some() {
            ", llama3 scaling"
        } else {
            ""
        }
    );
    println!(
        "embeddings   {}",
        if c.tie_word_embeddings {
            "tied"
        } else {
            "separate output"
        }
    );
    match &m.source {
        ModelSource::Gguf {
            metadata,
            tensor_types,
            file_bytes,
            ..
        } => {
            let types: Vec<String> = tensor_types
                .iter()
                .map(|(t, n)| format!("{t} x{n}"))
                .collect();
            println!(
                "format       GGUF, {:.1} MB, tensors {}",
                *file_bytes as f64 / 1e6,
                types.join(", ")
            );
            if let Some(n) = metadata.get("general.name").and_then(|v| v.as_str()) {
                println!("name         {n}");
            }
            let model = metadata
                .get("tokenizer.ggml.model")
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            let pre = metadata
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            println!(
                "tokenizer    {model} (pre: {pre}), {} tokens",
                tok.vocab_size()
            );
        }
        ModelSource::HfFolder { .. } => {
            println!("format       Hugging Face folder (safetensors)");
            println!("tokenizer    tokenizer.json, {} tokens", tok.vocab_size());
        }
    }
    let piece = |id: Option<u32>| {
        id.and_then(|i| tok.inner.id_to_token(i))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "special      bos {} eos {} (add bos: {})",
        piece(tok.bos),
        piece(tok.eos),
        tok.add_bos
    );
    // Described, not rendered: a template is code from the file, and info only reads.
    match &tok.chat_template {
        Some(t) => println!(
            "chat         template present ({} characters; `slm chat` renders it)",
            t.source_len()
        ),
        None => println!("chat         no chat template"),
    }
    Ok(())
}

fn chat(path: &Path, system: Option<String>, gen: &GenArgs) -> Result<()> {
    let (m, tok) = load_lm(path)?;
    let Some(template) = &tok.chat_template else {
        bail!(
            "{} has no chat template; use `slm generate` for plain completion",
            path.display()
        );
    };
    let opts = gen.options();
    let stop = interrupt_flag();
    let mut session = Session::new(&m.model);
    let mut messages: Vec<Message> = system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let stdin = std::io::stdin();
    eprintln!(
        "chatting with {} (/reset to start over, /exit or Ctrl-D to leave)",
        path.display()
    );
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let prompt = template.render(&messages, true)?;
        let ids = tok.encode(&prompt, false)?;
        stop.store(false, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        let g = generate(
            &m.model,
            &tok,
            &mut session,
            &ids,
            &opts,
            stream_to(&mut out, &stop),
        );
        writeln!(out)?;
        match g {
            Ok(g) => messages.push(Message::new("assistant", g.text.trim().to_string())),
            Err(e) => {
                eprintln!("error: {e}");
                messages.pop();
            }
        }
    }
    Ok(())
}

fn eval(
    path: &Path,
    specs: &[slm_eval::run::TaskSpec],
    opts: &slm_eval::run::RunOptions,
    threads: usize,
    out: Option<&Path>,
) -> Result<()> {
    // A mistyped path or an unwritable --out fails before the model loads.
    for s in specs {
        if !s.file.is_file() {
            bail!("--task {}: no such file", s.file.display());
        }
    }
    if let Some(out) = out {
        let inputs: Vec<&Path> = specs.iter().map(|s| s.file.as_path()).collect();
        check_writable(out, &inputs)?;
    }
    // The model's own kernels (llama.cpp's arithmetic): measured, faster and lighter than
    // widening the weights to f32 for candle's gemm, which was the default before.
    let (m, tok) = load(path)?;
    let info = slm_eval::results::model_info(&m);
    let mut done = Vec::new();
    for spec in specs {
        eprintln!(
            "{} ({}: {})",
            spec.name,
            spec.kind.as_str(),
            spec.file.display()
        );
        let r = slm_eval::run::run(&m.model, &tok, spec, opts)
            .with_context(|| format!("task {}", spec.name))?;
        let metrics: Vec<String> = r
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {:.4} +/- {:.4}", v.value, v.stderr))
            .collect();
        println!(
            "{:<12} n {:<6} {}  ({} tokens, {:.1}s)",
            r.name,
            r.n,
            metrics.join("  "),
            r.tokens,
            r.seconds
        );
        done.push(r);
        if let Some(out) = out {
            // Rewritten after every task, so a long suite keeps what it has finished.
            let results = slm_eval::results::Results::new(info.clone(), threads, done.clone());
            let json = serde_json::to_vec_pretty(&results)?;
            slm_data::shard::write_atomic(out, |f| f.write_all(&json))?;
        }
    }
    Ok(())
}

/// `slm predict`: the head decides the row kind (a sequence head reads texts, a token head
/// reads words); rows are read by slm_data's task readers, labels ignored if present.
fn predict(path: &Path, input: &Path, output: &Path) -> Result<()> {
    use slm_model::Head;
    check_writable(output, &[input])?;
    let (m, tok) = load(path)?;
    let model = &m.model;
    let labels = model.config.head.labels().to_vec();
    let mut lines = String::new();
    let bar = indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template(
        "labelling [{bar:30}] {pos}/{len} rows, {per_sec}, eta {eta}",
    )?);
    match &model.config.head {
        Head::Lm => bail!(
            "{}: the model has a language-model head; slm predict needs a classification head \
             (train one with objective.kind = \"classify\" or \"tag\")",
            path.display()
        ),
        Head::Sequence { .. } => {
            let rows = slm_data::tasks::read_texts(input)?;
            bar.set_length(rows.len() as u64);
            for t in rows {
                let (logits, _) = slm_eval::heads::classify_text(model, &tok, &t)?;
                let p = slm_eval::heads::probabilities(&logits);
                let best = slm_eval::metrics::argmax(&p);
                let probs: serde_json::Map<String, serde_json::Value> = labels
                    .iter()
                    .zip(&p)
                    .map(|(l, &x)| (l.clone(), x.into()))
                    .collect();
                let line =
                    serde_json::json!({"text": t, "label": labels[best], "probabilities": probs});
                lines.push_str(&format!("{line}\n"));
                bar.inc(1);
            }
        }
        Head::Token { .. } => {
            let rows = slm_data::tasks::read_words(input)?;
            bar.set_length(rows.len() as u64);
            for words in rows {
                let (tags, _) = slm_eval::heads::predict_tags(model, &tok, &words)?;
                let line = serde_json::json!({"tokens": words, "tags": tags});
                lines.push_str(&format!("{line}\n"));
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    slm_data::shard::write_atomic(output, |f| f.write_all(lines.as_bytes()))?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn quantize(
    model: &Path,
    ty: &str,
    output: &Path,
    imatrix: Option<&Path>,
    allow_requantize: bool,
    pure: bool,
) -> Result<()> {
    use slm_compress::quantize::{quantize_gguf, FileType, Options};
    let file_type = FileType::parse(ty).context("--type")?;
    let mut inputs = vec![model];
    inputs.extend(imatrix);
    check_writable(output, &inputs)?;
    let t = Instant::now();
    let imatrix = imatrix
        .map(slm_compress::imatrix::Imatrix::load)
        .transpose()?;
    let opts = Options {
        file_type,
        allow_requantize,
        pure,
        imatrix: imatrix.as_ref(),
    };
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "quantizing [{bar:30}] {pos}/{len} tensors, eta {eta}",
        )?
        .progress_chars("=> "),
    );
    let progress = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    };
    if model.is_dir() {
        // A folder goes through an F32 GGUF beside the output, removed afterwards.
        let tmp = output.with_file_name(format!(
            ".{}.f32-{}.gguf",
            output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let r = slm_compress::export::hf_to_gguf(model, &tmp, slm_compress::export::FloatType::F32)
            .map_err(anyhow::Error::from)
            .and_then(|()| Ok(quantize_gguf(&tmp, output, &opts, &progress)?));
        let _ = std::fs::remove_file(&tmp);
        r?;
    } else {
        quantize_gguf(model, output, &opts, &progress)?;
    }
    bar.finish_and_clear();
    written(output, t);
    Ok(())
}

fn imatrix(
    model: &Path,
    calib: &Path,
    output: &Path,
    chunks: Option<usize>,
    ctx: usize,
) -> Result<()> {
    check_writable(output, &[model, calib])?;
    let t = Instant::now();
    let text =
        std::fs::read_to_string(calib).with_context(|| format!("reading {}", calib.display()))?;
    let (m, tok) = load_lm(model)?;
    let ids = tok.encode(&text, false)?;
    let bos = if tok.add_bos { tok.bos } else { None };
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let im = slm_compress::imatrix::compute(
        &m.model,
        &ids,
        ctx,
        bos,
        chunks,
        &calib.display().to_string(),
        progress,
    )?;
    im.save(output)?;
    eprintln!(
        "{} entries from {} windows of {ctx} tokens",
        im.len(),
        im.chunk_count
    );
    written(output, t);
    Ok(())
}

/// A finished output: its path on stdout (for scripts), the time taken on stderr.
fn written(output: &Path, t: Instant) {
    eprintln!(
        "wrote {} in {:.1}s",
        output.display(),
        t.elapsed().as_secs_f64()
    );
    println!("{}", output.display());
}

fn report(files: &[PathBuf], output: &Path) -> Result<()> {
    let inputs: Vec<&Path> = files.iter().map(|f| f.as_path()).collect();
    check_writable(output, &inputs)?;
    let mut runs = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let r = slm_eval::results::Results::from_json(&text)
            .with_context(|| format!("{}: not a results file of `slm eval --out`", f.display()))?;
        let label = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        runs.push((label, r));
    }
    let html = slm_eval::report::render(&runs).map_err(anyhow::Error::msg)?;
    slm_data::shard::write_atomic(output, |f| f.write_all(html.as_bytes()))?;
    println!("{}", output.display());
    Ok(())
}

fn bench_train(
    shape: slm_train::bench::Shape,
    steps: usize,
    threads: usize,
    json: bool,
    lora: Option<usize>,
) -> Result<()> {
    let r = slm_train::bench::run(shape, steps, 2, lora)?;
    let rss = slm_kernels::process::peak_rss_mb();
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["peak_rss_mb"] = rss.into();
        v["threads"] = threads.into();
        println!("{v}");
    } else {
        let pct = |x: f64| 100.0 * x / r.step_s;
        println!(
            "shape      {} ({} parameters, {} tokens per update)",
            r.shape, r.parameters, r.tokens_per_step
        );
        println!("threads    {threads}");
        println!(
            "training   {:.0} tok/s ({:.3} s per update, median of {})",
            r.tokens_per_s, r.step_s, r.steps
        );
        println!("forward    {:.3} s ({:.0}%)", r.forward_s, pct(r.forward_s));
        println!(
            "backward   {:.3} s ({:.0}%)",
            r.backward_s,
            pct(r.backward_s)
        );
        println!(
            "optimizer  {:.3} s ({:.0}%)",
            r.optimizer_s,
            pct(r.optimizer_s)
        );
        println!("peak RSS   {rss:.0} MB");
        for (op, s) in &r.ops {
            println!("  {op:<26} {:.3} s ({:.0}%)", s, pct(*s));
        }
    }
    Ok(())
}

fn bench(path: &Path, threads: usize, json: bool, reps: usize) -> Result<()> {
    let (m, _tok) = load_lm(path)?;
    let speed = slm_runtime::bench::run(&m.model, reps)?;
    let rss = slm_kernels::process::peak_rss_mb();
    let kernels = slm_kernels::process::kernel_set();
    let slm_runtime::bench::Speed {
        pp128,
        pp512,
        tg128,
    } = speed;
    if json {
        println!(
            "{}",
            serde_json::json!({"pp128": pp128, "pp512": pp512, "tg128": tg128, "peak_rss_mb": rss, "threads": threads, "kernels": kernels})
        );
    } else {
        println!("model    {}", path.display());
        println!("threads  {threads}");
        println!("kernels  {kernels}");
        println!("pp128    {pp128:.1} tok/s");
        println!("pp512    {pp512:.1} tok/s");
        println!("tg128    {tg128:.1} tok/s");
        println!("peak RSS {rss:.0} MB");
    }
    Ok(())
}
