//! The web chat page of `slm serve` in headless Chromium (tests/support/page_test.py drives it
//! over WebDriver): it loads, a message streams a reply, Stop works, and a reply containing
//! `<script>` or `<img onerror>` shows as text.

mod common;

use common::Server;

#[test]
#[cfg_attr(
    not(all(smollm2_q4_1, chromedriver)),
    ignore = "needs ../shared/fetch-assets.sh models and chromium with chromium-driver"
)]
fn the_chat_page_streams_stops_and_shows_markup_as_text() {
    let model = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = Server::start(&[model.to_str().unwrap(), "--metrics"]);
    let py = std::env::var("SLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/page_test.py");
    let stdout = common::run_python(&py, script, &[server.base.as_str()]);
    assert!(stdout.contains("page: ok"), "{stdout}");
}
