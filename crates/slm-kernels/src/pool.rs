//! A persistent worker pool for the inference kernels.
//!
//! Why not rayon: a decode step is ~250 small parallel sections (each matmul of a 135M model
//! is 20-60 µs), called from a thread outside rayon's pool. Rayon then sends the job to a
//! worker and puts the caller to sleep on a lock, so every section pays two context switches,
//! and idle rayon workers go to sleep between sections: measured, a third of a decode step
//! was spent in the scheduler. Here the caller runs tasks itself, and the workers spin for a
//! while after each section before they sleep, so back-to-back sections start in well under a
//! microsecond.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A pointer the tasks of one section write disjoint parts of a buffer through (each task
/// its own rows or columns; the caller's contract says which).
pub struct OutPtr<T>(pub *mut T);
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: tasks write disjoint elements only, as each user documents at its write.
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}
impl<T> OutPtr<T> {
    /// Through a method, so closures capture the wrapper (Sync), not the raw pointer field.
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// How long an idle worker spins for the next section before it sleeps.
const SPIN: Duration = Duration::from_micros(100);

struct Shared {
    /// Epoch (high 32 bits) and next unclaimed task (low 32 bits): one word, so that a task can
    /// only be claimed in the section it belongs to.
    state: AtomicU64,
    /// Tasks in the current section.
    tasks: AtomicUsize,
    /// The current section's closure as the two words of a fat pointer (see `run`).
    job: [AtomicUsize; 2],
    /// Tasks finished in the current section.
    done: AtomicUsize,
    /// A task of the current section panicked (on a worker; the caller re-raises it).
    panicked: AtomicBool,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// One section at a time: `run` from two threads at once would mix their tasks.
    caller: Mutex<()>,
}

type Job<'a> = &'a (dyn Fn(usize) + Sync);

thread_local! {
    /// Set while this thread runs a section's tasks: a section started from inside one runs
    /// serially on the spot (waiting for the pool would wait for itself).
    static IN_SECTION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Pool {
    /// A pool of `threads` including the caller (so `threads - 1` workers).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            tasks: AtomicUsize::new(0),
            job: [AtomicUsize::new(0), AtomicUsize::new(0)],
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        let threads = threads.max(1);
        for i in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("slm-kernel-{i}"))
                .spawn(move || worker(&s))
                .expect("cannot start a kernel worker thread");
        }
        Self {
            shared,
            threads,
            caller: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// `0..units` cut into spans of whole `align`s (at least one), about four per thread so
    /// that threads of uneven speed even out.
    pub(crate) fn spans(
        &self,
        units: usize,
        align: usize,
    ) -> impl Iterator<Item = std::ops::Range<usize>> {
        let span = units
            .div_ceil(self.threads * 4)
            .next_multiple_of(align)
            .max(align);
        (0..units)
            .step_by(span)
            .map(move |u| u..(u + span).min(units))
    }

    /// Runs `f(0..n)` across the pool and returns when every task is done.
    pub fn run(&self, n: usize, f: impl Fn(usize) + Sync) {
        if n == 0 {
            return;
        }
        if self.threads == 1 || n == 1 || IN_SECTION.with(|s| s.get()) {
            (0..n).for_each(f);
            return;
        }
        assert!(n < u32::MAX as usize, "too many tasks for one section");
        let _one = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let job: Job = &f;
        // SAFETY: a fat pointer is two words; workers rebuild it only for a task of this
        // section, and `run` returns (so `f` outlives them) only once all tasks are done.
        let words: [usize; 2] = unsafe { std::mem::transmute(job) };
        // Close the previous section before touching its job, count and done: a worker still
        // in `claim` for it could otherwise read the new (larger) count while the old epoch
        // stands, take a task of this section under the old epoch, and add to the new `done`,
        // so that this `run` returned before its last task had finished. Closing moves to an
        // epoch that has no tasks; opening moves to the next one.
        let closed = (s.state.load(Ordering::Relaxed) >> 32).wrapping_add(1) & 0xFFFF_FFFF;
        s.state.store(closed << 32 | CLOSED, Ordering::SeqCst);
        s.job[0].store(words[0], Ordering::Relaxed);
        s.job[1].store(words[1], Ordering::Relaxed);
        s.tasks.store(n, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        let epoch = closed.wrapping_add(1) & 0xFFFF_FFFF;
        s.state.store(epoch << 32, Ordering::Release);
        if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        IN_SECTION.with(|s| s.set(true));
        while let Some(i) = claim(s, epoch) {
            f(i);
            s.done.fetch_add(1, Ordering::Release);
        }
        IN_SECTION.with(|s| s.set(false));
        while s.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a kernel task panicked on a worker thread");
        }
    }
}

/// The task index of a closed section: above any count `run` accepts.
const CLOSED: u64 = 0xFFFF_FFFF;

/// The next task of section `epoch`, if any is left.
fn claim(s: &Shared, epoch: u64) -> Option<usize> {
    let mut cur = s.state.load(Ordering::Acquire);
    loop {
        let i = (cur & 0xFFFF_FFFF) as usize;
        if cur >> 32 != epoch || i >= s.tasks.load(Ordering::Acquire) {
            return None;
        }
        match s
            .state
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(i),
            Err(now) => cur = now,
        }
    }
}

