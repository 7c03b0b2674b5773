"""Proves that a transformer written by latte-rs loads in diffusers and computes the same.

Usage:
    python tools/check_diffusers_load.py RUN/checkpoint-N/transformer [--latte target/debug/latte]

Loads the directory with `LatteTransformer3DModel.from_pretrained` (failing on any
missing, unexpected or mis-shaped key), runs diffusers on random inputs in float64, runs
`latte forward` on the same inputs, and compares the two outputs (max error relative to
the largest output magnitude must be <= 1e-4, the f32 parity tolerance of the Rust tests).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import LatteTransformer3DModel
from safetensors.torch import load_file, save_file


def load_model(directory: Path) -> LatteTransformer3DModel:
    model, info = LatteTransformer3DModel.from_pretrained(directory, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"diffusers could not load {directory} cleanly: {problems}")
    return model.eval()


def random_inputs(model: LatteTransformer3DModel, seed: int) -> dict:
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    frames = cfg.video_length
    side = cfg.sample_size
    return {
        "hidden_states": torch.randn(1, cfg.in_channels, frames, side, side, generator=generator),
        "timestep": torch.tensor([500], dtype=torch.int64),
        "encoder_hidden_states": torch.randn(1, 4, cfg.caption_channels, generator=generator),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("transformer", type=Path)
    parser.add_argument("--latte", default="target/debug/latte")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model(args.transformer)
    inputs = random_inputs(model, args.seed)
    with torch.no_grad():
        expected = model.double()(
            inputs["hidden_states"].double(),
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"].double(),
        ).sample.float()

    with tempfile.TemporaryDirectory() as scratch:
        in_path, out_path = Path(scratch, "in.safetensors"), Path(scratch, "out.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(in_path))
        subprocess.run(
            [args.latte, "forward", "--model", str(args.transformer), "--inputs", str(in_path),
             "--out", str(out_path)],
            check=True,
        )
        actual = load_file(str(out_path))["sample"]

    error = ((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()
    print(f"diffusers loaded {args.transformer}: {sum(p.numel() for p in model.parameters())} "
          f"parameters; latte-rs vs diffusers relative error {error:.2e}")
    if error > 1e-4:
        sys.exit("outputs differ beyond the f32 parity tolerance")


if __name__ == "__main__":
    main()
