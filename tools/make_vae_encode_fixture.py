"""The VAE encoder's reference for latte-rs: AutoencoderKL.encode on the tiny pipeline fixture.

Writes tests/fixtures/pipeline/vae_encode.safetensors (torch, diffusers as pinned in
tools/requirements.txt), computed in float64 and stored as float32:

  images   (2, 3, 16, 16) uniform in [-1, 1], seeded
  mean     latent_dist.mean of AutoencoderKL.from_pretrained(tests/fixtures/pipeline/vae)
  std      latent_dist.std

Run from the repository root (after tools/make_pipeline_fixture.py):

    .venv/bin/python tools/make_vae_encode_fixture.py
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

PIPELINE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "pipeline"
SEED = 7


def main() -> None:
    vae = AutoencoderKL.from_pretrained(PIPELINE / "vae").double().eval()
    gen = torch.Generator().manual_seed(SEED)
    images = torch.rand((2, 3, 16, 16), generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    tensors = {"images": images, "mean": dist.mean, "std": dist.std}
    save_file(
        {k: v.float().contiguous() for k, v in tensors.items()},
        str(PIPELINE / "vae_encode.safetensors"),
    )


if __name__ == "__main__":
    main()
