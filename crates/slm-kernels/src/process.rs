//! Process-wide set-up that every entry point wants and libraries and tests get too: the
//! worker threads (rayon's, candle's and the kernel pool's, one count for all), the
//! allocator's policy, and the peak memory measure the benchmarks report.

use std::sync::Once;

/// One thread count for rayon, candle's matmuls (which read RAYON_NUM_THREADS) and the
/// kernel pool: `threads`, else every core. Takes effect once per process (rayon's global
/// pool cannot be rebuilt); returns the count.
pub fn init_threads(threads: Option<usize>) -> usize {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // Before any thread of rayon's or candle's reads the environment.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    crate::pool::init(threads);
    threads
}

/// glibc hands every allocation over its (adaptive, at most 32 MiB) mmap threshold straight
/// back to the kernel when it is freed, so a training step, which allocates and frees
/// buffers of megabytes (gemm's packing among them), spends much of its time in page faults
/// and zeroing fresh pages (`slm bench --train` shows the difference). Large blocks are kept
/// on the heap for reuse instead; peak memory is unchanged in kind, since what is freed is
/// soon allocated again. Called by the trainer, so every user of it gets this; idempotent.
pub fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets allocator parameters, under glibc's own lock.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}

/// Hands the heap's free pages back to the system (what `keep_freed_memory` otherwise keeps).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages; it is safe at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Peak resident memory of this process (VmHWM), in MB; 0 where the system does not say.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// This machine's physical memory in bytes (MemTotal), or None where the system does not
/// say. `SLM_MEMORY_BYTES` overrides it, so a test can pose as a small machine.
pub fn physical_memory_bytes() -> Option<u64> {
    if let Some(v) = std::env::var("SLM_MEMORY_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(v);
    }
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    })
}

/// The kernel set the matmuls run here ("avx512", "avx2" or "portable"; SLM_KERNELS may
/// narrow it), so results say what they measured.
pub fn kernel_set() -> &'static str {
    match crate::ggml_math::Isa::best() {
        Some(crate::ggml_math::Isa::Avx512) => "avx512",
        Some(crate::ggml_math::Isa::Avx2) => "avx2",
        None => "portable",
    }
}
