// Included by the build scripts of crates whose tests need a fetched asset (a model from
// ../shared/fetch-assets.sh, or a Python with torch and transformers). libtest cannot mark a
// test ignored while it runs, so the build script decides: a cfg is set when the asset is
// there, or when `CI` is set (CI fetches everything, so a missing asset must fail there). A
// test carries `#[cfg_attr(not(CFG), ignore = "...")]`: elsewhere it shows as ignored, never
// as passed.

#[allow(dead_code)]
fn assets_dir() -> std::path::PathBuf {
    std::env::var_os("SLM_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/slm/assets")
        })
}

/// Sets `cfg(name)` when `rel` (a file under the assets folder) exists, or under CI.
#[allow(dead_code)]
fn asset_cfg(name: &str, rel: &str) {
    println!("cargo::rustc-check-cfg=cfg({name})");
    println!("cargo::rerun-if-env-changed=SLM_ASSETS");
    println!("cargo::rerun-if-env-changed=HOME");
    println!("cargo::rerun-if-env-changed=CI");
    let path = assets_dir().join(rel);
    // Watch the file, or while it is missing the nearest folder that exists: fetching it
    // changes that folder, and the cfg is decided again.
    let mut watch = path.clone();
    while !watch.exists() {
        match watch.parent() {
            Some(p) if p != watch => watch = p.to_path_buf(),
            _ => break,
        }
    }
    println!("cargo::rerun-if-changed={}", watch.display());
    if path.is_file() || std::env::var_os("CI").is_some() {
        println!("cargo::rustc-cfg={name}");
    }
}

/// Sets `cfg(name)` when `$SLM_PYTHON` (else `python3`) imports every module of `modules`,
/// or under CI.
#[allow(dead_code)]
fn python_cfg(name: &str, modules: &str) {
    println!("cargo::rustc-check-cfg=cfg({name})");
    println!("cargo::rerun-if-env-changed=SLM_PYTHON");
    println!("cargo::rerun-if-env-changed=CI");
    let py = std::env::var("SLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = runs(&py, &["-c", &format!("import {modules}")]);
    if ok || std::env::var_os("CI").is_some() {
        println!("cargo::rustc-cfg={name}");
    }
}

/// Sets `cfg(name)` when `program --version` runs, or under CI.
#[allow(dead_code)]
fn program_cfg(name: &str, program: &str) {
    println!("cargo::rustc-check-cfg=cfg({name})");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=CI");
    if runs(program, &["--version"]) || std::env::var_os("CI").is_some() {
        println!("cargo::rustc-cfg={name}");
    }
}

/// Whether `program args` runs and succeeds.
#[allow(dead_code)]
fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
