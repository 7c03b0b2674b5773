//! The T5 encoder (Raffel et al. 2020) with an attention mask, weight-compatible with
//! transformers' `T5EncoderModel` (Latte uses t5-v1_1-xxl).
//!
//! Upstream: `transformers/models/t5/modeling_t5.py` (transformers 5.24.0). candle's
//! `candle_transformers::models::t5::T5EncoderModel` takes no attention mask, and
//! LattePipeline needs one: the negative prompt is padded to 120 tokens and its padding
//! positions (kept by `mask_feature` up to the positive prompt's length) attend only to
//! the real tokens. Hence this port; it reads the same `config.json` and weight names
//! (`shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.q`, …).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Activation, Embedding, Linear, VarBuilder};
use serde::Deserialize;

/// The keys of transformers' `T5Config` that the encoder uses, with transformers'
/// defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct T5ConfigFile {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
}

impl Default for T5ConfigFile {
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
        }
    }
}

impl T5ConfigFile {
    /// The feed-forward activation and whether it is gated (`wi_0`/`wi_1`), from
    /// `feed_forward_proj`; `Err` holds the supported values.
    pub fn feed_forward(&self) -> std::result::Result<(Activation, bool), &'static str> {
        match self.feed_forward_proj.as_str() {
            "relu" => Ok((Activation::Relu, false)),
            "gated-relu" => Ok((Activation::Relu, true)),
            // transformers maps "gated-gelu" to gelu_new, the tanh approximation.
            "gated-gelu" => Ok((Activation::NewGelu, true)),
            "gated-silu" => Ok((Activation::Silu, true)),
            _ => Err("relu, gated-relu, gated-gelu or gated-silu"),
        }
    }
}

/// T5's RMS norm: no mean subtraction, no bias; the variance in f32.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(d, "weight")?,
            eps,
        })
    }
}

impl Module for T5LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let xs = xs.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        xs.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

fn linear_no_bias(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((d_out, d_in), "weight")?, None))
}

/// `layer.0`: pre-norm self-attention with relative position bias (block 0 owns the
/// bias table; later blocks reuse its result).
#[derive(Debug, Clone)]
struct T5SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    relative_attention_bias: Option<Embedding>,
    layer_norm: T5LayerNorm,
    num_heads: usize,
    d_kv: usize,
}

impl T5SelfAttention {
    fn new(has_bias: bool, cfg: &T5ConfigFile, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let attn = vb.pp("SelfAttention");
        let relative_attention_bias = if has_bias {
            let table = attn.pp("relative_attention_bias").get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "weight",
            )?;
            Some(Embedding::new(table, cfg.num_heads))
        } else {
            None
        };
        Ok(Self {
            q: linear_no_bias(cfg.d_model, inner, attn.pp("q"))?,
            k: linear_no_bias(cfg.d_model, inner, attn.pp("k"))?,
            v: linear_no_bias(cfg.d_model, inner, attn.pp("v"))?,
            o: linear_no_bias(inner, cfg.d_model, attn.pp("o"))?,
            relative_attention_bias,
            layer_norm: T5LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, vb.pp("layer_norm"))?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `xs` (b, l, d) + attention with `bias` (b, heads, l, l): position bias plus mask.
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let normed = self.layer_norm.forward(xs)?;
        // (b, l, h·d) → (b, h, l, d)
        let heads = |t: Tensor| {
            t.reshape((b, l, self.num_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q.forward(&normed)?)?;
        let k = heads(self.k.forward(&normed)?)?;
        let v = heads(self.v.forward(&normed)?)?;
        // T5 does not scale the scores (the 1/√d is folded into the initialisation).
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        // (b, h, l, d) → (b, l, h·d)
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.d_kv))?;
        xs + self.o.forward(&out)?
    }
}

/// `layer.1`: pre-norm feed-forward (`DenseReluDense`), gated or not.
#[derive(Debug, Clone)]
struct T5FeedForward {
    wi: Linear,
    wi_gate: Option<Linear>,
    wo: Linear,
    act: Activation,
    layer_norm: T5LayerNorm,
}

impl T5FeedForward {
    fn new(cfg: &T5ConfigFile, act: Activation, gated: bool, vb: VarBuilder) -> Result<Self> {
        let dense = vb.pp("DenseReluDense");
        let (wi, wi_gate) = if gated {
            (
                linear_no_bias(cfg.d_model, cfg.d_ff, dense.pp("wi_0"))?,
                Some(linear_no_bias(cfg.d_model, cfg.d_ff, dense.pp("wi_1"))?),
            )
        } else {
            (linear_no_bias(cfg.d_model, cfg.d_ff, dense.pp("wi"))?, None)
        };
        Ok(Self {
            wi,
            wi_gate,
            wo: linear_no_bias(cfg.d_ff, cfg.d_model, dense.pp("wo"))?,
            act,
            layer_norm: T5LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, vb.pp("layer_norm"))?,
        })
    }
}

