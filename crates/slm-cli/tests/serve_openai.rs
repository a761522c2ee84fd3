//! `slm serve` with the official `openai` Python client, unchanged
//! (tests/support/openai_client.py): chat and text completions whole and streamed,
//! logprobs, embeddings against sentence-transformers (1e-5 cosine), models.list, errors as
//! the client's exception classes.

mod common;

use common::{python_with, Server};

#[test]
#[cfg_attr(
    not(all(smollm2_q4_1, python_openai)),
    ignore = "needs ../shared/fetch-assets.sh models and a Python with openai and sentence-transformers"
)]
fn the_openai_client_works_unchanged() {
    let py = python_with("openai, sentence_transformers, numpy");
    let models = slm_model::assets::dir().join("models");
    let chat = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let embed = models.join("all-MiniLM-L6-v2");
    assert!(
        chat.is_file() && embed.is_dir(),
        "run ../shared/fetch-assets.sh models"
    );
    let server = Server::start(&[
        chat.to_str().unwrap(),
        "--embed",
        embed.to_str().unwrap(),
        "--api-key",
        "test-key",
        "--parallel",
        "2",
    ]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/openai_client.py"
    );
    let stdout = common::run_python(
        &py,
        script,
        &[
            server.base.as_str(),
            "test-key",
            "SmolLM2-135M-Instruct.Q4_1",
            embed.to_str().unwrap(),
        ],
    );
    eprintln!("{stdout}");
    assert!(stdout.contains("openai client: ok"));
}
