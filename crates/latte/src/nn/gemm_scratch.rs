//! gemm's per-thread packing buffer, allocated before anything is measured.
//!
//! The `gemm` crate (candle's CPU matrix product, and the fused attention's) packs the
//! left operand into a thread-local buffer the size of the L2 cache, allocated on a
//! thread's first product and kept for the life of the thread: 1 MiB per thread on a
//! 1 MiB-L2 CPU. Left to itself it appears in whichever step first runs a product on
//! that thread, inside a measured peak that no cost model can attribute.
//! [`allocate_packing_buffers`] allocates it on every rayon worker (where parallel
//! products run) and on the calling thread (where single-threaded ones run).

use std::sync::Once;

/// Allocates gemm's packing buffer on every rayon worker and on this thread; only the
/// first call does anything.
pub fn allocate_packing_buffers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let touch = || gemm_common::gemm::L2_SLAB.with(|_| ());
        rayon::broadcast(|_| touch());
        touch();
    });
}
