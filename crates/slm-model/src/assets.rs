//! Where `../shared/fetch-assets.sh` unpacks models and data: `$SLM_ASSETS`, else
//! `~/.cache/slm/assets`.

use std::path::PathBuf;

pub fn dir() -> PathBuf {
    std::env::var_os("SLM_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/slm/assets")
        })
}

/// For tests that need a large asset (`rel` under the assets dir, e.g.
/// `models/SmolLM2-135M-Instruct.Q4_1.gguf`): its path, or None after printing why the test
/// skips. In CI (`CI` set) a missing asset fails the test instead: CI fetches every asset.
pub fn require_for_test(rel: &str) -> Option<PathBuf> {
    let p = dir().join(rel);
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} missing in CI: run ../shared/fetch-assets.sh models",
        p.display()
    );
    eprintln!(
        "skipping: {} not present (run ../shared/fetch-assets.sh models)",
        p.display()
    );
    None
}
