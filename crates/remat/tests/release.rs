//! The vendored candle-core's `release_unneeded_for_backward` (patch 3): a stored graph
//! keeps only what its backward reads, gradients are bitwise those of the full graph, and
//! values held from outside the graph stay readable.

use candle_core::backprop::{release_unneeded_for_backward, BackwardReads};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var};

fn var(values: &[f32], dims: &[usize]) -> Var {
    Var::from_vec(values.to_vec(), dims, &Device::Cpu).unwrap()
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) * scale)
        .collect()
}

/// A doubling op whose backward reads nothing; `reads` says so or not.
struct Double {
    declare: bool,
}

impl CustomOp1 for Double {
    fn name(&self) -> &'static str {
        "double"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().unwrap();
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("f32 only")
        };
        Ok((
            CpuStorage::F32(v[start..end].iter().map(|x| 2.0 * x).collect()),
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((grad * 2.0)?))
    }

    fn bwd_reads(&self) -> BackwardReads {
        if self.declare {
            BackwardReads::NOTHING
        } else {
            BackwardReads::ALL
        }
    }
}

/// A graph exercising views, products with a constant, reductions, element-wise rules that
/// read their input or their output, and a custom op.
fn graph(x: &Var, w: &Var, c: &Tensor, declare: bool) -> Tensor {
    let h = x.as_tensor().matmul(w.as_tensor()).unwrap(); // (4, 6)
    let h = h.broadcast_add(&c.narrow(0, 0, 1).unwrap()).unwrap();
    let e = h.affine(0.5, 0.1).unwrap().exp().unwrap();
    let t = e.t().unwrap().contiguous().unwrap(); // (6, 4)
    let s = t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap(); // (6, 1)
    let n = t.broadcast_div(&s).unwrap();
    let d = n.apply_op1(Double { declare }).unwrap();
    let m = d
        .broadcast_mul(&c.t().unwrap().narrow(1, 0, 4).unwrap())
        .unwrap();
    let g = m.tanh().unwrap().reshape((2, 12)).unwrap();
    (g.silu().unwrap() - g.max_keepdim(1).unwrap().broadcast_as((2, 12)).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
}

fn grads_of(declare: bool, release: bool) -> (Vec<f32>, Vec<f32>, usize) {
    let x = var(&ramp(12, 0.1), &[4, 3]);
    let w = var(&ramp(18, 0.05), &[3, 6]);
    let c = Tensor::from_vec(ramp(36, 0.02), (6, 6), &Device::Cpu).unwrap();
    let out = graph(&x, &w, &c, declare);
    let released = if release {
        out.release_unneeded_for_backward().unwrap()
    } else {
        0
    };
    let upstream = Tensor::from_vec(ramp(24, 0.3), (2, 12), &Device::Cpu).unwrap();
    let grads = (out * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (
        flat(grads.get(x.as_tensor()).unwrap()),
        flat(grads.get(w.as_tensor()).unwrap()),
        released,
    )
}

#[test]
fn released_graphs_give_bitwise_the_same_gradients() {
    let (gx, gw, _) = grads_of(false, false);
    for declare in [false, true] {
        let (rx, rw, released) = grads_of(declare, true);
        assert!(released > 0, "nothing released");
        assert_eq!(gx, rx);
        assert_eq!(gw, rw);
    }
    // Declaring that the custom op reads nothing frees its input too.
    assert!(grads_of(true, true).2 > grads_of(false, true).2);
}

#[test]
fn exactly_the_unread_storages_go() {
    let x = var(&ramp(8, 0.1), &[2, 4]);
    // `a` is read by nobody's rule (exp reads its own result); `b`, its view `v` and the
    // root stay.
    let a = x.as_tensor().affine(2.0, 1.0).unwrap();
    let b = a.exp().unwrap();
    let v = b.reshape(8).unwrap();
    let y = (&v + 1.0).unwrap();
    drop((a, b, v));
    assert_eq!(y.release_unneeded_for_backward().unwrap(), 1);
    // A second pass is harmless (it empties the same storage again).
    assert_eq!(y.release_unneeded_for_backward().unwrap(), 1);
}

#[test]
fn values_held_outside_the_graph_stay_readable() {
    let x = var(&ramp(8, 0.1), &[2, 4]);
    let a = x.as_tensor().affine(2.0, 1.0).unwrap();
    let detached = x.as_tensor().affine(3.0, 0.0).unwrap();
    let kept_view = detached.detach();
    let b = (a.exp().unwrap() + &detached).unwrap();
    let y = (&b * 2.0).unwrap();
    drop((detached, b));
    // `a` is held here, `detached`'s storage by a detached copy: neither goes; `b` goes
    // (and `exp(a)`, which its rule reads, stays).
    assert_eq!(y.release_unneeded_for_backward().unwrap(), 1);
    assert_eq!(a.to_vec2::<f32>().unwrap().len(), 2);
    assert_eq!(kept_view.to_vec2::<f32>().unwrap().len(), 2);
    // The root, the leaf and constants stay whatever holds them.
    let roots = [&y];
    release_unneeded_for_backward(&roots).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap().len(), 2);
    assert_eq!(x.as_tensor().to_vec2::<f32>().unwrap().len(), 2);
    assert_eq!(y.dtype(), DType::F32);
}
