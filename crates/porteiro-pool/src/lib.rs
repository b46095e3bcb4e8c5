//! A persistent worker pool for the forward passes: the decoder's (`porteiro-engine`) and the sentence
//! encoder's (`porteiro-encoder`). Decoding a small model issues hundreds of tiny parallel steps per
//! token, so spawning threads (or waking parked ones) per step would dominate: workers spin on a
//! generation counter for a while after each job and only then park.

// A kernel module: the job is a borrowed closure handed to the workers through a raw pointer that
// outlives no call of `run` (each unsafe use says why it is sound).
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    generation: AtomicUsize,
    done: AtomicUsize,
    sleeping: AtomicUsize,
    stop: AtomicBool,
    /// The current job; written by the caller before `generation` is bumped, read by workers after.
    job: UnsafeCell<Option<*const Job>>,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written while no worker runs (between jobs) and published through the
// generation counter with release/acquire ordering.
unsafe impl Sync for Shared {}
// SAFETY: the raw pointer in `job` is the only field that is not `Send`; it points to a closure that is
// `Sync` and outlives every use of it (see `ThreadPool::run`), so any thread may call it.
unsafe impl Send for Shared {}

pub struct ThreadPool {
    n: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// `run` is not reentrant; this serialises callers that share the pool.
    busy: Mutex<()>,
}

/// Busy-wait iterations before a waiting thread starts yielding its core (tens of microseconds: covers
/// the gap between two parallel steps of one token), and before a worker parks (about a millisecond).
/// Yielding in between keeps the pool usable when the machine is oversubscribed.
const SPIN: usize = 2_000;
const PARK_AFTER: usize = 20_000;

impl ThreadPool {
    /// A pool of `n` threads in total: the caller's thread plus `n - 1` workers. Fails if the OS
    /// refuses to start a worker (those already started are stopped again).
    pub fn new(n: usize) -> std::io::Result<Self> {
        Self::named(n, "porteiro-worker")
    }

    /// `new`, naming the workers `{name}-{index}` (what `top -H` and `ps -L` show).
    pub fn named(n: usize, name: &str) -> std::io::Result<Self> {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        // Built before the workers so that, if one fails to start, dropping it stops the others.
        let mut pool = Self {
            n,
            shared,
            workers: Vec::with_capacity(n - 1),
            busy: Mutex::new(()),
        };
        for idx in 1..n {
            let s = pool.shared.clone();
            let w = std::thread::Builder::new()
                .name(format!("{name}-{idx}"))
                .spawn(move || worker(s, idx, n))?;
            pool.workers.push(w);
        }
        Ok(pool)
    }

    /// Lowers the priority of every thread of the pool, the calling one included, to `nice` (Linux
    /// keeps niceness per thread; raising it needs no privilege). Best effort: where the OS refuses or
    /// has no such notion, nothing changes.
    pub fn lower_priority(&self, nice: i32) {
        self.run(&|_, _| lower_this_thread(nice));
    }

    #[inline]
    pub fn threads(&self) -> usize {
        self.n
    }

    /// Runs `f(thread_index, n_threads)` on every thread of the pool and returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.n == 1 {
            f(0, 1);
            return;
        }
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: we wait below until every
        // worker has finished with the job before returning (and thus before `f` can be dropped).
        let ptr: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), &'static Job>(f) };
        // SAFETY: no worker reads `job` now: each finished the previous job (counted in `done`) before
        // this call could start, and none reads it again before the generation bump below.
        unsafe { *s.job.get() = Some(ptr) };
        s.done.store(0, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        f(0, self.n);
        let mut spins = 0usize;
        while s.done.load(Ordering::Acquire) < self.n - 1 {
            spins += 1;
            if spins < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn worker(s: Arc<Shared>, idx: usize, n: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        loop {
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            spins += 1;
            if spins < SPIN {
                std::hint::spin_loop();
                continue;
            }
            if spins < PARK_AFTER {
                std::thread::yield_now();
                continue;
            }
            let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            if s.generation.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
            }
            s.sleeping.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        // SAFETY: published by `run` before the generation bump we just observed.
        if let Some(job) = unsafe { *s.job.get() } {
            // SAFETY: `run` keeps the closure alive until every worker has counted itself in `done`,
            // which this one does only after the call returns.
            unsafe { (*job)(idx, n) };
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Sets the calling thread's niceness (Linux: per thread).
#[cfg(target_os = "linux")]
pub fn lower_this_thread(nice: i32) {
    // SAFETY: plain syscalls with integer arguments; they only change this thread's priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

#[cfg(not(target_os = "linux"))]
pub fn lower_this_thread(_nice: i32) {}

/// The half-open range of `0..n` that thread `i` of `t` handles, in multiples of `align`. `#[inline]`:
/// the kernels' closures call it per step from other crates, as they did when it was the engine's.
#[inline]
pub fn split(n: usize, i: usize, t: usize, align: usize) -> std::ops::Range<usize> {
    let units = n.div_ceil(align);
    let per = units / t;
    let rem = units % t;
    let start = i * per + i.min(rem);
    let end = start + per + usize::from(i < rem);
    (start * align).min(n)..(end * align).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_job() {
        let pool = ThreadPool::new(3).unwrap();
        let hits = AtomicUsize::new(0);
        for _ in 0..1000 {
            pool.run(&|_, n| {
                assert_eq!(n, 3);
                hits.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(hits.load(Ordering::Relaxed), 3000);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn lowering_the_priority_reaches_every_thread() {
        // A pool of its own, so the test thread's own niceness is what the caller side changes.
        std::thread::spawn(|| {
            let pool = ThreadPool::named(3, "nice-test").unwrap();
            pool.lower_priority(7);
            let seen = std::sync::Mutex::new(Vec::new());
            pool.run(&|i, _| {
                // SAFETY: plain syscalls reading this thread's own priority.
                let nice = unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::getpriority(libc::PRIO_PROCESS, tid)
                };
                seen.lock().unwrap().push((i, nice));
            });
            let mut seen = seen.into_inner().unwrap();
            seen.sort();
            assert_eq!(seen, vec![(0, 7), (1, 7), (2, 7)]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = ThreadPool::new(2).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let hits = AtomicUsize::new(0);
        pool.run(&|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_covers_range_exactly() {
        for n in [0usize, 1, 5, 64, 100, 1000] {
            for t in 1..5 {
                let mut covered = 0;
                for i in 0..t {
                    let r = split(n, i, t, 4);
                    assert_eq!(r.start, covered.min(n));
                    covered = r.end;
                }
                assert_eq!(covered, n);
            }
        }
    }
}
