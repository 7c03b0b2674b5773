//! ZeRO (Rajbhandari et al., 2020) for data-parallel training: what each rank keeps of
//! the optimizer's state and of the gradients, and the collectives that move the rest.
//!
//! Every trained parameter is cut into `N` contiguous pieces of its flattened elements
//! ([`Partition`]): rank `r` holds piece `r` of *every* parameter, so each rank's share is
//! an `N`-th of each stage's parameters, not a run of whole tensors — the shares stay equal
//! whatever the tensor sizes, and a stage's gradient shrinks to an `N`-th as soon as its
//! backward op ends.
//!
//! * Stage 1: AdamW's moments and f32 master weights (and the EMA) of the rank's pieces.
//!   After the micro-batches, the summed gradients are reduce-scattered
//!   ([`reduce_scatter`]): each rank receives the sum over the ranks of its pieces only.
//! * Stage 2: the same state, and the gradients are reduce-scattered stage by stage while
//!   the backward pass runs ([`ShardedGradients`], a [`GradSink`]), so a rank never holds
//!   more than one stage's full gradients and its own pieces of the others.
//!
//! After the update each rank's new pieces are all-gathered into every rank's model
//! ([`all_gather`]), which leaves the same bits everywhere.
//!
//! Buffers travel in rank-major blocks: block `r` holds piece `r` of each parameter in the
//! bucket, each padded to `⌈n/N⌉` elements so that all blocks have one length (MPI's
//! `Reduce_scatter_block` and `Allgather` take equal blocks).

use crate::dist::Collective;
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId, Var};
use remat::grads::GradSink;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

/// Elements one data-parallel collective call moves (under ZeRO, all ranks' padded
/// blocks together): 16 MiB of f32 values.
pub const BUCKET_ELEMENTS: usize = 4 << 20;

/// Which elements of each parameter each rank keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    rank: usize,
    ranks: usize,
    /// Elements of each parameter, in the trainer's (sorted) order.
    lens: Vec<usize>,
}

impl Partition {
    /// The partition of `params` over `ranks` ranks, seen from `rank`.
    pub fn new(params: &[(String, Var)], rank: usize, ranks: usize) -> Self {
        let ranks = ranks.max(1);
        Self {
            rank: rank.min(ranks - 1),
            ranks,
            lens: params.iter().map(|(_, v)| v.elem_count()).collect(),
        }
    }

    /// Ranks the parameters are cut over.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Rank `rank`'s piece of parameter `param`: elements `n·r/N … n·(r+1)/N` of its
    /// flattened values (empty when the parameter has fewer elements than ranks).
    pub fn piece(&self, param: usize, rank: usize) -> Range<usize> {
        let n = self.lens[param];
        n * rank / self.ranks..n * (rank + 1) / self.ranks
    }

    /// This rank's piece of parameter `param`.
    pub fn own(&self, param: usize) -> Range<usize> {
        self.piece(param, self.rank)
    }

    /// The parameters this rank holds a non-empty piece of, in order.
    pub fn owned(&self) -> Vec<usize> {
        self.all()
            .into_iter()
            .filter(|&p| !self.own(p).is_empty())
            .collect()
    }

    /// Elements of this rank's pieces, over all parameters.
    pub fn owned_elements(&self) -> usize {
        self.all().into_iter().map(|p| self.own(p).len()).sum()
    }

    /// The padded length of parameter `param`'s piece in a block: `⌈n/N⌉`.
    fn padded(&self, param: usize) -> usize {
        self.lens[param].div_ceil(self.ranks)
    }

    /// `params` (ascending) cut into buckets of at most [`BUCKET_ELEMENTS`] padded
    /// elements over all ranks (a larger parameter travels alone).
    fn buckets(&self, params: &[usize]) -> Vec<Vec<usize>> {
        let sizes: Vec<usize> = params
            .iter()
            .map(|&p| self.padded(p) * self.ranks)
            .collect();
        buckets(&sizes)
            .into_iter()
            .map(|run| params[run].to_vec())
            .collect()
    }

