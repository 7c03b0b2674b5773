//! GPU memory metering through the CUDA device's memory pool (feature `cuda`).
//!
//! candle 0.11.1 allocates every tensor with cudarc's stream-ordered
//! `CudaStream::alloc` / `alloc_zeros` (`cuda_backend/device.rs`), which in cudarc
//! 0.19 calls `cuMemAllocAsync` (and frees with `cuMemFreeAsync`) whenever the device
//! reports `CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED` (`driver/safe/core.rs`,
//! `has_async_alloc`); it never sets a pool of its own, so the allocations come from
//! the device's current pool, the default pool. That pool counts what the program
//! holds:
//!
//! * live bytes: `CU_MEMPOOL_ATTR_USED_MEM_CURRENT`, the bytes allocated from the
//!   pool and not yet freed (the driver's rounded block sizes, as PyTorch's
//!   `memory_allocated` counts its caching allocator's blocks);
//! * high-water mark: `CU_MEMPOOL_ATTR_USED_MEM_HIGH`, which can only be reset to 0
//!   (`cuMemPoolSetAttribute`). [`CudaMeter::reset_peak`] resets it and remembers the
//!   live bytes at that moment, so the peak it reports is never below them.
//!
//! The counters are the driver's bookkeeping of the allocation and free calls, which the
//! host issues ahead of the GPU in stream order; they are read without synchronising.
//! Memory the pool keeps reserved for reuse is not "used". Memory outside the pool is not
//! seen: the CUDA context, loaded kernels, anything a library allocates with `cuMemAlloc`.
//!
//! On a device without memory pools cudarc falls back to `cuMemAlloc`, which the pool
//! does not see. The meter then reads the device's used memory from `cuMemGetInfo`
//! (total − free, all processes and the context included) and its peak is only the
//! highest of those readings; its name says so (`cuda:0 (mem-get-info)`).
//!
//! Not verified on a GPU yet (written on a machine without one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext, DriverError};
use candle_core::CudaDevice;

use super::MemoryMeter;

/// Where the readings come from.
#[derive(Debug)]
enum Source {
    /// The device's current memory pool (the one `cuMemAllocAsync` draws from).
    Pool(sys::CUmemoryPool),
    /// `cuMemGetInfo`: total − free, the fallback without memory pools.
    DeviceInfo,
}

/// The [`MemoryMeter`] of one CUDA device's memory, read from its memory pool.
///
/// See the [module documentation](self) for what is counted.
#[derive(Debug)]
pub struct CudaMeter {
    name: String,
    context: Arc<CudaContext>,
    source: Source,
    total_bytes: u64,
    /// Live bytes at the last reset: the driver's high-water mark restarts at 0.
    live_at_reset: AtomicU64,
    /// Last good readings, reported when the driver call fails.
    last_live: AtomicU64,
    last_peak: AtomicU64,
}

// SAFETY: the pool handle is a process-wide driver handle, valid on any thread; every
// driver call first binds the context to the calling thread. The counters are atomics.
unsafe impl Send for CudaMeter {}
// SAFETY: as for `Send`; the meter is read through `&self` only.
unsafe impl Sync for CudaMeter {}

impl CudaMeter {
    /// A meter of `device`'s memory, its peak window starting now.
    ///
    /// # Errors
    /// A driver call failed (no current pool, `cuMemGetInfo`).
    pub fn new(device: &CudaDevice) -> Result<Self, DriverError> {
        let stream = device.cuda_stream();
        let context = Arc::clone(stream.context());
        let ordinal = context.ordinal();
        let (_free, total) = context.mem_get_info()?;
        let (source, name) = if context.has_async_alloc() {
            // SAFETY: `cu_device` is the device of a live context.
            let pool = unsafe { result::device::get_mem_pool(context.cu_device()) }?;
            (Source::Pool(pool), format!("cuda:{ordinal}"))
        } else {
            (Source::DeviceInfo, format!("cuda:{ordinal} (mem-get-info)"))
        };
        let meter = Self {
            name,
            context,
            source,
            total_bytes: total as u64,
            live_at_reset: AtomicU64::new(0),
            last_live: AtomicU64::new(0),
            last_peak: AtomicU64::new(0),
        };
        meter.reset_peak();
        Ok(meter)
    }

