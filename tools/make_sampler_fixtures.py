"""Fixtures for latte-rs' samplers and guided sampling (diffusers 0.42.1, torch 2.15.0).

Writes tests/fixtures/schedulers/:
  timesteps.json        DDIM/DDPM timestep grids for several configs
  steps.safetensors     DDIM and DDPM step results for given model outputs, samples, noise
  guide.safetensors     one guided step's gradient through CFG (LatteTransformer3DModel, f64)
Run: /root/venvs/tools/bin/python tools/make_sampler_fixtures.py
"""
import json
import pathlib

import torch
from diffusers import DDIMScheduler, DDPMScheduler, LatteTransformer3DModel
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedulers"
OUT.mkdir(parents=True, exist_ok=True)

# --- timestep grids -------------------------------------------------------------------
grids = []
for cls in ("ddim", "ddpm"):
    for spacing in ("leading", "trailing", "linspace"):
        for steps, offset in ((50, 0), (7, 1), (3, 0), (1000, 0)):
            kw = dict(timestep_spacing=spacing, steps_offset=offset)
            s = (DDIMScheduler if cls == "ddim" else DDPMScheduler)(**kw)
            s.set_timesteps(steps)
            grids.append(dict(scheduler=cls, spacing=spacing, steps=steps, steps_offset=offset,
                              timesteps=[int(t) for t in s.timesteps]))
(OUT / "timesteps.json").write_text(json.dumps(grids, indent=1))

# --- steps ----------------------------------------------------------------------------
g = torch.Generator().manual_seed(0)
shape = (1, 4, 2, 4, 4)
tensors = {}
cases = []
k = 0
for spacing, offset, alpha_one, clip, eta, steps in (
    ("leading", 0, True, True, 0.0, 50),
    ("leading", 1, False, False, 0.0, 10),
    ("trailing", 0, True, False, 0.7, 20),
    ("linspace", 0, False, True, 1.0, 25),
):
    s = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one,
                      clip_sample=clip)
    s.set_timesteps(steps)
    for t in (int(s.timesteps[0]), int(s.timesteps[len(s.timesteps) // 2]), int(s.timesteps[-1])):
        out = torch.randn(shape, generator=g)
        sample = torch.randn(shape, generator=g) * 1.5
        noise = torch.randn(shape, generator=g)
        r = s.step(out, t, sample, eta=eta, variance_noise=noise if eta > 0 else None)
        p = f"ddim.{k}."
        tensors.update({p + "model_output": out, p + "sample": sample, p + "noise": noise,
                        p + "prev_sample": r.prev_sample, p + "pred_original_sample": r.pred_original_sample})
        cases.append(dict(kind="ddim", id=k, spacing=spacing, steps_offset=offset,
                          set_alpha_to_one=alpha_one, clip_sample=clip, eta=eta, steps=steps, t=t))
        k += 1
for variance_type, clip, steps in (("fixed_small", True, 50), ("fixed_large", False, 10),
                                   ("learned_range", False, 1000), ("learned_range", True, 25)):
    s = DDPMScheduler(variance_type=variance_type, clip_sample=clip)
    s.set_timesteps(steps)
    for t in (int(s.timesteps[0]), int(s.timesteps[len(s.timesteps) // 2]), int(s.timesteps[-1])):
        channels = 8 if variance_type == "learned_range" else 4
        out = torch.randn((1, channels) + shape[2:], generator=g)
        if channels == 8:
            out[:, 4:] = out[:, 4:].tanh()
        sample = torch.randn(shape, generator=g) * 1.5
        seed = 1000 + k
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        r = s.step(out, t, sample, generator=torch.Generator().manual_seed(seed))
        p = f"ddpm.{k}."
        tensors.update({p + "model_output": out, p + "sample": sample, p + "noise": noise,
                        p + "prev_sample": r.prev_sample, p + "pred_original_sample": r.pred_original_sample})
        cases.append(dict(kind="ddpm", id=k, variance_type=variance_type, clip_sample=clip, steps=steps, t=t))
        k += 1
save_file({n: v.contiguous().float() for n, v in tensors.items()}, OUT / "steps.safetensors")
(OUT / "steps.json").write_text(json.dumps(cases, indent=1))
print(f"{len(grids)} grids, {len(cases)} step cases")

# --- one guided step's gradient through CFG ---------------------------------------------
# The `video` fixture model (2 layers, 3 frames of 8x8, 4 -> 8 channels), in float64.
model_dir = OUT.parent / "video" / "model"
model = LatteTransformer3DModel.from_pretrained(model_dir).to(torch.float64).eval()
g = torch.Generator().manual_seed(7)
x_t = torch.randn((1, 4, 3, 8, 8), generator=g, dtype=torch.float64)
positive = torch.randn((1, 5, 8), generator=g, dtype=torch.float64)
negative = torch.zeros_like(positive)
t, w = 500, 4.5
alpha = float(DDIMScheduler().alphas_cumprod[t])  # f32 value, as the sampler uses
leaf = x_t.clone().requires_grad_(True)
out = model(
    hidden_states=torch.cat([leaf, leaf]),
    timestep=torch.tensor([t, t]),
    encoder_hidden_states=torch.cat([negative, positive]),
    enable_temporal_attentions=True,
    return_dict=False,
)[0]
eps_u, eps_c = out.chunk(2)
eps = (eps_u + w * (eps_c - eps_u)).chunk(2, dim=1)[0]  # LattePipeline: CFG, then ε half
x0 = (leaf - (1 - alpha) ** 0.5 * eps) / alpha**0.5
objective = ((x0[:, :, 1:] - x0[:, :, :-1]) ** 2).mean()  # `smooth`
(grad,) = torch.autograd.grad(objective, leaf)
save_file(
    {
        "x_t": x_t.float(),
        "positive": positive.float(),
        "negative": negative.float(),
        "eps": eps.detach().float().contiguous(),
        "grad": grad.float().contiguous(),
        "objective": objective.detach().reshape(1).float(),
        "meta": torch.tensor([t, w, alpha], dtype=torch.float64),
    },
    OUT / "guide.safetensors",
)
print(f"guide: objective {objective.item():.6f}, |grad| max {grad.abs().max().item():.3e}")