    /// Every parameter, in order.
    fn all(&self) -> Vec<usize> {
        (0..self.lens.len()).collect()
    }
}

/// Consecutive runs of items of `sizes` elements, each run at most [`BUCKET_ELEMENTS`] in
/// all (an item larger than that makes a run alone): what one collective call moves.
pub fn buckets(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut size = 0;
    for (i, &elements) in sizes.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if size + elements <= BUCKET_ELEMENTS => run.end = i + 1,
            _ => {
                runs.push(i..i + 1);
                size = 0;
            }
        }
        size += elements;
    }
    runs
}

/// `t`'s flattened values `range`, as a new f32 tensor of its own (`copy` would keep the
/// whole storage behind the view).
pub fn piece_of(t: &Tensor, range: &Range<usize>) -> Result<Tensor> {
    t.flatten_all()?
        .narrow(0, range.start, range.len())?
        .force_contiguous()?
        .to_dtype(DType::F32)
}

/// Writes `values` (f32, `range.len()` elements) into `var`'s flattened elements `range`,
/// in place, in the variable's dtype.
pub fn write_piece(var: &Var, range: &Range<usize>, values: &Tensor) -> Result<()> {
    let values = values.flatten_all()?.to_dtype(var.dtype())?;
    var.as_tensor()
        .flatten_all()?
        .slice_set(&values, 0, range.start)
}

/// Sums `grads` (full gradients, `(parameter, gradient)` in ascending parameter order)
/// over the ranks and returns this rank's pieces of the sums (f32, flattened, on the
/// gradients' device), in the same order (`None` where this rank's piece is empty). Each
/// bucket's gradients are freed once its buffer is built, so the step holds the gradients
/// not yet sent and one bucket (its f32 values and its buffer) besides the pieces.
///
/// # Errors
/// When the group is broken or a gradient cannot be read.
pub fn reduce_scatter(
    collective: &dyn Collective,
    partition: &Partition,
    grads: Vec<(usize, Tensor)>,
) -> Result<Vec<Option<Tensor>>> {
    let order: Vec<usize> = grads.iter().map(|(p, _)| *p).collect();
    let mut pending = grads.into_iter();
    let mut out = Vec::with_capacity(order.len());
    for bucket in partition.buckets(&order) {
        let flat = pending
            .by_ref()
            .take(bucket.len())
            .map(|(_, g)| g.flatten_all()?.to_dtype(DType::F32))
            .collect::<Result<Vec<_>>>()?;
        let mut parts = Vec::with_capacity(2 * bucket.len() * partition.ranks);
        for rank in 0..partition.ranks {
            for (&p, values) in bucket.iter().zip(&flat) {
                let piece = partition.piece(p, rank);
                padded_piece(&mut parts, values, &piece, partition.padded(p))?;
            }
        }
        let send = Tensor::cat(&parts, 0)?;
        drop((parts, flat));
        let received = collective
            .reduce_scatter_sum_tensor(&send)
            .map_err(candle_core::Error::wrap)?;
        drop(send);
        let mut at = 0;
        for &p in &bucket {
            let own = partition.own(p);
            out.push(if own.is_empty() {
                None
            } else {
                Some(received.narrow(0, at, own.len())?.force_contiguous()?)
            });
            at += partition.padded(p);
        }
    }
    Ok(out)
}

/// Pushes `values[piece]` onto `parts`, then zeros up to `padded` elements.
fn padded_piece(
    parts: &mut Vec<Tensor>,
    values: &Tensor,
    piece: &Range<usize>,
    padded: usize,
) -> Result<()> {
    if !piece.is_empty() {
        parts.push(values.narrow(0, piece.start, piece.len())?);
    }
    if padded > piece.len() {
        parts.push(Tensor::zeros(
            padded - piece.len(),
            DType::F32,
            values.device(),
        )?);
    }
    Ok(())
}

