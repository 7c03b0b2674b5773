//! `LatteTransformer3DModel` (diffusers `models/transformers/latte_transformer_3d.py`,
//! diffusers 0.42.1) exposed as a chain for `remat`: a **head** (patch and position
//! embedding, adaLN-single timestep embedding, caption projection), **stages** (spatial
//! block i, then temporal block i, for every layer; each block as two stages, its
//! attention half and its feed-forward half), and a **tail** (final modulation, norm,
//! projection, unpatchify). The model never sees a checkpoint policy.

use crate::config::LatteConfig;
use crate::nn::block::{BlockSpec, TransformerBlock};
use crate::nn::embeddings::{
    temporal_positions, AdaLayerNormSingle, CaptionProjection, PatchEmbed,
};
use crate::nn::linear::{Linear, Output};
use crate::nn::norm::modulated_layer_norm;
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use remat::chain::{ChainModel, StageContext};

/// Epsilon of the output norm, fixed in diffusers whatever `norm_eps` says.
const OUTPUT_NORM_EPS: f64 = 1e-6;

/// The Latte transformer with its weights.
#[derive(Debug, Clone)]
pub struct Latte {
    config: LatteConfig,
    pos_embed: PatchEmbed,
    adaln_single: AdaLayerNormSingle,
    caption_projection: CaptionProjection,
    transformer_blocks: Vec<TransformerBlock>,
    temporal_transformer_blocks: Vec<TransformerBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
}

/// The model's three inputs.
#[derive(Debug, Clone)]
pub struct LatteInputs {
    /// Noisy latents `(b, c, f, h, w)`.
    pub hidden_states: Tensor,
    /// Diffusion timesteps `(b,)`, integer or float.
    pub timestep: Tensor,
    /// Text-encoder embeddings `(b, l, caption_channels)`.
    pub encoder_hidden_states: Tensor,
}

impl LatteInputs {
    /// The inputs in the order [`LatteChain`] takes them.
    pub fn to_vec(&self) -> Vec<Tensor> {
        vec![
            self.hidden_states.clone(),
            self.timestep.clone(),
            self.encoder_hidden_states.clone(),
        ]
    }
}