impl Module for T5FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let normed = self.layer_norm.forward(xs)?;
        let mut hidden = self.act.forward(&self.wi.forward(&normed)?)?;
        if let Some(gate) = &self.wi_gate {
            hidden = (hidden * gate.forward(&normed)?)?;
        }
        xs + self.wo.forward(&hidden)?
    }
}

/// transformers' `_relative_position_bucket` for a bidirectional encoder: the bucket of
/// key position minus query position, computed in f32 as torch does.
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        let ratio = (distance as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln();
        let large = max_exact + (ratio * (half - max_exact) as f32) as usize;
        large.min(half - 1)
    };
    bucket
}

/// The T5 encoder stack: token embedding, blocks, final norm.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    shared: Embedding,
    blocks: Vec<(T5SelfAttention, T5FeedForward)>,
    final_layer_norm: T5LayerNorm,
    config: T5ConfigFile,
}

impl T5Encoder {
    /// Builds the encoder from `vb` at the checkpoint's root (`shared`, `encoder.…`).
    /// The embedding is `shared.weight`, or `encoder.embed_tokens.weight` when only that
    /// copy of the tied table is stored.
    pub fn new(config: &T5ConfigFile, vb: VarBuilder) -> Result<Self> {
        let (act, gated) = config.feed_forward().map_err(|supported| {
            candle_core::Error::Msg(format!(
                "config key `feed_forward_proj` = {:?} is not supported: {supported}",
                config.feed_forward_proj
            ))
        })?;
        let table_shape = (config.vocab_size, config.d_model);
        let table = if vb.contains_tensor("shared.weight") {
            vb.pp("shared").get(table_shape, "weight")?
        } else {
            vb.pp("encoder.embed_tokens").get(table_shape, "weight")?
        };
        let encoder = vb.pp("encoder");
        let blocks = (0..config.num_layers)
            .map(|i| {
                let block = encoder.pp(format!("block.{i}"));
                Ok((
                    T5SelfAttention::new(i == 0, config, block.pp("layer.0"))?,
                    T5FeedForward::new(config, act, gated, block.pp("layer.1"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            shared: Embedding::new(table, config.d_model),
            blocks,
            final_layer_norm: T5LayerNorm::new(
                config.d_model,
                config.layer_norm_epsilon,
                encoder.pp("final_layer_norm"),
            )?,
            config: config.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &T5ConfigFile {
        &self.config
    }

    /// Relative position bias (1, heads, l, l) on `device`.
    fn position_bias(&self, l: usize, device: &Device) -> Result<Tensor> {
        let cfg = &self.config;
        let buckets: Vec<u32> = (0..l as i64)
            .flat_map(|q| {
                (0..l as i64).map(move |k| {
                    relative_bucket(
                        k - q,
                        cfg.relative_attention_num_buckets,
                        cfg.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (l, l), device)?;
        let table = self.blocks[0]
            .0
            .relative_attention_bias
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("T5 block 0 has no position bias".into()))?;
        // (l, l, heads) → (1, heads, l, l)
        table.forward(&buckets)?.permute((2, 0, 1))?.unsqueeze(0)
    }

    /// Hidden states (b, l, d_model) of `input_ids` (b, l) u32 with `attention_mask`
    /// (b, l) of 0/1: masked keys get −f32::MAX added to their scores, as transformers does.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let device = input_ids.device();
        let mut xs = self.shared.forward(input_ids)?;
        let dtype = xs.dtype();
        let mask = ((1.0 - attention_mask.to_dtype(DType::F32)?)? * f32::MIN as f64)?
            .reshape((b, 1, 1, l))?;
        let bias = self
            .position_bias(l, device)?
            .to_dtype(DType::F32)?
            .broadcast_add(&mask)?
            .to_dtype(dtype)?;
        for (attention, feed_forward) in &self.blocks {
            xs = attention.forward(&xs, &bias)?;
            xs = feed_forward.forward(&xs)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    /// transformers' `T5Attention._relative_position_bucket(torch.arange(-30, 31),
    /// bidirectional=True, …)` (transformers 5.24.0) for Latte's T5 (32 buckets, distance
    /// 128) and the fixture's (8, 20).
    #[test]
    fn buckets_match_transformers() {
        let t5_xxl: [usize; 61] = [
            11, 11, 11, 11, 11, 11, 11, 11, 10, 10, 10, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8, 7,
            6, 5, 4, 3, 2, 1, 0, 17, 18, 19, 20, 21, 22, 23, 24, 24, 24, 24, 25, 25, 25, 25, 26,
            26, 26, 26, 26, 26, 26, 27, 27, 27, 27, 27, 27, 27, 27,
        ];
        let fixture: [usize; 61] = [
            3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2,
            1, 0, 5, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
            7, 7, 7,
        ];
        for (buckets, distance, expected) in [(32, 128, &t5_xxl), (8, 20, &fixture)] {
            let got: Vec<usize> = (-30..=30)
                .map(|r| relative_bucket(r, buckets, distance))
                .collect();
            assert_eq!(got, expected.to_vec(), "{buckets} buckets");
        }
    }
}