/// Gathers every rank's pieces of every parameter: `own(p)` gives this rank's piece of
/// parameter `p` (f32, flattened; `None` when empty), and `whole(p, values)` receives each
/// parameter's full flattened f32 values once its bucket has arrived.
///
/// # Errors
/// When the group is broken, or as `own` and `whole` fail.
pub fn all_gather(
    collective: &dyn Collective,
    partition: &Partition,
    device: &candle_core::Device,
    mut own: impl FnMut(usize) -> Result<Option<Tensor>>,
    mut whole: impl FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    for bucket in partition.buckets(&partition.all()) {
        let block: usize = bucket.iter().map(|&p| partition.padded(p)).sum();
        let mut parts = Vec::with_capacity(2 * bucket.len());
        for &p in &bucket {
            let padded = partition.padded(p);
            match own(p)? {
                Some(piece) => {
                    let len = piece.elem_count();
                    padded_piece(&mut parts, &piece.flatten_all()?, &(0..len), padded)?;
                }
                None => parts.push(Tensor::zeros(padded, DType::F32, device)?),
            }
        }
        let send = Tensor::cat(&parts, 0)?;
        drop(parts);
        let received = collective
            .all_gather_tensor(&send)
            .map_err(candle_core::Error::wrap)?;
        drop(send);
        let mut offset = 0;
        for &p in &bucket {
            let pieces = (0..partition.ranks)
                .filter(|&rank| !partition.piece(p, rank).is_empty())
                .map(|rank| {
                    let len = partition.piece(p, rank).len();
                    received.narrow(0, rank * block + offset, len)
                })
                .collect::<Result<Vec<_>>>()?;
            offset += partition.padded(p);
            whole(p, Tensor::cat(&pieces, 0)?)?;
        }
    }
    Ok(())
}

/// ZeRO stage 2's gradient sink: each backward op's parameter gradients are
/// reduce-scattered as they arrive, and this rank adds its pieces to f32 sums kept across
/// the micro-batches of a step; the rest is freed at once.
pub struct ShardedGradients<'a> {
    collective: &'a dyn Collective,
    partition: &'a Partition,
    /// The parameter index of each trained variable.
    index: HashMap<TensorId, usize>,
    /// This rank's summed pieces, by parameter (`None` until a gradient arrives).
    sums: Vec<Option<Tensor>>,
    /// Seconds spent in the collectives.
    communication_s: f64,
}

impl<'a> ShardedGradients<'a> {
    /// Empty sums for `params` (the trainer's order).
    pub fn new(
        collective: &'a dyn Collective,
        partition: &'a Partition,
        params: &[(String, Var)],
    ) -> Self {
        Self {
            collective,
            partition,
            index: params
                .iter()
                .enumerate()
                .map(|(i, (_, v))| (v.as_tensor().id(), i))
                .collect(),
            sums: vec![None; params.len()],
            communication_s: 0.0,
        }
    }

    /// Seconds spent communicating so far.
    pub fn communication_s(&self) -> f64 {
        self.communication_s
    }

    /// This rank's summed pieces of the parameters `owned` (zeros for a parameter no
    /// micro-batch reached), in that order.
    pub fn finish(self, owned: &[usize], device: &candle_core::Device) -> Result<Vec<Tensor>> {
        let mut sums = self.sums;
        owned
            .iter()
            .map(|&p| match sums[p].take() {
                Some(s) => Ok(s),
                None => Tensor::zeros(self.partition.own(p).len(), DType::F32, device),
            })
            .collect()
    }
}

