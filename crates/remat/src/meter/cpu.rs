//! Host-heap metering through a counting global allocator.
//!
//! [`CountingAllocator`] forwards every request to [`std::alloc::System`] and
//! keeps two process-wide counters: the bytes live right now and their
//! high-water mark. Install it once per binary (and once per integration-test
//! binary) with [`install_counting_allocator!`](crate::install_counting_allocator);
//! read it through the free functions of this module or through [`CpuMeter`].
//!
//! # What is counted
//!
//! The counters track the *requested* sizes (`Layout::size`) of blocks obtained
//! through the global allocator, in every thread of the process. They do not see
//! the system allocator's own headers, padding or fragmentation, memory mapped
//! directly (thread stacks, `mmap`ed files) or device memory. A reallocation is
//! accounted as its size difference: the moment during a moving `realloc` when
//! both the old and the new block exist is not visible.
//!
//! # Orderings
//!
//! Every update is a single read-modify-write on one atomic, so `Relaxed` is
//! enough for each counter to be exact in its own modification order: `live`
//! never misses an update, and `peak` is raised with `fetch_max` to the value
//! that each growth produced, which makes it the exact maximum of the `live`
//! sequence (a maximum of `live` is always the result of a growth). No other
//! memory is published through these counters, so nothing needs
//! acquire/release.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::MemoryMeter;

/// Bytes currently allocated through [`CountingAllocator`].
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
/// High-water mark of [`LIVE_BYTES`] since start or the last [`reset_peak`].
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Set by the first allocation served by [`CountingAllocator`].
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A global allocator that delegates to [`System`] and counts live bytes and
/// their high-water mark.
///
/// Install it with [`install_counting_allocator!`](crate::install_counting_allocator)
/// (or a `#[global_allocator]` static of your own); it adds two relaxed atomic
/// updates and one relaxed load to each allocation.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator;

impl CountingAllocator {
    /// The allocator; `const` so that it can initialise a `#[global_allocator]` static.
    #[must_use]
    pub const fn new() -> Self {
        Self
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and returns its result unchanged; the bookkeeping only touches
// atomics, never allocates and never panics.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees for `layout`.
        let block = unsafe { System.alloc(layout) };
        if !block.is_null() {
            record_growth(layout.size());
        }
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees for `layout`.
        let block = unsafe { System.alloc_zeroed(layout) };
        if !block.is_null() {
            record_growth(layout.size());
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: `block` was allocated by this allocator, hence by `System`,
        // with `layout`, as the caller guarantees.
        unsafe { System.dealloc(block, layout) };
        record_shrink(layout.size());
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees for `block`, `layout`
        // and `new_size`.
        let moved = unsafe { System.realloc(block, layout, new_size) };
        // On failure the old block is untouched and still live: nothing changes.
        if !moved.is_null() {
            let old_size = layout.size();
            if new_size >= old_size {
                record_growth(new_size - old_size);
            } else {
                record_shrink(old_size - new_size);
            }
        }
        moved
    }
}

/// Adds `bytes` to the live count and raises the peak to the new live count.
#[inline]
fn record_growth(bytes: usize) {
    mark_installed();
    // `wrapping_add`: an allocator must never panic, and the sum of live
    // requested sizes cannot exceed the address space anyway.
    let live_now = LIVE_BYTES
        .fetch_add(bytes, Ordering::Relaxed)
        .wrapping_add(bytes);
    PEAK_BYTES.fetch_max(live_now, Ordering::Relaxed);
}

/// Removes `bytes` from the live count.
#[inline]
fn record_shrink(bytes: usize) {
    LIVE_BYTES.fetch_sub(bytes, Ordering::Relaxed);
}

/// Records that the allocator serves this process; a load first, so that the
/// shared cache line is written once, not on every allocation.
#[inline]
fn mark_installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// Bytes live through [`CountingAllocator`] right now, in all threads.
///
/// Always 0 when the allocator is not installed (see [`is_installed`]).
pub fn live_bytes() -> u64 {
    to_u64(LIVE_BYTES.load(Ordering::Relaxed))
}

/// The highest [`live_bytes`] seen since process start or the last
/// [`reset_peak`].
pub fn peak_bytes() -> u64 {
    to_u64(PEAK_BYTES.load(Ordering::Relaxed))
}

/// Lowers the peak to the bytes live now, starting a new high-water window.
///
/// The store is followed by a `fetch_max` with a fresh reading, so a growth
/// racing with the reset (whose own `fetch_max` the store may overwrite) is
/// still reflected: when this returns, the peak is at least the live count
/// observed at its end.
pub fn reset_peak() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
    PEAK_BYTES.fetch_max(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Whether [`CountingAllocator`] is the global allocator of this process.
///
/// The flag is set by the first allocation it serves; if none has been seen
/// yet, this makes one small probe allocation to find out, so the answer is
/// exact (a process cannot change its global allocator).
pub fn is_installed() -> bool {
    if INSTALLED.load(Ordering::Relaxed) {
        return true;
    }
    // `black_box` keeps the optimiser from eliding the allocation pair.
    drop(std::hint::black_box(Box::new(0_u8)));
    INSTALLED.load(Ordering::Relaxed)
}

fn to_u64(bytes: usize) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// The [`MemoryMeter`] of the host heap, reading [`CountingAllocator`]'s counters.
///
/// A zero-sized handle: create as many as you like, they share the
/// process-wide counters. It measures only when the allocator is installed
/// ([`MemoryMeter::is_measuring`]); otherwise every reading is 0.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuMeter;

impl CpuMeter {
    /// The name under which reports list this meter.
    pub const NAME: &'static str = "cpu-heap";
}

impl MemoryMeter for CpuMeter {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn live_bytes(&self) -> u64 {
        live_bytes()
    }

    fn peak_bytes(&self) -> u64 {
        peak_bytes()
    }

    fn reset_peak(&self) {
        reset_peak();
    }

    fn is_measuring(&self) -> bool {
        is_installed()
    }

    fn counts_host_heap(&self) -> bool {
        true
    }

    fn available_bytes(&self) -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        mem_available_bytes(&meminfo)
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes: the kernel's estimate of the
/// memory new work can take without swapping.
fn mem_available_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    //! The unit-test binary does not install the allocator, so the counters
    //! move only when these tests call its methods directly: the deltas are
    //! exact. A lock keeps the tests from seeing each other's updates.

    use super::*;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    static COUNTERS: Mutex<()> = Mutex::new(());

    fn exclusive_counters() -> MutexGuard<'static, ()> {
        COUNTERS.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, 16).expect("valid layout")
    }

