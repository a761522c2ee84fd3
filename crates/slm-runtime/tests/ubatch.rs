//! A long prompt runs in llama.cpp's pieces of 512 tokens (`UBATCH`). For K-quant matrices the
//! pieces change the numbers: SmolLM2's Q4_K_M has Q6_K ffn_down and attn_v matrices, whose
//! rows llama.cpp sums one way in a batch of 8 rows or more and another below, so a 515-token
//! prompt's last 3 rows round differently in one batch of 515 than in llama.cpp's 512 + 3.

use candle_core::Device;
use slm_runtime::{Session, UBATCH};

#[path = "../../slm-compress/tests/support/q4_k_m.rs"]
mod q4_k_m;

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn a_long_prompt_runs_in_llama_cpps_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let model = slm_model::load(&q4_k_m::q4_k_m(dir.path()), &Device::Cpu)
        .unwrap()
        .model;
    // Any ids of the vocabulary make a prompt; these spread over its first 20,000.
    let prompt: Vec<u32> = (0..UBATCH as u32 + 3)
        .map(|i| (i * 7919 + 13) % 20_000)
        .collect();
    let mut session = Session::new(&model);
    let got = session.prefill(&model, &prompt).unwrap();
    assert_eq!(session.len(), prompt.len());

    let mut cache = model.new_cache();
    model.next_logits(&prompt[..UBATCH], &mut cache).unwrap();
    let pieces = model.next_logits(&prompt[UBATCH..], &mut cache).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&pieces));

    // In one batch the last rows take the other sum: not llama.cpp's numbers.
    let whole = model.next_logits(&prompt, &mut model.new_cache()).unwrap();
    assert_ne!(bits(&whole), bits(&pieces));
}