impl GradSink for ShardedGradients<'_> {
    fn take(&mut self, store: GradStore) -> Result<()> {
        // Every rank gets the same parameters here in the same op; reduce them in
        // parameter order (a store's own order differs between processes).
        let mut grads: Vec<(usize, Tensor)> = store
            .get_ids()
            .filter_map(|id| {
                let p = *self.index.get(id)?;
                Some((p, store.get_id(*id)?.clone()))
            })
            .collect();
        drop(store);
        grads.sort_by_key(|(p, _)| *p);
        let order: Vec<usize> = grads.iter().map(|(p, _)| *p).collect();
        let started = Instant::now();
        let pieces = reduce_scatter(self.collective, self.partition, grads)?;
        self.communication_s += started.elapsed().as_secs_f64();
        for (p, piece) in order.into_iter().zip(pieces) {
            let Some(piece) = piece else { continue };
            let sum = &mut self.sums[p];
            *sum = Some(match sum.take() {
                Some(s) => (s + piece)?,
                None => piece,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::ThreadGroup;
    use candle_core::Device;

    fn params(lens: &[usize]) -> Vec<(String, Var)> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| {
                let var = Var::zeros(n, DType::F32, &Device::Cpu).unwrap();
                (format!("p{i}"), var)
            })
            .collect()
    }

    /// The ranks' pieces tile every parameter, in rank order, each at most one element
    /// longer than another, and a parameter smaller than the group leaves some ranks none.
    #[test]
    fn pieces_tile_every_parameter() {
        let lens = [1, 2, 3, 7, 1000, 4097];
        for ranks in 1..=5 {
            let partition = Partition::new(&params(&lens), 0, ranks);
            for (p, &n) in lens.iter().enumerate() {
                let pieces: Vec<_> = (0..ranks).map(|r| partition.piece(p, r)).collect();
                assert_eq!(pieces[0].start, 0);
                assert_eq!(pieces[ranks - 1].end, n);
                for pair in pieces.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                let longest = pieces.iter().map(Range::len).max().unwrap();
                assert!(longest <= partition.padded(p));
                assert!(pieces.iter().all(|r| r.len() + 1 >= longest));
            }
            let owned = partition.owned();
            assert!(owned.iter().all(|&p| !partition.own(p).is_empty()));
            let expected: usize = lens.iter().map(|n| n / ranks).sum();
            assert!(partition.owned_elements() >= expected);
        }
    }

    /// Three ranks reduce-scatter whole gradients and gather the pieces back: every rank
    /// ends with the sums, whatever the parameter sizes (some smaller than the group).
    #[test]
    fn reduce_scatter_then_all_gather_gives_every_rank_the_sums() {
        let lens = [1, 2, 5, 11];
        let members = ThreadGroup::new(3);
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = members
                .iter()
                .map(|member| {
                    scope.spawn(move || {
                        let params = params(&lens);
                        let partition = Partition::new(&params, member.rank(), 3);
                        let r = member.rank() as f32;
                        let grads: Vec<(usize, Tensor)> = lens
                            .iter()
                            .enumerate()
                            .map(|(p, &n)| {
                                let values: Vec<f32> =
                                    (0..n).map(|i| 100.0 * r + (10 * p + i) as f32).collect();
                                (p, Tensor::from_vec(values, n, &Device::Cpu).unwrap())
                            })
                            .collect();
                        let pieces = reduce_scatter(member, &partition, grads).unwrap();
                        let mut whole = vec![Vec::new(); lens.len()];
                        all_gather(
                            member,
                            &partition,
                            &Device::Cpu,
                            |p| Ok(pieces[p].clone()),
                            |p, values| {
                                whole[p] = values.to_vec1::<f32>()?;
                                Ok(())
                            },
                        )
                        .unwrap();
                        whole
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (p, &n) in lens.iter().enumerate() {
            // Σ over ranks r of 100 r + 10 p + i = 300 + 3 (10 p + i).
            let sums: Vec<f32> = (0..n).map(|i| 300.0 + 3.0 * (10 * p + i) as f32).collect();
            for rank in &results {
                assert_eq!(rank[p], sums, "parameter {p}");
            }
        }
    }
}