    #[test]
    fn alloc_and_dealloc_move_live_and_peak_exactly() {
        let _guard = exclusive_counters();
        let allocator = CountingAllocator::new();
        let live_before = live_bytes();
        reset_peak();

        let block = unsafe { allocator.alloc(layout(1000)) };
        assert!(!block.is_null());
        assert_eq!(live_bytes(), live_before + 1000);
        assert_eq!(peak_bytes(), live_before + 1000);

        unsafe { allocator.dealloc(block, layout(1000)) };
        assert_eq!(live_bytes(), live_before);
        assert_eq!(peak_bytes(), live_before + 1000);
    }

    #[test]
    fn alloc_zeroed_is_counted_and_zeroed() {
        let _guard = exclusive_counters();
        let allocator = CountingAllocator::new();
        let live_before = live_bytes();

        let block = unsafe { allocator.alloc_zeroed(layout(64)) };
        assert!(!block.is_null());
        let bytes = unsafe { std::slice::from_raw_parts(block, 64) };
        assert!(bytes.iter().all(|&byte| byte == 0));
        assert_eq!(live_bytes(), live_before + 64);

        unsafe { allocator.dealloc(block, layout(64)) };
        assert_eq!(live_bytes(), live_before);
    }

    #[test]
    fn realloc_accounts_the_size_difference_and_raises_the_peak() {
        let _guard = exclusive_counters();
        let allocator = CountingAllocator::new();
        let live_before = live_bytes();
        reset_peak();

        let block = unsafe { allocator.alloc(layout(100)) };
        let grown = unsafe { allocator.realloc(block, layout(100), 5000) };
        assert!(!grown.is_null());
        assert_eq!(live_bytes(), live_before + 5000);
        assert_eq!(peak_bytes(), live_before + 5000);

        let shrunk = unsafe { allocator.realloc(grown, layout(5000), 10) };
        assert!(!shrunk.is_null());
        assert_eq!(live_bytes(), live_before + 10);
        assert_eq!(peak_bytes(), live_before + 5000, "shrinking keeps the peak");

        unsafe { allocator.dealloc(shrunk, layout(10)) };
        assert_eq!(live_bytes(), live_before);
    }

    #[test]
    fn reset_peak_lowers_the_peak_to_live() {
        let _guard = exclusive_counters();
        let allocator = CountingAllocator::new();
        let kept = unsafe { allocator.alloc(layout(300)) };
        let freed = unsafe { allocator.alloc(layout(700)) };
        unsafe { allocator.dealloc(freed, layout(700)) };
        assert!(peak_bytes() >= live_bytes() + 700);

        reset_peak();
        assert_eq!(peak_bytes(), live_bytes());

        unsafe { allocator.dealloc(kept, layout(300)) };
    }

    #[test]
    fn the_flag_is_set_by_the_first_allocation() {
        let _guard = exclusive_counters();
        let block = unsafe { CountingAllocator::new().alloc(layout(8)) };
        assert!(is_installed());
        assert!(CpuMeter.is_measuring());
        unsafe { CountingAllocator::new().dealloc(block, layout(8)) };
    }

    #[test]
    fn cpu_meter_reads_the_counters() {
        let _guard = exclusive_counters();
        assert_eq!(CpuMeter.name(), "cpu-heap");
        assert_eq!(CpuMeter.live_bytes(), live_bytes());
        assert_eq!(CpuMeter.peak_bytes(), peak_bytes());
        assert_eq!(CpuMeter.device_total_bytes(), None);
        assert!(CpuMeter.counts_host_heap());
    }

    #[test]
    fn mem_available_is_read_in_kib() {
        let text = "MemTotal: 100 kB\nMemFree: 5 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available_bytes(text), Some(2048 * 1024));
        assert_eq!(mem_available_bytes("MemTotal: 1 kB\n"), None);
    }
}
