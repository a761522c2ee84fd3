//! Prints the first logits and the argmax after a prompt of token ids, then a greedy
//! continuation: the same lines as a llama.cpp program that does the same, for finding where
//! two engines part.
//!
//! cargo run --release -p slm-model --example logits -- MODEL "504 3575 282"

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let loaded =
        slm_model::load(std::path::Path::new(&args[1]), &candle_core::Device::Cpu).expect("model");
    let ids: Vec<u32> = args[2]
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let model = &loaded.model;
    let mut cache = model.new_cache();
    let mut logits = model.next_logits(&ids, &mut cache).unwrap();
    let mut line = Vec::new();
    for step in 0..8 {
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        if step == 0 {
            let first: Vec<String> = (0..5).map(|i| format!("{i}:{:.9}", logits[i])).collect();
            println!(
                "logits: {} best {best}:{:.9}",
                first.join(" "),
                logits[best]
            );
        }
        line.push(best.to_string());
        logits = model.next_logits(&[best as u32], &mut cache).unwrap();
    }
    println!("{}", line.join(" "));
}
