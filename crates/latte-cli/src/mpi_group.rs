//! Data parallelism over MPI (feature `mpi`): `mpirun -n N latte train …` makes every
//! process a rank of [`latte::dist::Collective`]. A sum is a reduce-scatter followed by an
//! all-gather, so each element is added up once, on one rank, and every rank holds the same
//! bits (`MPI_Allreduce` may add in a different order on each rank); ZeRO's reduce-scatter
//! and all-gather are MPI's own.

use latte::dist::{Collective, DistError};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::sync::Mutex;

/// The MPI world, initialised for the whole run.
pub struct MpiGroup {
    /// Finalises MPI when dropped.
    _universe: mpi::environment::Universe,
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: the communicator is used from one thread at a time (behind the mutex), and MPI
// is initialised with at least `Threading::Serialized`, which allows that.
unsafe impl Send for MpiGroup {}
// SAFETY: as above.
unsafe impl Sync for MpiGroup {}

impl MpiGroup {
    /// Initialises MPI; `None` when this process is not part of a multi-rank job.
    pub fn init() -> Option<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        (size > 1).then(|| Self {
            _universe: universe,
            world: Mutex::new(world),
            rank,
            size,
        })
    }

    fn broken(&self, message: &str) -> DistError {
        DistError::Broken {
            rank: self.rank,
            size: self.size,
            message: message.to_string(),
        }
    }

    /// Sums `values` over the ranks: each rank sums one block of them (MPI's
    /// reduce-scatter), then every rank gathers all the blocks. Each sum is computed once,
    /// so every rank holds the same bits, and no rank carries the whole volume.
    fn sum<T: Equivalence + Copy + Default>(&self, values: &mut [T]) -> Result<(), DistError> {
        let world = self.world()?;
        // The whole blocks in place; the few values left over (fewer than the ranks)
        // padded to one block each.
        let block = values.len() / self.size;
        let (whole, rest) = values.split_at_mut(block * self.size);
        if block > 0 {
            let mut own = vec![T::default(); block];
            world.reduce_scatter_block_into(&whole[..], &mut own[..], SystemOperation::sum());
            world.all_gather_into(&own[..], whole);
        }
        if !rest.is_empty() {
            let mut padded = rest.to_vec();
            padded.resize(self.size, T::default());
            let mut own = [T::default()];
            world.reduce_scatter_block_into(&padded[..], &mut own[..], SystemOperation::sum());
            world.all_gather_into(&own[..], &mut padded[..]);
            rest.copy_from_slice(&padded[..rest.len()]);
        }
        Ok(())
    }

    /// Copies `root`'s `bytes` into every rank's (NCCL's unique id, in the `nccl` build).
    #[cfg(feature = "nccl")]
    pub fn broadcast_bytes(&self, bytes: &mut [u8], root: usize) -> Result<(), DistError> {
        self.world()?
            .process_at_rank(root as i32)
            .broadcast_into(bytes);
        Ok(())
    }

    fn world(&self) -> Result<std::sync::MutexGuard<'_, SimpleCommunicator>, DistError> {
        self.world
            .lock()
            .map_err(|_| self.broken("a thread panicked"))
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<(), DistError> {
        self.sum(buffer)
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistError> {
        self.sum(values)
    }

    fn reduce_scatter_sum(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError> {
        if send.len() != received.len() * self.size {
            return Err(self.broken("a reduce-scatter's buffers do not hold one block per rank"));
        }
        self.world()?
            .reduce_scatter_block_into(send, received, SystemOperation::sum());
        Ok(())
    }

    fn all_gather(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError> {
        if received.len() != send.len() * self.size {
            return Err(self.broken("an all-gather's buffers do not hold one block per rank"));
        }
        self.world()?.all_gather_into(send, received);
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.world()?.barrier();
        Ok(())
    }
}
