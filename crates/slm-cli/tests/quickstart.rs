//! The README's main job on its fallback: `slm quickstart` with no fetched corpora, run from
//! a folder with nothing of the repository in it, trains on the chapters embedded in the
//! binary and reports a held-out perplexity and samples.

mod common;
use common::{ok, slm};

#[test]
fn quickstart_runs_on_the_bundled_corpus_from_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let empty_assets = dir.path().join("no-assets");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = slm()
        .args(["quickstart", "--minutes", "0.05", "--seed", "3"])
        .env("SLM_ASSETS", &empty_assets)
        .current_dir(&work)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("bundled chapters of Moby-Dick"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("held-out perplexity"), "{stdout}");
    assert_eq!(stdout.matches("sample: ").count(), 3, "{stdout}");
    let model = work.join("runs/quickstart/run/model");
    assert!(model.join("model.safetensors").is_file());
    // The model it wrote loads and generates.
    let text = ok(slm()
        .arg("generate")
        .arg(&model)
        .args(["-p", "Call me", "-n", "5", "--seed", "1"]));
    assert!(text.starts_with("Call me"), "{text}");
}
