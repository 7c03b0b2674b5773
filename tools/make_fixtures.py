"""Generate golden fixtures for latte-rs from diffusers' ``LatteTransformer3DModel``.

For every entry of ``CASES`` this script writes ``<out>/<case>/``:

* ``model/config.json``, ``model/diffusion_pytorch_model.safetensors``
    A small, fully randomised float32 model, written by ``save_pretrained``.
* ``inputs.safetensors``
    ``hidden_states`` f32 (B, C, F, H, W), ``timestep`` i64 (B,),
    ``encoder_hidden_states`` f32 (B, L, caption_channels) and
    ``grad_sample`` f32 (B, out_channels, F, H, W), the cotangent of the output.
* ``expected.safetensors``
    Computed with the model and inputs cast to float64 and stored as float32:
    ``sample`` (the forward output) and the vector-Jacobian product of
    ``(sample * grad_sample).sum()``: ``grad.hidden_states``,
    ``grad.encoder_hidden_states`` and ``grad.<name>`` for every parameter of
    ``model.named_parameters()`` (zeros for parameters the case does not use).
* ``meta.json``
    Case name, description, ``enable_temporal_attentions``, seed, the torch and
    diffusers versions and the dtype of the reference computation.

Everything is seeded, so re-running reproduces the same files.

Usage (from the repository root, with ``tools/requirements.txt`` installed)::

    python tools/make_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import LatteTransformer3DModel
from safetensors.torch import save_file

# diffusers' own unit-test configuration for LatteTransformer3DModel.
BASE_CONFIG = {
    "sample_size": 8,
    "num_layers": 1,
    "patch_size": 2,
    "attention_head_dim": 4,
    "num_attention_heads": 2,
    "caption_channels": 8,
    "in_channels": 4,
    "cross_attention_dim": 8,
    "out_channels": 8,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
}

# Standard deviation of the random biases; weights use 1/sqrt(fan_in) and the
# scale-shift tables randn/sqrt(dim), as diffusers itself initialises them.
BIAS_STD = 0.3


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    seed: int
    batch: int
    frames: int
    height: int
    width: int
    caption_len: int
    timesteps: tuple[int, ...]
    enable_temporal_attentions: bool = True
    config: dict = field(default_factory=dict)  # overrides of BASE_CONFIG


CASES = (
    Case(
        name="unit_config",
        description="diffusers' unit-test config and input shape: one frame "
        "(no temporal position embedding), default video_length 16.",
        seed=0,
        batch=2,
        frames=1,
        height=8,
        width=8,
        caption_len=8,
        timesteps=(1, 999),
    ),
    Case(
        name="video",
        description="Two layers, three frames equal to video_length 3, so the "
        "temporal position embedding is added before the first temporal block.",
        seed=1,
        batch=1,
        frames=3,
        height=8,
        width=8,
        caption_len=5,
        timesteps=(250,),
        config={"num_layers": 2, "video_length": 3},
    ),
    Case(
        name="resized",
        description="Non-square input (6x10) differing from sample_size 8, so "
        "the 2D position embedding is recomputed for a 3x5 patch grid.",
        seed=2,
        batch=2,
        frames=2,
        height=6,
        width=10,
        caption_len=7,
        timesteps=(37, 640),
        config={"video_length": 2},
    ),
    Case(
        name="no_temporal",
        description="enable_temporal_attentions=False with 4 frames while "
        "video_length is 2; temporal blocks are unused (zero gradients).",
        seed=3,
        batch=1,
        frames=4,
        height=8,
        width=8,
        caption_len=4,
        timesteps=(999,),
        enable_temporal_attentions=False,
        config={"video_length": 2},
    ),
    Case(
        name="batch",
        description="Three batch elements with different timesteps, two "
        "frames equal to video_length 2, two layers, caption length 6.",
        seed=4,
        batch=3,
        frames=2,
        height=8,
        width=8,
        caption_len=6,
        timesteps=(0, 500, 999),
        config={"num_layers": 2, "video_length": 2},
    ),
)


def build_model(case: Case, gen: torch.Generator) -> LatteTransformer3DModel:
    """Construct the float32 model of a case and randomise every parameter."""
    model = LatteTransformer3DModel(**{**BASE_CONFIG, **case.config})
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.endswith("scale_shift_table"):
                std = 1.0 / math.sqrt(param.shape[-1])
            elif param.ndim >= 2:
                std = 1.0 / math.sqrt(param[0].numel())  # fan-in
            else:
                std = BIAS_STD
            param.copy_(noise * std)
    return model.eval()


def make_inputs(case: Case, model: LatteTransformer3DModel, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random-normal inputs and output cotangent for a case."""
    cfg = model.config
    video = (case.frames, case.height, case.width)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    return {
        "hidden_states": randn(case.batch, cfg.in_channels, *video),
        "timestep": torch.tensor(case.timesteps, dtype=torch.int64),
        "encoder_hidden_states": randn(case.batch, case.caption_len, cfg.caption_channels),
        "grad_sample": randn(case.batch, cfg.out_channels, *video),
    }


def compute_expected(
    model: LatteTransformer3DModel, inputs: dict[str, torch.Tensor], enable_temporal_attentions: bool
) -> dict[str, torch.Tensor]:
    """Forward output and VJP of ``(sample * grad_sample).sum()``, in float64, returned as float32."""
    ref = copy.deepcopy(model).double()
    hidden_states = inputs["hidden_states"].double().requires_grad_(True)
    encoder_hidden_states = inputs["encoder_hidden_states"].double().requires_grad_(True)

    sample = ref(
        hidden_states,
        timestep=inputs["timestep"],
        encoder_hidden_states=encoder_hidden_states,
        enable_temporal_attentions=enable_temporal_attentions,
    ).sample
    (sample * inputs["grad_sample"].double()).sum().backward()

    expected = {
        "sample": sample.detach(),
        "grad.hidden_states": hidden_states.grad,
        "grad.encoder_hidden_states": encoder_hidden_states.grad,
    }
    for name, param in ref.named_parameters():
        expected[f"grad.{name}"] = param.grad if param.grad is not None else torch.zeros_like(param)
    return {key: value.float().contiguous() for key, value in expected.items()}


def write_case(case: Case, out_dir: Path) -> None:
    """Write the model, inputs, expected outputs and metadata of one case."""
    case_dir = out_dir / case.name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)

    torch.manual_seed(case.seed)  # construction draws from the global RNG
    gen = torch.Generator().manual_seed(case.seed)
    model = build_model(case, gen)
    inputs = make_inputs(case, model, gen)

    model.save_pretrained(case_dir / "model", safe_serialization=True)
    save_file(inputs, case_dir / "inputs.safetensors")
    save_file(compute_expected(model, inputs, case.enable_temporal_attentions), case_dir / "expected.safetensors")

    meta = {
        "case": case.name,
        "description": case.description,
        "enable_temporal_attentions": case.enable_temporal_attentions,
        "seed": case.seed,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype_of_reference": "float64",
    }
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="output directory")
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    for case in CASES:
        write_case(case, args.out)
        size = sum(f.stat().st_size for f in (args.out / case.name).rglob("*") if f.is_file())
        print(f"{case.name}: {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