impl Latte {
    /// Builds the model from `vb`: mmapped weights for inference, or a `VarMap`-backed
    /// builder (fresh or loaded values) for training. Keys follow diffusers exactly.
    pub fn new(config: &LatteConfig, vb: VarBuilder) -> Result<Self> {
        if vb.device().is_cpu() {
            // Before the first step, so that no measured step holds it.
            crate::nn::matrix::allocate_packing_buffers();
        }
        let dim = config.hidden_size();
        let block = |cross_attention| BlockSpec {
            num_heads: config.num_heads,
            head_dim: config.head_dim,
            attention_bias: config.attention_bias,
            norm_eps: config.norm_eps,
            cross_attention,
        };
        let blocks = |name: &str, cross_attention| -> Result<Vec<TransformerBlock>> {
            (0..config.num_layers)
                .map(|i| TransformerBlock::new(block(cross_attention), vb.pp(name).pp(i)))
                .collect()
        };
        let patch_out = config.patch_size * config.patch_size * config.out_channels;
        Ok(Self {
            config: config.clone(),
            pos_embed: PatchEmbed::new(
                config.in_channels,
                dim,
                config.patch_size,
                config.base_grid_size(),
                config.interpolation_scale(),
                vb.pp("pos_embed"),
            )?,
            adaln_single: AdaLayerNormSingle::new(dim, vb.pp("adaln_single"))?,
            caption_projection: CaptionProjection::new(
                config.caption_channels,
                dim,
                vb.pp("caption_projection"),
            )?,
            transformer_blocks: blocks("transformer_blocks", true)?,
            temporal_transformer_blocks: blocks("temporal_transformer_blocks", false)?,
            scale_shift_table: vb.get_with_hints(
                (2, dim),
                "scale_shift_table",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / (dim as f64).sqrt(),
                },
            )?,
            proj_out: Linear::new(dim, patch_out, true, vb.pp("proj_out"))?,
        })
    }

    /// Every linear layer under its diffusers module name (`adaln_single.linear`,
    /// `transformer_blocks.0.attn1.to_q`, …, `proj_out`): where low-rank updates attach.
    /// The patch embedding, a convolution in diffusers, is not among them.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        fn named<'a>(
            prefix: &str,
            layers: Vec<(&'static str, &'a mut Linear)>,
        ) -> Vec<(String, &'a mut Linear)> {
            layers
                .into_iter()
                .map(|(name, l)| (format!("{prefix}.{name}"), l))
                .collect()
        }
        let mut layers = named("adaln_single", self.adaln_single.linears_mut());
        layers.extend(named(
            "caption_projection",
            self.caption_projection.linears_mut(),
        ));
        for (prefix, blocks) in [
            ("transformer_blocks", &mut self.transformer_blocks),
            (
                "temporal_transformer_blocks",
                &mut self.temporal_transformer_blocks,
            ),
        ] {
            for (i, block) in blocks.iter_mut().enumerate() {
                layers.extend(
                    block
                        .linears_mut()
                        .into_iter()
                        .map(|(name, l)| (format!("{prefix}.{i}.{name}"), l)),
                );
            }
        }
        layers.push(("proj_out".to_string(), &mut self.proj_out));
        layers
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &LatteConfig {
        &self.config
    }

    /// The model as a chain of stages; `temporal = false` is diffusers'
    /// `enable_temporal_attentions=False` (spatial blocks only).
    pub fn chain(&self, temporal: bool) -> LatteChain<'_> {
        LatteChain {
            model: self,
            temporal,
        }
    }

    /// Plain forward pass (no checkpointing): `(b, out_channels, f, h, w)`.
    pub fn forward(&self, inputs: &LatteInputs, temporal: bool) -> Result<Tensor> {
        let chain = self.chain(temporal);
        let (mut x, ctx) = chain.head(&inputs.to_vec())?;
        for stage in 0..chain.num_stages() {
            x = chain.stage_forward(stage, &x, &ctx)?;
        }
        chain.tail(&x, &ctx)
    }

    /// Checks the inputs' shapes against the model and each other; the error names the
    /// offending tensor, its shape and what was expected.
    pub fn check_inputs(&self, inputs: &LatteInputs, temporal: bool) -> Result<()> {
        let cfg = &self.config;
        let dims = inputs.hidden_states.dims();
        let fail = |msg: String| Err(candle_core::Error::Msg(msg));
        let [b, c, f, h, w] = dims else {
            return fail(format!(
                "hidden_states must be (batch, channels, frames, height, width), got shape {dims:?}"
            ));
        };
        let (b, c, f, h, w) = (*b, *c, *f, *h, *w);
        if c != cfg.in_channels {
            return fail(format!(
                "hidden_states has {c} channels, the model expects in_channels = {}",
                cfg.in_channels
            ));
        }
        if b == 0 || f == 0 || h == 0 || w == 0 {
            return fail(format!(
                "hidden_states has an empty dimension: shape {dims:?}"
            ));
        }
        let p = cfg.patch_size;
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return fail(format!(
                "hidden_states height {h} and width {w} must be divisible by patch_size = {p}"
            ));
        }
        if temporal && f > 1 && f != cfg.video_length {
            return fail(format!(
                "hidden_states has {f} frames but the temporal position embedding covers \
                 video_length = {} frames; use {} frames, a single frame, or disable temporal \
                 attention",
                cfg.video_length, cfg.video_length
            ));
        }
        if inputs.timestep.dims() != [b] {
            return fail(format!(
                "timestep must have shape [{b}] (one per video), got {:?}",
                inputs.timestep.dims()
            ));
        }
        let caption_dims = inputs.encoder_hidden_states.dims();
        match caption_dims {
            [cb, l, cc] if *cb == b && *l > 0 && *cc == cfg.caption_channels => Ok(()),
            _ => fail(format!(
                "encoder_hidden_states must be ({b}, tokens, {}), got shape {caption_dims:?}",
                cfg.caption_channels
            )),
        }
    }
}

/// Tensors every stage reads, computed once by the head.
#[derive(Debug, Clone)]
pub struct LatteContext {
    /// Projected captions per frame image, `(b·f, l, d)`.
    captions: Tensor,
    /// The embedded timestep per frame image for the output modulation, `(b·f, d)`.
    embedded_timestep: Tensor,
    /// adaLN-single modulation per video, `(b, 6·d)`: every block modulates the tokens of
    /// each video with its video's row.
    timestep_video: Tensor,
    geometry: Geometry,
}

/// Sizes of the token grid, fixed by the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    frames: usize,
    grid_h: usize,
    grid_w: usize,
}

impl StageContext for LatteContext {
    fn tensors(&self) -> Vec<Tensor> {
        vec![
            self.captions.clone(),
            self.embedded_timestep.clone(),
            self.timestep_video.clone(),
        ]
    }

