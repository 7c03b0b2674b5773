//! Data parallelism between GPUs over NCCL (feature `nccl`, in the CUDA build): under
//! `mpirun`, each rank opens the GPU of its local rank, rank 0 makes NCCL's unique id and
//! MPI broadcasts it, and every rank joins one NCCL communicator on its device's stream.
//! Gradient buckets, ZeRO's reduce-scatters and all-gathers then run between the GPUs'
//! memories (NCCL's ring or tree collectives); scalars (losses, the stop flag), barriers
//! and host buffers stay on MPI.
//!
//! NCCL's ring and tree all-reduces compute each element's sum once and copy it to every
//! rank, so the ranks update from the same bits, as over MPI; under ZeRO each piece has
//! one owner whose update is gathered to all.

use crate::mpi_group::MpiGroup;
use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, CudaView};
use candle_core::cuda_backend::cudarc::nccl::{self, Comm, Id, ReduceOp};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use latte::dist::{Collective, DistError};
use std::sync::{Arc, Mutex};

/// An MPI job whose ranks also share an NCCL communicator, one GPU each.
pub struct NcclGroup {
    mpi: MpiGroup,
    comm: Mutex<Comm>,
    device: CudaDevice,
    stream: Arc<CudaStream>,
}

// SAFETY: the communicator is used from one thread at a time (behind the mutex), on the
// stream it was made with.
unsafe impl Send for NcclGroup {}
// SAFETY: as above.
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    /// Joins `mpi`'s ranks in an NCCL communicator on `device` (this rank's GPU).
    ///
    /// # Errors
    /// When `device` is not a GPU, NCCL's library cannot be loaded, or the communicator
    /// cannot be made.
    pub fn new(mpi: MpiGroup, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            bail!("NCCL needs a GPU per rank: run with --device cuda")
        };
        // SAFETY: only tries to dlopen the library under the names cudarc knows.
        if !unsafe { nccl::sys::is_culib_present() } {
            bail!(
                "cannot load NCCL (libnccl.so): cudarc looks for libnccl.so and libnccl.so.13, \
                 .12, …, but not .so.2, the only name the PyPI wheel nvidia-nccl-cu13 ships. \
                 Link it under a name cudarc loads, e.g. \
                 `ln -s <site-packages>/nvidia/nccl/lib/libnccl.so.2 DIR/libnccl.so`, and put \
                 DIR on LD_LIBRARY_PATH"
            );
        }
        let mut id = [0u8; 128];
        if mpi.rank() == 0 {
            let made = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
            for (byte, c) in id.iter_mut().zip(made.internal()) {
                *byte = *c as u8;
            }
        }
        mpi.broadcast_bytes(&mut id, 0)
            .context("cannot share NCCL's unique id")?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let stream = cuda.cuda_stream();
        let comm = Comm::from_rank(stream.clone(), mpi.rank(), mpi.size(), id)
            .map_err(|e| anyhow::anyhow!("ncclCommInitRank: {e:?}"))
            .with_context(|| {
                format!(
                    "rank {} of {}: cannot join the NCCL communicator",
                    mpi.rank(),
                    mpi.size()
                )
            })?;
        Ok(Self {
            mpi,
            comm: Mutex::new(comm),
            device: cuda.clone(),
            stream,
        })
    }

    fn broken(&self, message: String) -> DistError {
        DistError::Broken {
            rank: self.mpi.rank(),
            size: self.mpi.size(),
            message,
        }
    }

    /// Runs `op(comm, send, received)` on `send`'s values (on this GPU) into a new buffer of
    /// `received_len` values, returned as a tensor of that length.
    fn collective(
        &self,
        send: &Tensor,
        received_len: usize,
        op: impl FnOnce(&Comm, &CudaView<'_, f32>, &mut CudaSlice<f32>) -> Result<(), String>,
    ) -> Result<Tensor, DistError> {
        // The values as contiguous f32 (a copy only when they are not).
        let values = send.flatten_all()?.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = values.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            return Err(self.broken("NCCL was handed a tensor outside the GPU".into()));
        };
        let start = layout.start_offset();
        let send = storage
            .as_cuda_slice::<f32>()?
            .slice(start..start + values.elem_count());
        let mut received = self
            .stream
            .alloc_zeros::<f32>(received_len)
            .map_err(|e| self.broken(format!("cannot allocate a receive buffer: {e:?}")))?;
        {
            let comm = self
                .comm
                .lock()
                .map_err(|_| self.broken("a thread panicked".into()))?;
            op(&comm, &send, &mut received).map_err(|e| self.broken(e))?;
        }
        let storage = CudaStorage::wrap_cuda_slice(received, self.device.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            received_len,
            BackpropOp::none(),
            false,
        ))
    }

    fn on_gpu(t: &Tensor) -> bool {
        matches!(t.device(), Device::Cuda(_))
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn size(&self) -> usize {
        self.mpi.size()
    }

    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<(), DistError> {
        self.mpi.all_reduce_sum(buffer)
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistError> {
        self.mpi.all_reduce_sum_f64(values)
    }

    fn reduce_scatter_sum(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError> {
        self.mpi.reduce_scatter_sum(send, received)
    }

    fn all_gather(&self, send: &[f32], received: &mut [f32]) -> Result<(), DistError> {
        self.mpi.all_gather(send, received)
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.mpi.barrier()
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor, DistError> {
        if !Self::on_gpu(t) {
            return self.mpi.all_reduce_sum_tensor(t);
        }
        let summed = self.collective(t, t.elem_count(), |comm, send, received| {
            comm.all_reduce(send, received, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| format!("ncclAllReduce: {e:?}"))
        })?;
        Ok(summed.reshape(t.shape())?)
    }

    fn reduce_scatter_sum_tensor(&self, send: &Tensor) -> Result<Tensor, DistError> {
        if !Self::on_gpu(send) {
            return self.mpi.reduce_scatter_sum_tensor(send);
        }
        let size = self.size();
        if !send.elem_count().is_multiple_of(size) {
            return Err(self.broken(format!(
                "a reduce-scatter of {} values is not {size} equal blocks",
                send.elem_count()
            )));
        }
        self.collective(send, send.elem_count() / size, |comm, send, received| {
            comm.reduce_scatter(send, received, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| format!("ncclReduceScatter: {e:?}"))
        })
    }

    fn all_gather_tensor(&self, send: &Tensor) -> Result<Tensor, DistError> {
        if !Self::on_gpu(send) {
            return self.mpi.all_gather_tensor(send);
        }
        self.collective(
            send,
            send.elem_count() * self.size(),
            |comm, send, received| {
                comm.all_gather(send, received)
                    .map(|_| ())
                    .map_err(|e| format!("ncclAllGather: {e:?}"))
            },
        )
    }
}
