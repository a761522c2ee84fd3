//! Developer tool for numeric comparisons with llama.cpp: runs one prompt given as token ids,
//! writes the last position's logits as raw little-endian f32 to OUT, and prints the greedy
//! continuation ids.
//!
//!     cargo run --release -p slm-model --example dump_logits -- MODEL OUT N_GREEDY ID...

use candle_core::Device;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: dump_logits MODEL OUT N_GREEDY ID..."
    );
    let loaded = slm_model::load(std::path::Path::new(&args[0]), &Device::Cpu)?;
    let n_greedy: usize = args[2].parse()?;
    let ids: Vec<u32> = args[3..]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let model = &loaded.model;
    // SLM_TAP_DIR=DIR: also write every intermediate tensor of the prompt pass as DIR/NAME.bin.
    if let Some(dir) = std::env::var_os("SLM_TAP_DIR") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        slm_model::tap::set(Some(Box::new(move |name, t| {
            let v: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .unwrap_or_default();
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let _ = std::fs::write(dir.join(format!("{name}.bin")), bytes);
        })));
    }
    let mut cache = model.new_cache();
    let mut logits = model.next_logits(&ids, &mut cache)?;
    slm_model::tap::set(None);
    let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&args[1], bytes)?;
    let mut greedy = Vec::new();
    for _ in 0..n_greedy {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0);
        greedy.push(next.to_string());
        logits = model.next_logits(&[next], &mut cache)?;
    }
    println!("greedy: {}", greedy.join(" "));
    Ok(())
}