    fn with_tensors(&self, tensors: Vec<Tensor>) -> Result<Self> {
        let [captions, embedded_timestep, timestep_video]: [Tensor; 3] = tensors
            .try_into()
            .map_err(|_| candle_core::Error::Msg("LatteContext holds 3 tensors".into()))?;
        Ok(Self {
            captions,
            embedded_timestep,
            timestep_video,
            geometry: self.geometry,
        })
    }
}

/// The model viewed as `head → stages → tail` for the remat executor.
#[derive(Debug, Clone, Copy)]
pub struct LatteChain<'a> {
    model: &'a Latte,
    temporal: bool,
}

/// `(n, …)` → each row repeated `times` times consecutively (`repeat_interleave(dim=0)`).
fn repeat_rows(x: &Tensor, times: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let expanded: Vec<usize> = [dims[0], times]
        .into_iter()
        .chain(dims[1..].iter().copied())
        .collect();
    dims[0] *= times;
    x.unsqueeze(1)?
        .broadcast_as(expanded)?
        .contiguous()?
        .reshape(dims)
}

/// `(batch·a, b, d) → (batch·b, a, d)`: swaps the sequence axis with the per-video row
/// axis, moving between frame-major `(b·f, n, d)` and token-major `(b·n, f, d)` layouts.
fn swap_sequence_axes(x: &Tensor, batch: usize) -> Result<Tensor> {
    let (rows, len, d) = x.dims3()?;
    let per_batch = rows / batch;
    // (batch·per_batch, len, d) → (batch, per_batch, len, d) → (batch, len, per_batch, d)
    x.reshape((batch, per_batch, len, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch * len, per_batch, d))
}

/// Which half of a transformer block a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    /// Self-attention, and cross-attention in spatial blocks.
    Attention,
    /// The modulated feed-forward network.
    FeedForward,
}

/// What one stage of the chain computes.
#[derive(Debug, Clone, Copy)]
struct StagePart {
    layer: usize,
    temporal: bool,
    half: Half,
}

impl LatteChain<'_> {
    /// Stages run block by block, each block as its attention half then its feed-forward
    /// half; blocks alternate spatial and temporal when temporal attention is on.
    fn part(&self, index: usize) -> StagePart {
        let block = index / 2;
        let half = if index.is_multiple_of(2) {
            Half::Attention
        } else {
            Half::FeedForward
        };
        let (layer, temporal) = if self.temporal {
            (block / 2, block % 2 == 1)
        } else {
            (block, false)
        };
        StagePart {
            layer,
            temporal,
            half,
        }
    }

    /// The temporal attention half: moves to `(b·n, f, d)`, adds the temporal position
    /// embedding before the first temporal block, attends across frames, moves back.
    fn temporal_attention(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &LatteContext,
        output: Output,
    ) -> Result<Tensor> {
        let geometry = ctx.geometry;
        // (b·f, n, d) → (b·n, f, d)
        let mut sequences = swap_sequence_axes(x, geometry.batch)?;
        if layer == 0 && geometry.frames > 1 {
            let d = self.model.config.hidden_size();
            let positions = temporal_positions(d, geometry.frames, x.dtype(), x.device())?;
            sequences = sequences.broadcast_add(&positions)?;
        }
        let out = self.model.temporal_transformer_blocks[layer].attention_half(
            &sequences,
            &ctx.timestep_video,
            None,
            output,
        )?;
        // (b·n, f, d) → (b·f, n, d)
        swap_sequence_axes(&out, geometry.batch)
    }

    /// Stage `index`; `output` says whether a feed-forward half computes its values.
    fn run_stage(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &LatteContext,
        output: Output,
    ) -> Result<Tensor> {
        let StagePart {
            layer,
            temporal,
            half,
        } = self.part(index);
        let blocks = if temporal {
            &self.model.temporal_transformer_blocks
        } else {
            &self.model.transformer_blocks
        };
        let _span = tracing::trace_span!("stage", layer, temporal, ?half).entered();
        match (half, temporal) {
            (Half::Attention, false) => {
                blocks[layer].attention_half(x, &ctx.timestep_video, Some(&ctx.captions), output)
            }
            (Half::Attention, true) => self.temporal_attention(layer, x, ctx, output),
            (Half::FeedForward, _) => {
                // (b·f, n, d) → (b, f·n, d): one sequence per video.
                let dims = x.dims3()?;
                let videos = x.reshape((ctx.geometry.batch, (), dims.2))?;
                blocks[layer]
                    .feed_forward_half(&videos, &ctx.timestep_video, output)?
                    .reshape(dims)
            }
        }
    }
}

