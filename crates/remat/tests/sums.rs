//! The vendored candle-core's sums over leading dimensions (patch 5): run by run, bitwise
//! equal to adding every element in memory order, for every set of reduced dimensions that
//! keeps the last one; strided views still take upstream's element-wise path.

use candle_core::{Device, Tensor};

/// `Σ` of `values` (shape `dims`, row-major) over `reduced`, adding elements in memory order.
fn reference_sum(values: &[f32], dims: &[usize], reduced: &[usize]) -> Vec<f32> {
    let kept: Vec<usize> = (0..dims.len())
        .map(|d| if reduced.contains(&d) { 1 } else { dims[d] })
        .collect();
    let mut out = vec![0f32; kept.iter().product()];
    for (flat, &v) in values.iter().enumerate() {
        let (mut rest, mut index, mut stride) = (flat, 0, 1);
        for d in (0..dims.len()).rev() {
            let coordinate = if reduced.contains(&d) {
                0
            } else {
                rest % dims[d]
            };
            rest /= dims[d];
            index += coordinate * stride;
            stride *= kept[d];
        }
        out[index] += v;
    }
    out
}

#[test]
fn sums_that_keep_the_last_dimension_match_adding_in_memory_order() {
    let dims = [3, 5, 4, 6];
    let n: usize = dims.iter().product();
    // Values of very different magnitudes, so that a changed order of additions shows.
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 113) as f32 - 56.0) * 10f32.powi((i % 7) as i32 - 3))
        .collect();
    let x = Tensor::from_vec(values.clone(), &dims, &Device::Cpu).unwrap();
    // Every set that keeps the last dimension (sums over the last ones take upstream's
    // vectorised path, which adds in another order).
    let reductions: [&[usize]; 6] = [&[0], &[1], &[0, 1], &[0, 2], &[1, 2], &[0, 1, 2]];
    for reduced in reductions {
        let sum = x.sum_keepdim(reduced).unwrap();
        let got = sum.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = reference_sum(&values, &dims, reduced);
        let same_bits = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same_bits, "sum over {reduced:?}: {got:?} != {want:?}");
    }
}

#[test]
fn sums_of_strided_views_still_reduce_the_right_elements() {
    // A transposed view is not contiguous and takes upstream's element-wise path.
    let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 4))
        .unwrap();
    let t = x.transpose(1, 2).unwrap();
    let sum = t.sum_keepdim(0).unwrap();
    let want = x.sum_keepdim(0).unwrap().transpose(1, 2).unwrap();
    let (got, want) = (
        sum.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    );
    assert_eq!(got, want);
}
