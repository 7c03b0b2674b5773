//! The device-generic chunked attention against candle's composed attention at 1024 tokens
//! per frame (4 frames, 8 heads of 64, f32): what the graph keeps after the forward pass
//! and the peak of forward and backward, measured by the counting allocator. The composed
//! form keeps score-sized tensors (4 · 8 · 1024² f32 = 128 MiB each) for its backward; the
//! chunked one keeps no score-sized tensor and holds one chunk of scores at a time. One
//! test per binary: nothing else allocates while memory is measured.

use candle_core::{DType, Device, Tensor, Var, D};
use latte::nn::chunked_attention;
use latte::random::{randn, rng_for};
use remat::meter::{format_bytes, live_bytes, peak_bytes, reset_peak};

remat::install_counting_allocator!();

/// `softmax(scale·q·kᵀ)·v` composed from candle ops, in the merged layout.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let scores = (q * scale).unwrap().matmul(&k.t().unwrap()).unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap().detach();
    let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let sum = exp.sum_keepdim(D::Minus1).unwrap();
    let (b, h, s, d) = q.dims4().unwrap();
    exp.broadcast_div(&sum)
        .unwrap()
        .matmul(v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, s, h * d))
        .unwrap()
}

/// Bytes the graph keeps after the forward pass and the peak of forward and backward,
/// both above what was live before.
fn measure(attend: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor) -> (u64, u64) {
    let dev = Device::Cpu;
    let mut rng = rng_for(1, "attention-memory");
    let mut var = || Var::from_tensor(&randn(&mut rng, (4, 8, 1024, 64), &dev).unwrap()).unwrap();
    let (q, k, v) = (var(), var(), var());
    let upstream = randn(&mut rng, (4, 1024, 512), &dev).unwrap();
    let before = live_bytes();
    reset_peak();
    let output = attend(&q, &k, &v);
    let kept = live_bytes() - before;
    let grads = (output * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let peak = peak_bytes() - before;
    assert!(grads.get(&q).is_some() && grads.get(&v).is_some());
    (kept, peak)
}

#[test]
fn chunked_attention_keeps_no_score_sized_tensor() {
    let scale = 1.0 / 8.0;
    let (composed_kept, composed_peak) = measure(|q, k, v| composed(q, k, v, scale));
    let (chunked_kept, chunked_peak) =
        measure(|q, k, v| chunked_attention::attention(q, k, v, scale).unwrap());
    eprintln!(
        "1024 tokens per frame, 4 frames, 8 heads: composed keeps {} (peak {}), chunked keeps {} \
         (peak {})",
        format_bytes(composed_kept),
        format_bytes(composed_peak),
        format_bytes(chunked_kept),
        format_bytes(chunked_peak)
    );
    let scores = 4 * 8 * 1024 * 1024 * DType::F32.size_in_bytes() as u64;
    let activation = 4 * 1024 * 512 * 4;
    // The output and the log-sum-exp, no more.
    assert!(
        chunked_kept <= activation + activation / 8,
        "{chunked_kept}"
    );
    assert!(composed_kept >= 2 * scores, "{composed_kept}");
    // One chunk of scores (2²⁴ elements) and its f32 companions at a time.
    assert!(
        chunked_peak < composed_peak / 2,
        "{chunked_peak} vs {composed_peak}"
    );
}
