//! Embeds the public-domain chapters in data/quickstart into the library, so that `slm
//! quickstart` from an installed binary (no repository beside it) still has a corpus.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../../data/quickstart");
    println!("cargo::rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a folder entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut out = String::from("/// (file name, text) of each bundled chapter, in order.\n");
    out.push_str("pub static CHAPTERS: &[(&str, &str)] = &[\n");
    for f in &files {
        let path = f.canonicalize().expect("an existing file");
        let name = f.file_name().expect("a file name").to_string_lossy();
        out.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    out.push_str("];\n");
    let dest =
        PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("bundled_corpus.rs");
    std::fs::write(dest, out).expect("writing into OUT_DIR");
}
