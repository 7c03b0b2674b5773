//! How the host heap serves tensor-sized blocks.
//!
//! A training or guidance step allocates and frees the same activation-sized blocks
//! (megabytes to gigabytes) over and over. glibc's default serves every block above its
//! mmap threshold (at most 32 MiB, dynamically lowered) with a fresh `mmap` and returns
//! it to the kernel on `free`, so each new activation costs one page fault and one page
//! clear per 4 KiB — on the `medium` preset a sixth of a forward pass's profile, and a
//! quarter of its time.
//! [`retain_freed_memory`] makes the heap keep what it frees for the next request, the
//! way PyTorch's CUDA caching allocator keeps device blocks: the process's resident
//! memory then stays at its high-water mark instead of shrinking between steps.
//!
//! Live bytes as the [`meter`](crate::meter) counts them are unchanged: it counts the
//! requested sizes, not the pages behind them.

/// Makes the system allocator keep freed blocks for reuse instead of returning them to
/// the kernel. Call once, early in `main`, before the first large allocation.
///
/// On Linux with glibc it serves every request from the heap (no `mmap`ed chunks) and
/// never trims the heap's top. One exception remains: a block larger than a thread heap
/// (64 MiB) requested by a thread other than the main one is still `mmap`ed (candle
/// allocates a tensor on the thread that calls the op, usually the main thread).
///
/// Returns whether the allocator accepted both settings; `false` on other platforms,
/// where the system allocator is left as it is.
pub fn retain_freed_memory() -> bool {
    imp::retain_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    pub fn retain_freed_memory() -> bool {
        // SAFETY: mallopt only changes glibc's malloc parameters, which may be set at
        // any time. A trim threshold of -1 is SIZE_MAX after glibc's conversion to
        // size_t: never trim.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn retain_freed_memory() -> bool {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::retain_freed_memory;

    /// Bytes the heap holds free for reuse (glibc's `fordblks`).
    fn heap_free_bytes() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        unsafe { libc::mallinfo2().fordblks }
    }

    /// Runs on a test thread, whose blocks come from a 64 MiB thread heap: the block
    /// stays below that, and above glibc's default mmap threshold (at most 32 MiB).
    #[test]
    fn a_freed_large_block_stays_in_the_heap_and_is_reused() {
        assert!(retain_freed_memory());
        const SIZE: usize = 32 << 20;
        let block = vec![1u8; SIZE];
        let address = block.as_ptr() as usize;
        drop(block);
        assert!(
            heap_free_bytes() >= SIZE,
            "a freed 32 MiB block went back to the kernel: {} bytes free in the heap",
            heap_free_bytes()
        );
        let again = vec![2u8; SIZE];
        assert_eq!(
            again.as_ptr() as usize,
            address,
            "the freed block was not reused"
        );
    }
}
