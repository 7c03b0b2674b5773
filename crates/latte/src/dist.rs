//! Data-parallel training's communication: a group of ranks exchanging buffers.
//!
//! [`Collective`] is what [`crate::train::Trainer`] needs from the group: its rank and
//! size, a sum of f32 buffers (the gradients, in buckets) and of f64 scalars (losses,
//! counts) that leaves every rank with the same bits, ZeRO's reduce-scatter and
//! all-gather (each rank's block of a buffer), and a barrier. Each buffer operation has a
//! host form (slices) and a tensor form, which by default goes through the host; a group
//! whose library reads device memory (NCCL) takes the tensors where they are.
//! [`SingleProcess`] is the default (every call is the identity); [`ThreadGroup`] runs
//! ranks as threads of one process, summing in rank order, so that tests can run data
//! parallelism without a launcher.

use candle_core::{DType, Tensor};
use std::sync::{Arc, Barrier, Mutex};

/// Why a collective call failed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A rank left the group (its thread or process ended).
    #[error("rank {rank} of {size}: {message}")]
    Broken {
        rank: usize,
        size: usize,
        message: String,
    },
    /// A tensor could not be read or made.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// `t`'s values as a host vector of f32.
fn host_values(t: &Tensor) -> Result<Vec<f32>, DistError> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// A group of ranks that run the same training step on different data.
pub trait Collective: Send + Sync {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn size(&self) -> usize;

    /// Sums `buffer` over the ranks in place; every rank ends with the same values.
    ///
    /// # Errors
    /// When the group is broken.
    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<(), DistError>;

    /// [`Collective::all_reduce_sum`] of f64 scalars.
    ///
    /// # Errors
    /// When the group is broken.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistError>;

