//! Heap allocations and minor page faults per update of the fused trainer on a benchmark
//! shape, counted by a wrapping global allocator and getrusage (bench/RESULTS.md):
//!
//!     cargo run --release -p slm-train --example step_allocations [tiny|small]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static COUNT: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, counting on the way.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        COUNT.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn minor_faults() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_minflt
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shape: slm_train::bench::Shape = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tiny".into())
        .parse()?;
    let (cfg, batch) = shape.config();
    let dev = candle_core::Device::Cpu;
    let vars = slm_train::init::init_params(&cfg, candle_core::DType::F32, 0, &dev)?;
    let mut tr = slm_train::trainer::Trainer::new(&cfg, batch, Default::default(), &vars)?;
    let tokens: Vec<u32> = (0..tr.tokens_per_batch())
        .map(|i| (i * 7919 % cfg.vocab_size) as u32)
        .collect();
    for step in 0..5 {
        let (c, b, f) = (
            COUNT.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
            minor_faults(),
        );
        tr.zero_grads();
        tr.accumulate(&tokens, 1.0)?;
        let norm = tr.grad_norm();
        tr.step(1e-3, 1.0 / norm.max(1.0));
        println!(
            "update {step}: {} allocations, {:.1} MB allocated, {} minor page faults",
            COUNT.load(Ordering::Relaxed) - c,
            (BYTES.load(Ordering::Relaxed) - b) as f64 / 1e6,
            minor_faults() - f
        );
    }
    Ok(())
}
