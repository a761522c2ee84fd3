//! Continuous batching over SmolLM2-135M (Q4_1): a batched step computes each sequence
//! exactly as it would alone, and the engine's output equals `generate`'s.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use candle_core::Device;
use slm_runtime::engine::{Engine, EngineConfig, Event, Job, Sink, Usage};
use slm_runtime::{generate, FinishReason, GenerateOptions, SamplingParams, Session};
use slm_tokenizer::Tokenizer;

fn smollm2() -> (slm_model::Llama, Tokenizer) {
    let path = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = slm_model::load(&path, &Device::Cpu).unwrap();
    let tok = Tokenizer::for_model(&m.source).unwrap();
    (m.model, tok)
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn a_batched_step_computes_each_sequence_as_it_would_alone() {
    let (model, tok) = smollm2();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time, in a land far away, there lived",
        "2 + 2 =",
    ]
    .iter()
    .map(|p| tok.encode(p, false).unwrap())
    .collect();

    // Alone: each prompt, then two more tokens (its greedy choices).
    let mut alone = Vec::new();
    for p in &prompts {
        let mut cache = model.new_cache();
        let mut steps = vec![model.next_logits(p, &mut cache).unwrap()];
        for _ in 0..2 {
            let next = slm_runtime::argmax(steps.last().unwrap());
            steps.push(model.next_logits(&[next], &mut cache).unwrap());
        }
        alone.push(steps);
    }

    // Together: the first prompt starts alone, the other two join while it decodes (a prompt
    // and a decode step in one batch), then all three decode together.
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let [c0, c1, c2] = caches.as_mut_slice() else {
        unreachable!()
    };
    let first = model
        .next_logits_batch(&mut [(prompts[0].as_slice(), &mut *c0)])
        .unwrap();
    assert_eq!(first[0], alone[0][0]);
    let t0 = [slm_runtime::argmax(&first[0])];
    let mixed = model
        .next_logits_batch(&mut [
            (t0.as_slice(), &mut *c0),
            (prompts[1].as_slice(), &mut *c1),
            (prompts[2].as_slice(), &mut *c2),
        ])
        .unwrap();
    assert_eq!(mixed[0], alone[0][1], "decode row beside two prompts");
    assert_eq!(mixed[1], alone[1][0], "prompt beside a decode row");
    assert_eq!(mixed[2], alone[2][0]);
    let next: Vec<[u32; 1]> = mixed.iter().map(|l| [slm_runtime::argmax(l)]).collect();
    let step = model
        .next_logits_batch(&mut [
            (next[0].as_slice(), &mut *c0),
            (next[1].as_slice(), &mut *c1),
            (next[2].as_slice(), &mut *c2),
        ])
        .unwrap();
    assert_eq!(step[0], alone[0][2]);
    assert_eq!(step[1], alone[1][1]);
    assert_eq!(step[2], alone[2][1]);
}

/// Collects a sequence's events; `close_after` tokens later it stops listening, as a client
/// that disconnects does.
struct TestSink {
    tx: mpsc::Sender<Event>,
    seen: usize,
    close_after: Option<usize>,
    closed: Arc<AtomicBool>,
}

impl Sink for TestSink {
    fn send(&mut self, event: Event) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        if matches!(event, Event::Text { .. }) {
            self.seen += 1;
            if self.close_after == Some(self.seen) {
                self.closed.store(true, Ordering::SeqCst);
            }
        }
        self.tx.send(event).is_ok()
    }
    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

fn sink(close_after: Option<usize>) -> (Box<TestSink>, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let s = TestSink {
        tx,
        seen: 0,
        close_after,
        closed: Arc::new(AtomicBool::new(false)),
    };
    (Box::new(s), rx)
}

fn collect(rx: &mpsc::Receiver<Event>) -> (String, Usage) {
    let mut text = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)).expect("an event") {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Done(u) => return (text, u),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}