    /// Whether the readings come from the memory pool (false: from `cuMemGetInfo`).
    pub fn reads_pool(&self) -> bool {
        matches!(self.source, Source::Pool(_))
    }

    /// Free device memory now (`cuMemGetInfo`), all processes counted.
    ///
    /// # Errors
    /// The driver call failed.
    pub fn device_free_bytes(&self) -> Result<u64, DriverError> {
        Ok(self.context.mem_get_info()?.0 as u64)
    }

    fn read_live(&self) -> Result<u64, DriverError> {
        match self.source {
            Source::Pool(pool) => self.pool_attribute(pool, UsedCurrent),
            Source::DeviceInfo => {
                let (free, total) = self.context.mem_get_info()?;
                let used = total.saturating_sub(free) as u64;
                self.last_peak.fetch_max(used, Ordering::Relaxed);
                Ok(used)
            }
        }
    }

    fn read_peak(&self) -> Result<u64, DriverError> {
        let since_reset = match self.source {
            Source::Pool(pool) => self.pool_attribute(pool, UsedHigh)?,
            Source::DeviceInfo => self
                .read_live()?
                .max(self.last_peak.load(Ordering::Relaxed)),
        };
        Ok(since_reset.max(self.live_at_reset.load(Ordering::Relaxed)))
    }

    fn pool_attribute(
        &self,
        pool: sys::CUmemoryPool,
        which: PoolCounter,
    ) -> Result<u64, DriverError> {
        self.context.bind_to_thread()?;
        let mut value: u64 = 0;
        // SAFETY: `pool` is the device's pool; both attributes are `cuuint64_t`.
        unsafe {
            result::mem_pool::get_attribute(
                pool,
                which.attribute(),
                (&mut value as *mut u64).cast(),
            )
        }?;
        Ok(value)
    }

    fn try_reset_peak(&self) -> Result<(), DriverError> {
        match self.source {
            Source::Pool(pool) => {
                self.context.bind_to_thread()?;
                let mut zero: u64 = 0;
                // SAFETY: as in `pool_attribute`; USED_MEM_HIGH accepts only 0.
                unsafe {
                    result::mem_pool::set_attribute(
                        pool,
                        UsedHigh.attribute(),
                        (&mut zero as *mut u64).cast(),
                    )
                }?;
                let live = self.read_live()?;
                self.live_at_reset.store(live, Ordering::Relaxed);
                self.last_peak.store(live, Ordering::Relaxed);
            }
            Source::DeviceInfo => {
                let live = self.read_live()?;
                self.live_at_reset.store(live, Ordering::Relaxed);
                self.last_peak.store(live, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// The two pool counters read.
#[derive(Clone, Copy)]
enum PoolCounter {
    UsedCurrent,
    UsedHigh,
}
use PoolCounter::{UsedCurrent, UsedHigh};

impl PoolCounter {
    fn attribute(self) -> sys::CUmemPool_attribute {
        match self {
            UsedCurrent => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            UsedHigh => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        }
    }
}

impl MemoryMeter for CudaMeter {
    fn name(&self) -> &str {
        &self.name
    }

    fn live_bytes(&self) -> u64 {
        match self.read_live() {
            Ok(live) => {
                self.last_live.store(live, Ordering::Relaxed);
                live
            }
            Err(e) => {
                tracing::warn!(meter = %self.name, "cannot read live GPU memory: {e}");
                self.last_live.load(Ordering::Relaxed)
            }
        }
    }

    fn peak_bytes(&self) -> u64 {
        match self.read_peak() {
            Ok(peak) => {
                self.last_peak.store(peak, Ordering::Relaxed);
                peak
            }
            Err(e) => {
                tracing::warn!(meter = %self.name, "cannot read peak GPU memory: {e}");
                self.last_peak.load(Ordering::Relaxed)
            }
        }
    }

    fn reset_peak(&self) {
        if let Err(e) = self.try_reset_peak() {
            tracing::warn!(meter = %self.name, "cannot reset the GPU memory peak: {e}");
        }
    }

    fn device_total_bytes(&self) -> Option<u64> {
        Some(self.total_bytes)
    }

    fn available_bytes(&self) -> Option<u64> {
        self.device_free_bytes()
            .inspect_err(|e| tracing::warn!(meter = %self.name, "cannot read free GPU memory: {e}"))
            .ok()
    }
}
