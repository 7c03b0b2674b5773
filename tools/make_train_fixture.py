"""Generate the golden fixture of one Latte training step: ``tests/fixtures/train_step/``.

The loss is the one Latte trains with: the DiT / ADM ``GaussianDiffusion.training_losses``
with ``learn_sigma=True`` (``ModelVarType.LEARNED_RANGE``, ``LossType.MSE``, linear β
schedule from 1e-4 to 0.02 over 1000 steps, no respacing): the ε-prediction MSE plus the
variational bound term ``_vb_terms_bpd`` computed with the predicted ε frozen (detached),
in bits per dimension, with the decoder NLL at t = 0. The formulas below are DiT's
(``diffusion/gaussian_diffusion.py`` and ``diffusion/diffusion_utils.py``), written out
in torch and evaluated in **float64** (DiT casts the schedule arrays to float32; here they
stay float64 so the reference is exact). Layout is diffusers' ``(B, C, F, H, W)``; DiT's
``mean_flat`` averages every non-batch dimension, so the layout does not change the loss.

Files written to ``<out>/train_step/``:

* ``model/``: a small random float32 ``LatteTransformer3DModel`` (``save_pretrained``).
* ``batch.safetensors``: ``x0`` f32 (B, C, F, H, W) with values in [-1, 1] including
  exact ±1 (so the decoder NLL's edge cases are taken), ``noise`` f32 (same shape),
  ``timestep`` i64 (B,) including 0, ``encoder_hidden_states`` f32 (B, L, caption_channels).
* ``expected.safetensors`` (float64 results stored as float32):
  ``x_t`` (q_sample), ``loss`` (scalar, mean over the batch of mse + vb), ``mse`` (B,),
  ``vb`` (B,), ``grad.output`` (d loss / d model output), ``grad.<param>`` for the
  parameters in ``CHECKED_PARAMS``, ``grad_norm`` (the global L2 norm before clipping,
  scalar), and ``param.<name>`` for every parameter after one ``torch.optim.AdamW`` step
  taken after ``torch.nn.utils.clip_grad_norm_``.
* ``meta.json``: the optimiser hyper-parameters, the timesteps and the versions.

The AdamW step uses a large ``eps`` so that the clipped gradients' magnitudes matter
(with a tiny eps the first Adam step is ``lr · sign(g)`` whatever the clipping did).

Usage (from the repository root, with ``tools/requirements.txt`` installed)::

    python tools/make_train_fixture.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import LatteTransformer3DModel
from safetensors.torch import save_file

CONFIG = {
    "sample_size": 8,
    "num_layers": 1,
    "patch_size": 2,
    "attention_head_dim": 4,
    "num_attention_heads": 2,
    "caption_channels": 8,
    "in_channels": 3,
    "cross_attention_dim": 8,
    "out_channels": 6,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "video_length": 2,
}
SEED = 11
BATCH, FRAMES, HEIGHT, WIDTH, CAPTION_LEN = 4, 2, 8, 8, 3
TIMESTEPS = (0, 1, 400, 999)
OPTIMIZER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-3, "weight_decay": 0.1}
MAX_GRAD_NORM = 0.05
CHECKED_PARAMS = (
    "pos_embed.proj.weight",
    "adaln_single.linear.weight",
    "caption_projection.linear_1.weight",
    "transformer_blocks.0.attn1.to_q.weight",
    "transformer_blocks.0.attn2.to_v.bias",
    "temporal_transformer_blocks.0.ff.net.2.weight",
    "scale_shift_table",
    "proj_out.weight",
    "proj_out.bias",
)
BIAS_STD = 0.3


# --- DiT's diffusion, float64 -------------------------------------------------------------


class Diffusion:
    """The arrays of DiT's ``GaussianDiffusion`` for the linear schedule."""

    def __init__(self, num_timesteps: int = 1000) -> None:
        scale = 1000 / num_timesteps
        betas = np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
        alphas = 1.0 - betas
        self.betas = betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)


def extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
    """DiT's ``_extract_into_tensor``, keeping float64."""
    res = torch.from_numpy(arr)[t]
    while len(res.shape) < len(shape):
        res = res[..., None]
    return res.expand(shape)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def q_sample(d: Diffusion, x0, t, noise):
    return extract(d.sqrt_alphas_cumprod, t, x0.shape) * x0 + extract(d.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise


def q_posterior_mean_variance(d: Diffusion, x_start, x_t, t):
    mean = extract(d.posterior_mean_coef1, t, x_t.shape) * x_start + extract(d.posterior_mean_coef2, t, x_t.shape) * x_t
    return mean, extract(d.posterior_log_variance_clipped, t, x_t.shape)


def p_mean_variance(d: Diffusion, model_output, x_t, t):
    """LEARNED_RANGE variance, ε prediction, no clipping of x̂0."""
    c = x_t.shape[1]
    eps, model_var_values = torch.split(model_output, c, dim=1)
    min_log = extract(d.posterior_log_variance_clipped, t, x_t.shape)
    max_log = extract(np.log(d.betas), t, x_t.shape)
    frac = (model_var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = extract(d.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - extract(d.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    model_mean, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
    return model_mean, model_log_variance


def vb_terms_bpd(d: Diffusion, frozen_out, x_start, x_t, t):
    true_mean, true_log_variance_clipped = q_posterior_mean_variance(d, x_start, x_t, t)
    mean, log_variance = p_mean_variance(d, frozen_out, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance_clipped, mean, log_variance)) / np.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=0.5 * log_variance)
    decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


def training_losses(d: Diffusion, model_output, x_start, x_t, t, noise):
    """``training_losses`` for LossType.MSE with a learned variance range."""
    c = x_t.shape[1]
    eps, model_var_values = torch.split(model_output, c, dim=1)
    frozen_out = torch.cat([eps.detach(), model_var_values], dim=1)
    vb = vb_terms_bpd(d, frozen_out, x_start, x_t, t)
    mse = mean_flat((noise - eps) ** 2)
    return mse, vb


# --- fixture -----------------------------------------------------------------------------


def build_model(gen: torch.Generator) -> LatteTransformer3DModel:
    model = LatteTransformer3DModel(**CONFIG)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.endswith("scale_shift_table"):
                std = 1.0 / math.sqrt(param.shape[-1])
            elif param.ndim >= 2:
                std = 1.0 / math.sqrt(param[0].numel())
            else:
                std = BIAS_STD
            param.copy_(noise * std)
    return model.eval()


def make_batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    shape = (BATCH, CONFIG["in_channels"], FRAMES, HEIGHT, WIDTH)
    # Pixel-like videos: a -1 background, +1 blocks, and some values strictly inside.
    x0 = -torch.ones(shape)
    x0[:, :, :, 2:5, 3:6] = 1.0
    x0[:, 1, :, 5:8, 0:4] = torch.rand((BATCH, FRAMES, 3, 4), generator=gen) * 2 - 1
    x0[0, 2, 1, 0, 0] = 0.9995  # just above the 0.999 edge
    x0[1, 0, 0, 7, 7] = -0.9995
    return {
        "x0": x0.float(),
        "noise": torch.randn(shape, generator=gen, dtype=torch.float32),
        "timestep": torch.tensor(TIMESTEPS, dtype=torch.int64),
        "encoder_hidden_states": torch.randn((BATCH, CAPTION_LEN, CONFIG["caption_channels"]), generator=gen),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)

    case_dir = args.out / "train_step"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = build_model(gen)
    batch = make_batch(gen)
    model.save_pretrained(case_dir / "model", safe_serialization=True)
    save_file(batch, case_dir / "batch.safetensors")

    d = Diffusion()
    ref = copy.deepcopy(model).double().train()
    x0 = batch["x0"].double()
    noise = batch["noise"].double()
    t = batch["timestep"]
    x_t = q_sample(d, x0, t, noise)
    output = ref(x_t, timestep=t, encoder_hidden_states=batch["encoder_hidden_states"].double()).sample
    output.retain_grad()
    mse, vb = training_losses(d, output, x0, x_t, t, noise)
    loss = (mse + vb).mean()
    loss.backward()

    expected = {
        "x_t": x_t,
        "loss": loss.detach(),
        "mse": mse.detach(),
        "vb": vb.detach(),
        "grad.output": output.grad.clone(),
    }
    params = dict(ref.named_parameters())
    for name in CHECKED_PARAMS:
        expected[f"grad.{name}"] = params[name].grad.clone()  # clip_grad_norm_ scales in place
    grad_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_GRAD_NORM)
    expected["grad_norm"] = grad_norm.detach()
    optimizer = torch.optim.AdamW(ref.parameters(), **OPTIMIZER)
    optimizer.step()
    for name, param in ref.named_parameters():
        expected[f"param.{name}"] = param.detach()
    save_file({k: v.float().contiguous() for k, v in expected.items()}, case_dir / "expected.safetensors")

    meta = {
        "description": "one Latte training step: DiT learned-sigma loss, clip_grad_norm_, AdamW",
        "seed": SEED,
        "timesteps": list(TIMESTEPS),
        "optimizer": {**OPTIMIZER, "betas": list(OPTIMIZER["betas"])},
        "max_grad_norm": MAX_GRAD_NORM,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype_of_reference": "float64",
    }
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    grads = torch.cat([p.grad.flatten() for p in ref.parameters()])
    size = sum(f.stat().st_size for f in case_dir.rglob("*") if f.is_file())
    print(
        f"train_step: {size / 1024:.1f} KiB; loss {loss.item():.6f} (mse {mse.tolist()}, vb {vb.tolist()}); "
        f"grad norm {grad_norm.item():.4g} -> {MAX_GRAD_NORM}; clipped |g| median "
        f"{grads.abs().median().item():.3g} vs eps {OPTIMIZER['eps']}"
    )


if __name__ == "__main__":
    main()