fn worker(s: &Shared) {
    IN_SECTION.with(|s| s.set(true));
    let mut seen = 0u64;
    loop {
        // Wait for a new section: spin, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.state.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            spins += 1;
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                while s.state.load(Ordering::Acquire) >> 32 == seen {
                    sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                }
                *sleepers -= 1;
            }
            std::hint::spin_loop();
        };
        seen = epoch;
        // A task is claimed before the closure is read; a stale read is never called,
        // because its claim would have failed (see Shared::state).
        while let Some(i) = claim(s, epoch) {
            let words = [
                s.job[0].load(Ordering::Acquire),
                s.job[1].load(Ordering::Acquire),
            ];
            // SAFETY: the claim succeeded in this section, so the caller of `run` is still
            // waiting and the closure these words point at is alive.
            let f: Job = unsafe { std::mem::transmute(words) };
            // A panic must still count the task as done, or the caller would wait forever.
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
            s.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// Runs `f(start, part)` over consecutive parts of `out` of `chunk` values (the last may be
/// shorter) on the global pool: elementwise and row-wise work of a prompt, which would
/// otherwise keep the other threads waiting between two matmuls.
pub fn for_chunks<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let (len, chunk) = (out.len(), chunk.max(1));
    let p = OutPtr(out.as_mut_ptr());
    global().run(len.div_ceil(chunk), |c| {
        let start = c * chunk;
        let n = chunk.min(len - start);
        // SAFETY: part c covers start..start + n, disjoint from every other part, within out.
        f(start, unsafe {
            std::slice::from_raw_parts_mut(p.get().add(start), n)
        })
    });
}

/// A vector of `len` values made on the global pool by `f(start, part)` over consecutive
/// parts of `chunk` values (as `for_chunks`), without zeroing it first: every prompt-sized
/// activation would otherwise be written twice, the first time serially on the calling thread.
///
/// # Safety
/// `f` writes every value of each part it is given.
pub unsafe fn fill_chunks<T: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    for_chunks(&mut v.spare_capacity_mut()[..len], chunk, f);
    // SAFETY: the parts cover 0..len and the caller's `f` wrote every value of each.
    unsafe { v.set_len(len) };
    v
}

/// `s` as memory for the kernels to write, the type the matmuls take their outputs as (so
/// that a fresh output need not be zeroed first; see `ggml_math::matmul_fwd`).
///
/// # Safety
/// Only initialised values may be written through the result (as the kernels do): writing
/// `MaybeUninit::uninit()` would leave `s` holding uninitialised floats.
pub unsafe fn as_uninit(s: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller writes initialised values only.
    unsafe { &mut *(s as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the kernel threads (the caller included) before first use; later calls are ignored.
pub fn init(threads: usize) {
    let _ = POOL.set(Pool::new(threads));
}

/// The process's kernel pool: `init`'s size, or one thread per core.
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| {
        Pool::new(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_section() {
        let pool = Pool::new(3);
        for n in [1, 2, 5, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                pool.run(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 50),
                "n={n}"
            );
        }
    }

    /// Back-to-back sections whose task counts grow: a worker that was still claiming in the
    /// previous section must not take a task of the next one (which it once could, between the
    /// caller's writes of the new count and the new epoch, running a task twice and letting
    /// `run` return before its last task had finished).
    #[test]
    fn a_section_returns_only_after_each_of_its_tasks_ran_once() {
        // More threads than this machine's cores, so the caller is often preempted between
        // its writes.
        let pool = Pool::new(4);
        let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..400_000usize {
            let n = 2 + round % 63;
            pool.run(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            for (i, h) in hits[..n].iter().enumerate() {
                assert_eq!(
                    h.swap(0, Ordering::Relaxed),
                    1,
                    "round {round}, task {i} of {n}"
                );
            }
        }
    }

    #[test]
    fn a_section_inside_a_task_runs_serially() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        pool.run(4, |_| {
            pool.run(3, |j| {
                sum.fetch_add(j, Ordering::Relaxed);
            });
        });
        assert_eq!(sum.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn sections_after_the_workers_sleep_still_run() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        pool.run(4, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 3);
        pool.run(4, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 12);
    }
}
