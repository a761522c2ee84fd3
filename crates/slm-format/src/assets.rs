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
/// `models/SmolLM2-135M-Instruct.Q4_1.gguf`): its path. Such a test is marked
/// `#[cfg_attr(not(CFG), ignore)]` with the cfg its crate's build script sets when the asset
/// is present or `CI` is set (build-support/test_assets.rs), so it reaches here without the
/// asset only under CI, where that is a failure.
pub fn require(rel: &str) -> PathBuf {
    let p = dir().join(rel);
    assert!(
        p.is_file(),
        "{} missing: run ../shared/fetch-assets.sh models",
        p.display()
    );
    p
}
