//! A short version of bench/serve-load.sh: concurrent streaming clients for 20 seconds, a
//! fifth of them leaving mid-stream (bench/serve_load.py load checks no errors, [DONE] on
//! every finished stream, bounded RSS, and that generation stops for clients that left).

mod common;

use common::Server;

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn concurrent_streams_with_departures_finish_cleanly() {
    let model = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = Server::start(&[model.to_str().unwrap(), "--metrics", "--parallel", "8"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/serve_load.py");
    let py = std::env::var("SLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let pid = server.pid().to_string();
    let stdout = common::run_python(
        &py,
        script,
        &[
            "load",
            &server.base,
            "--clients",
            "20",
            "--seconds",
            "20",
            "--max-rss-mb",
            "600",
            "--pid",
            &pid,
        ],
    );
    eprintln!("{stdout}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(summary["streams_left_midway"].as_u64().unwrap() > 0);
    assert_eq!(summary["error_count"], 0);
}