impl ChainModel for LatteChain<'_> {
    type Context = LatteContext;

    /// Inputs `[hidden_states, timestep, encoder_hidden_states]` → frame tokens
    /// `(b·f, n, d)` and the shared context.
    fn head(&self, inputs: &[Tensor]) -> Result<(Tensor, LatteContext)> {
        let [hidden_states, timestep, captions] = inputs else {
            candle_core::bail!("Latte takes [hidden_states, timestep, encoder_hidden_states]");
        };
        let model = self.model;
        let dtype = hidden_states.dtype();
        let (b, c, f, h, w) = hidden_states.dims5()?;
        let p = model.config.patch_size;
        let geometry = Geometry {
            batch: b,
            frames: f,
            grid_h: h / p,
            grid_w: w / p,
        };
        // (b, c, f, h, w) → (b, f, c, h, w) → (b·f, c, h, w)
        let frames = hidden_states
            .permute((0, 2, 1, 3, 4))?
            .reshape((b * f, c, h, w))?;
        let tokens = model.pos_embed.forward(&frames)?;
        let (modulation, embedded) = model.adaln_single.forward(timestep, dtype)?;
        let captions = model.caption_projection.forward(captions)?;
        let context = LatteContext {
            captions: repeat_rows(&captions, f)?,
            embedded_timestep: repeat_rows(&embedded, f)?,
            timestep_video: modulation,
            geometry,
        };
        Ok((tokens, context))
    }

    fn num_stages(&self) -> usize {
        let layers = self.model.config.num_layers;
        let blocks = if self.temporal { 2 * layers } else { layers };
        2 * blocks
    }

    /// Spatial attention attends within each frame over `(b·f, n, d)`; temporal attention
    /// moves to `(b·n, f, d)`, attends across frames, and moves back. The feed-forward
    /// halves are token-wise: they see each video as one sequence `(b, f·n, d)` (a view of
    /// the frame-major layout) with its video's modulation.
    fn stage_forward(&self, index: usize, x: &Tensor, ctx: &LatteContext) -> Result<Tensor> {
        self.run_stage(index, x, ctx, Output::Values)
    }

    /// A feed-forward half skips its gated product (its result is zeros plus the
    /// residual); an attention half skips its last output projection where nothing reads
    /// it ([`TransformerBlock::attention_half`]).
    fn stage_graph_only(&self, index: usize, x: &Tensor, ctx: &LatteContext) -> Result<Tensor> {
        self.run_stage(index, x, ctx, Output::GraphOnly)
    }

    /// Tokens `(b·f, n, d)` → `(b, out_channels, f, h, w)`.
    fn tail(&self, x: &Tensor, ctx: &LatteContext) -> Result<Tensor> {
        let model = self.model;
        let cfg = &model.config;
        let Geometry {
            batch,
            frames,
            grid_h,
            grid_w,
        } = ctx.geometry;
        let (rows, _, d) = x.dims3()?;
        // (2, d) + (b·f, 1, d) → shift, scale: (b·f, 1, d)
        let modulation = ctx
            .embedded_timestep
            .reshape((rows, 1, d))?
            .broadcast_add(&model.scale_shift_table.unsqueeze(0)?)?;
        let (shift, scale) = (modulation.narrow(1, 0, 1)?, modulation.narrow(1, 1, 1)?);
        let x = modulated_layer_norm(x, &shift, &scale, OUTPUT_NORM_EPS)?;
        let patches = model.proj_out.forward(&x)?;
        let (p, c) = (cfg.patch_size, cfg.out_channels);
        // (b·f, gh·gw, p·p·c) → (b, f, gh, gw, p, p, c) → (b, c, f, gh, p, gw, p)
        patches
            .reshape(vec![batch, frames, grid_h, grid_w, p, p, c])?
            .permute(vec![0, 6, 1, 2, 4, 3, 5])?
            .reshape((batch, c, frames, grid_h * p, grid_w * p))
    }

    fn starts_block(&self, index: usize) -> bool {
        self.part(index).half == Half::Attention
    }

    /// `spatial.3.attn`, `temporal.3.ff`, … (diffusers' module names).
    fn stage_name(&self, index: usize) -> String {
        let part = self.part(index);
        let kind = if part.temporal { "temporal" } else { "spatial" };
        let half = match part.half {
            Half::Attention => "attn",
            Half::FeedForward => "ff",
        };
        format!("{kind}.{}.{half}", part.layer)
    }
}
