//! Mutated GGUF headers and tensor tables: the reader must return an error or a valid file,
//! never panic, and never allocate more than the file could hold (bounded by construction:
//! every count is checked against the bytes left before anything is allocated).

use std::io::Write;

use rand::{rngs::StdRng, Rng, SeedableRng};

/// The first `n` bytes of the real model when present (header + metadata + tensor table),
/// else a small hand-built file.
fn seed_file() -> Vec<u8> {
    let dir = std::env::var("SLM_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/slm/assets")
        });
    let p = dir.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if let Ok(bytes) = std::fs::read(&p) {
        // Header and tables are ~1.9 MB; keep 3 MB so tensor data starts inside.
        return bytes[..3 << 20].to_vec();
    }
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "w");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes()); // Q8_0
    b.extend_from_slice(&0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend_from_slice(&[0u8; 34]);
    b
}

#[test]
fn mutated_headers_and_tables_never_panic() {
    let seed = seed_file();
    let dir = std::env::temp_dir().join(format!("slm-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.gguf");
    let mut rng = StdRng::seed_from_u64(0x5eed);
    // Mutations are aimed at the first 64 KiB (header, counts, first metadata entries) and at
    // the tensor table near the end of the metadata, where lengths and offsets live.
    let hot = seed.len().min(2_000_000);
    let mut errors = 0;
    for round in 0..300 {
        let mut bytes = seed.clone();
        for _ in 0..rng.random_range(1..6) {
            let at = if rng.random_bool(0.6) {
                rng.random_range(0..bytes.len().min(65536))
            } else {
                rng.random_range(0..hot.min(bytes.len()))
            };
            match rng.random_range(0..4) {
                0 => bytes[at] = rng.random(),
                1 => {
                    // a huge little-endian length
                    let v: u64 = if rng.random_bool(0.5) {
                        u64::MAX - rng.random_range(0..4)
                    } else {
                        rng.random::<u32>() as u64
                    };
                    let end = (at + 8).min(bytes.len());
                    bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                }
                2 => bytes.truncate(at.max(1)),
                _ => bytes[at] ^= 1 << rng.random_range(0..8),
            }
        }
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let result = std::panic::catch_unwind(|| {
            if let Ok(g) = slm_model::GgufFile::open(&path) {
                // A file that parses must also load its tensors or say why, without panicking.
                for t in g.tensors.iter().take(4) {
                    let _ =
                        slm_model::weights::gguf_qtensor(&g, &t.name, &candle_core::Device::Cpu);
                }
                let _ = slm_model::Config::from_gguf(&g);
                true
            } else {
                false
            }
        });
        match result {
            Ok(parsed) => errors += usize::from(!parsed),
            Err(_) => panic!("round {round}: the reader panicked"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        errors > 50,
        "mutations should mostly be rejected, only {errors} were"
    );
}

#[test]
fn errors_name_the_file_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("slm-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("notgguf.gguf");
    std::fs::write(&p, b"PK\x03\x04 definitely a zip").unwrap();
    let err = slm_model::GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        err.contains("notgguf.gguf") && err.contains("not a GGUF file"),
        "{err}"
    );
    let missing = slm_model::load(&dir.join("nope.gguf"), &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(missing.contains("nope.gguf"), "{missing}");
    // Reading the source alone (the CLI does so to build the tokenizer first) names them too.
    for (path, want) in [
        ("nope.gguf", "no such file"),
        ("notgguf.gguf", "not a GGUF file"),
    ] {
        let err = slm_model::source(&dir.join(path))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(path) && err.contains(want), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