fn job(prompt: Vec<u32>, max_tokens: usize) -> Job {
    Job {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        logprobs: None,
        deadline: None,
        json: None,
        ignore_eos: false,
    }
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn the_engine_generates_what_generate_does_and_reuses_a_shared_prefix() {
    let (model, tok) = smollm2();
    let system = "You are a helpful assistant who answers briefly and to the point.";
    let template = tok.chat_template.as_ref().unwrap();
    let chat = |q: &str| {
        let m = [
            slm_tokenizer::chat::Message::new("system", system),
            slm_tokenizer::chat::Message::new("user", q),
        ];
        tok.encode(&template.render(&m, true).unwrap(), false)
            .unwrap()
    };
    let prompts = [
        chat("What is the capital of France?"),
        chat("Name three colours."),
        tok.encode("The whale swam", false).unwrap(),
        chat("Why is the sky blue?"),
    ];
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            let mut s = Session::new(&model);
            let opts = GenerateOptions {
                max_tokens: 20,
                sampling: SamplingParams::greedy(),
                ..Default::default()
            };
            generate(
                &model,
                &tok,
                &mut s,
                p,
                &opts,
                |_| ControlFlow::Continue(()),
            )
            .unwrap()
            .text
        })
        .collect();

    let engine = Engine::start(
        Arc::new(model.clone()),
        Arc::new(
            Tokenizer::for_model(
                &slm_model::source(&slm_model::assets::require(
                    "models/SmolLM2-135M-Instruct.Q4_1.gguf",
                ))
                .unwrap(),
            )
            .unwrap(),
        ),
        EngineConfig::new(&model, 4, 512),
    );
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (s, rx) = sink(None);
            engine.submit(job(p.clone(), 20), s).unwrap();
            rx
        })
        .collect();
    let mut cached = 0;
    for (rx, want) in receivers.iter().zip(&expected) {
        let (text, usage) = collect(rx);
        assert_eq!(&text, want);
        assert!(matches!(
            usage.finish,
            FinishReason::Length | FinishReason::Eos
        ));
        cached += usage.cached_tokens;
    }
    // The chats share the system prompt: later ones copy it from the first.
    assert!(cached > 20, "shared prefix reused: {cached} tokens");

    // A client that stops listening after 3 tokens stops costing steps at once.
    let before = engine.stats().generated_tokens.load(Ordering::SeqCst);
    let (s, rx) = sink(Some(3));
    engine.submit(job(prompts[2].clone(), 400), s).unwrap();
    let t = Instant::now();
    while engine.stats().cancelled.load(Ordering::SeqCst) == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "never cancelled");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let spent = engine.stats().generated_tokens.load(Ordering::SeqCst) - before;
    assert_eq!(spent, 3, "tokens generated for a client that left after 3");
    assert_eq!(engine.stats().running.load(Ordering::SeqCst), 0);
    assert_eq!(rx.try_iter().count(), 3, "events sent before it closed");
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn constrained_output_always_parses_and_follows_the_schema() {
    let (model, tok) = smollm2();
    let template = tok.chat_template.as_ref().unwrap();
    let prompt = tok
        .encode(
            &template
                .render(
                    &[slm_tokenizer::chat::Message::new(
                        "user",
                        "Describe a ship as JSON: its name, crew size, whether it has sails, and ports.",
                    )],
                    true,
                )
                .unwrap(),
            false,
        )
        .unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "crew": {"type": "integer"},
            "sails": {"type": "boolean"},
            "ports": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "class": {"enum": ["whaler", "frigate", null]}
        },
        "required": ["name", "crew", "sails", "ports", "class"],
        "additionalProperties": false
    });
    let grammar =
        Arc::new(slm_runtime::json_constraint::JsonGrammar::from_schema(&schema).unwrap());
    let engine = Engine::start(
        Arc::new(model.clone()),
        Arc::new(tok),
        EngineConfig::new(&model, 4, 1024),
    );
    // Hot sampling, many seeds: the model would wander off JSON on its own.
    let receivers: Vec<_> = (0..8u64)
        .map(|seed| {
            let (s, rx) = sink(None);
            let mut j = job(prompt.clone(), 300);
            j.sampling = SamplingParams {
                temperature: 1.3,
                top_k: 100,
                top_p: 1.0,
                min_p: 0.0,
                seed,
                ..SamplingParams::default()
            };
            j.json = Some(grammar.clone());
            engine.submit(j, s).unwrap();
            rx
        })
        .collect();
    let mut ended = 0;
    for rx in &receivers {
        let (text, usage) = collect(rx);
        if usage.finish == FinishReason::Length {
            continue; // cut by max_tokens: the one way a constrained output may be partial
        }
        ended += 1;
        assert_eq!(usage.finish, FinishReason::Eos, "{text}");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let o = v.as_object().unwrap();
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(keys, ["name", "crew", "sails", "ports", "class"], "{text}");
        assert!(o["name"].is_string() && o["sails"].is_boolean(), "{text}");
        assert!(o["crew"].is_i64() || o["crew"].is_u64(), "{text}");
        let ports = o["ports"].as_array().unwrap();
        assert!(
            ports.len() <= 3 && ports.iter().all(|p| p.is_string()),
            "{text}"
        );
        assert!(
            ["\"whaler\"", "\"frigate\"", "null"].contains(&o["class"].to_string().as_str()),
            "{text}"
        );
    }
    assert!(ended >= 4, "only {ended} of 8 outputs ended by themselves");
}