    /// Sums `send` over the ranks and leaves this rank block `rank` of the sum: `send` is
    /// `size` blocks of `received.len()` values.
    ///
    /// # Errors
    /// When the group is broken or the lengths disagree.
    fn reduce_scatter_sum(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError>;

    /// Every rank's `send`, in rank order, in `received` (`size` blocks of `send.len()`).
    ///
    /// # Errors
    /// When the group is broken or the lengths disagree.
    fn all_gather(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError>;

    /// Returns when every rank has called it.
    ///
    /// # Errors
    /// When the group is broken.
    fn barrier(&self) -> Result<(), DistError>;

    /// [`Collective::all_reduce_sum`] of a tensor's values, as f32 in `t`'s shape, on its
    /// device.
    ///
    /// # Errors
    /// When the group is broken or the tensor cannot be read.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor, DistError> {
        let mut values = host_values(t)?;
        self.all_reduce_sum(&mut values)?;
        Ok(Tensor::from_vec(values, t.shape(), t.device())?)
    }

    /// [`Collective::reduce_scatter_sum`] of a one-dimensional tensor of `size` blocks:
    /// this rank's block of the sum, f32, on `send`'s device.
    ///
    /// # Errors
    /// When the group is broken or the length is not a multiple of the size.
    fn reduce_scatter_sum_tensor(&self, send: &Tensor) -> Result<Tensor, DistError> {
        let values = host_values(send)?;
        let mut block = vec![0f32; values.len() / self.size().max(1)];
        self.reduce_scatter_sum(&values, &mut block)?;
        Ok(Tensor::from_vec(
            block,
            values.len() / self.size().max(1),
            send.device(),
        )?)
    }

    /// [`Collective::all_gather`] of a one-dimensional tensor: every rank's, in rank order,
    /// f32, on `send`'s device.
    ///
    /// # Errors
    /// When the group is broken.
    fn all_gather_tensor(&self, send: &Tensor) -> Result<Tensor, DistError> {
        let values = host_values(send)?;
        let mut all = vec![0f32; values.len() * self.size()];
        self.all_gather(&values, &mut all)?;
        let n = all.len();
        Ok(Tensor::from_vec(all, n, send.device())?)
    }
}

/// One process, no communication.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }

    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }

    fn reduce_scatter_sum(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError> {
        self.all_gather(send, received)
    }

    fn all_gather(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError> {
        if send.len() != received.len() {
            return Err(DistError::Broken {
                rank: 0,
                size: 1,
                message: format!(
                    "{} values sent for {} to receive",
                    send.len(),
                    received.len()
                ),
            });
        }
        received.copy_from_slice(send);
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
}

/// Ranks as threads of one process: each contributes its buffer to a shared table, and
/// every rank sums the table in rank order (so the result is the same bits everywhere).
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    barrier: Barrier,
    f32_slots: Mutex<Vec<Vec<f32>>>,
    f64_slots: Mutex<Vec<Vec<f64>>>,
}

impl ThreadGroup {
    /// The `size` members of a new group, one per thread to run.
    pub fn new(size: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            f32_slots: Mutex::new(vec![Vec::new(); size]),
            f64_slots: Mutex::new(vec![Vec::new(); size]),
        });
        (0..size)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn broken(&self, message: &str) -> DistError {
        DistError::Broken {
            rank: self.rank,
            size: self.shared.size,
            message: message.to_string(),
        }
    }

    /// Puts `mine` in this rank's slot, waits for all, hands every rank's slot (in rank
    /// order) to `read`, and waits again before the slots are reused, whatever `read`
    /// returned.
    fn exchange<T>(
        &self,
        slots: &Mutex<Vec<Vec<T>>>,
        mine: Vec<T>,
        read: impl FnOnce(&[Vec<T>]) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        slots.lock().map_err(|_| self.broken("a rank panicked"))?[self.rank] = mine;
        self.shared.barrier.wait();
        let result = match slots.lock() {
            Ok(slots) => read(&slots),
            Err(_) => Err(self.broken("a rank panicked")),
        };
        self.shared.barrier.wait();
        result
    }

    /// Sums every rank's `values` in rank order into `values`.
    fn reduce<T: Copy + Default + std::ops::AddAssign>(
        &self,
        slots: &Mutex<Vec<Vec<T>>>,
        values: &mut [T],
    ) -> Result<(), DistError> {
        self.exchange(slots, values.to_vec(), |slots| {
            if slots.iter().any(|s| s.len() != values.len()) {
                return Err(self.broken("ranks reduced buffers of different lengths"));
            }
            for (i, v) in values.iter_mut().enumerate() {
                let mut sum = T::default();
                for slot in slots {
                    sum += slot[i];
                }
                *v = sum;
            }
            Ok(())
        })
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<(), DistError> {
        self.reduce(&self.shared.f32_slots, buffer)
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistError> {
        self.reduce(&self.shared.f64_slots, values)
    }

    fn reduce_scatter_sum(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError> {
        let block = received.len();
        if send.len() != block * self.shared.size {
            return Err(self.broken("a reduce-scatter's buffers do not hold one block per rank"));
        }
        let mut sum = send.to_vec();
        self.reduce(&self.shared.f32_slots, &mut sum)?;
        received.copy_from_slice(&sum[self.rank * block..(self.rank + 1) * block]);
        Ok(())
    }

    fn all_gather(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError> {
        let block = send.len();
        if received.len() != block * self.shared.size {
            return Err(self.broken("an all-gather's buffers do not hold one block per rank"));
        }
        self.exchange(&self.shared.f32_slots, send.to_vec(), |slots| {
            if slots.iter().any(|s| s.len() != block) {
                return Err(self.broken("ranks gathered blocks of different lengths"));
            }
            for (slot, out) in slots.iter().zip(received.chunks_mut(block.max(1))) {
                out.copy_from_slice(slot);
            }
            Ok(())
        })
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_groups_sum_in_rank_order_everywhere() {
        let members = ThreadGroup::new(3);
        let results: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = members
                .iter()
                .map(|member| {
                    scope.spawn(move || {
                        let r = member.rank() as f32;
                        let mut values = vec![r, 1e8, -1e8 + r];
                        member.all_reduce_sum(&mut values).unwrap();
                        let mut count = [1.0f64];
                        member.all_reduce_sum_f64(&mut count).unwrap();
                        assert_eq!(count, [3.0]);
                        values
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            results[0],
            vec![3.0, 3e8, (-1e8f32 + 0.0) + (-1e8 + 1.0) + (-1e8 + 2.0)]
        );
        assert!(results.iter().all(|r| r == &results[0]));
    }

    #[test]
    fn thread_groups_reduce_scatter_and_gather_blocks_in_rank_order() {
        let members = ThreadGroup::new(2);
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = members
                .iter()
                .map(|member| {
                    scope.spawn(move || {
                        let r = member.rank() as f32;
                        // Two blocks of two: rank r sends [r, 10 r | 100 r, 1000 r] + 1.
                        let send = [r + 1.0, 10.0 * r + 1.0, 100.0 * r + 1.0, 1000.0 * r + 1.0];
                        let mut block = [0f32; 2];
                        member.reduce_scatter_sum(&send, &mut block).unwrap();
                        let mut gathered = [0f32; 4];
                        member.all_gather(&block, &mut gathered).unwrap();
                        let mut wrong = [0f32; 3];
                        assert!(member.reduce_scatter_sum(&send, &mut wrong).is_err());
                        // The tensor forms give the same values.
                        let device = candle_core::Device::Cpu;
                        let sent = Tensor::new(&send, &device).unwrap();
                        let own = member.reduce_scatter_sum_tensor(&sent).unwrap();
                        assert_eq!(own.to_vec1::<f32>().unwrap(), block);
                        let all = member.all_gather_tensor(&own).unwrap();
                        assert_eq!(all.to_vec1::<f32>().unwrap(), gathered);
                        let summed = member.all_reduce_sum_tensor(&sent).unwrap();
                        let sums = summed.to_vec1::<f32>().unwrap();
                        assert_eq!(sums, [3.0, 12.0, 102.0, 1002.0]);
                        (block.to_vec(), gathered.to_vec())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0].0, [3.0, 12.0]);
        assert_eq!(results[1].0, [102.0, 1002.0]);
        for (_, gathered) in &results {
            assert_eq!(gathered, &[3.0, 12.0, 102.0, 1002.0]);
        }
    }
}
