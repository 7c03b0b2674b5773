"""LoRA fixtures for latte-rs from PEFT on diffusers' ``LatteTransformer3DModel``.

Writes ``<out>/`` (default ``tests/fixtures/lora``), on the model and inputs of the
``batch`` case of ``make_fixtures.py`` (``tests/fixtures/batch/``):

* ``adapter/``
    An adapter written by PEFT's ``save_pretrained`` (``adapter_config.json``,
    ``adapter_model.safetensors``): rank 4, ``lora_alpha`` 8, on every kind of linear
    layer latte-rs runs differently (the stacked self-attention projections, the gated
    output projections, the feed-forward's GELU input and gated output, cross-attention,
    the timestep and caption embedders, the output projection), with rank 2 and alpha 1
    on ``ff.net.2`` (``rank_pattern``, ``alpha_pattern``). Its ``B`` factors are random
    (PEFT starts them at zero; standard deviation 0.1 for both factors, an update of the
    order of the base weights), so that the update is not the identity.
* ``expected.safetensors``
    In float64, stored as float32: ``sample``, the output of
    ``PeftModel(model, adapter)``; ``grad.hidden_states`` and ``grad.<module>.lora_A.weight``
    / ``grad.<module>.lora_B.weight``, the vector-Jacobian product of
    ``(sample * grad_sample).sum()`` w.r.t. the latents and every adapter factor; and
    ``merged.sample``, the output of ``merge_and_unload()``'s model.
* ``latte_adapter/`` and ``latte_expected.safetensors`` (with ``--latte-adapter DIR``)
    An adapter that latte-rs trained, copied, and the ``sample`` that PEFT computes with it
    (``PeftModel.from_pretrained(base, DIR)``), for latte-rs to compare its own output
    against. Make it with::

        latte train --model tests/fixtures/batch/model --lora 4 --lora-targets \
            to_q,to_k,to_v,to_out.0,ff.net.2 --steps 20 --warmup 0 --lr 1e-2 --batch 1 \
            --save-every 0 --out /tmp/lora-run
        python tools/make_lora_fixture.py --latte-adapter /tmp/lora-run/checkpoint-20/adapter

* ``meta.json``: seed and package versions.

Usage (from the repository root, ``tools/requirements.txt`` installed)::

    python tools/make_lora_fixture.py [--out tests/fixtures/lora] [--latte-adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import diffusers
import peft
import torch
from diffusers import LatteTransformer3DModel
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

SEED = 25
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_out",
    "linear_1",
]
FACTOR_STD = 0.1


def load_case(fixtures: Path):
    model = LatteTransformer3DModel.from_pretrained(fixtures / "batch" / "model")
    inputs = load_file(str(fixtures / "batch" / "inputs.safetensors"))
    meta = json.loads((fixtures / "batch" / "meta.json").read_text())
    return model, inputs, meta["enable_temporal_attentions"]


def run(model, inputs, temporal: bool, grads: bool):
    """`sample`, and with `grads` the VJP w.r.t. the latents and every trainable tensor."""
    hidden = inputs["hidden_states"].double().requires_grad_(grads)
    sample = model(
        hidden,
        timestep=inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"].double(),
        enable_temporal_attentions=temporal,
    ).sample
    if not grads:
        return sample.detach(), {}
    (sample * inputs["grad_sample"].double()).sum().backward()
    out = {"grad.hidden_states": hidden.grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # base_model.model.<module>.lora_A.default.weight -> <module>.lora_A.weight
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            out[f"grad.{key}"] = p.grad
    return sample.detach(), out


def make_adapter(out: Path, fixtures: Path) -> None:
    model, inputs, temporal = load_case(fixtures)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={"ff.net.2": 2},
        alpha_pattern={"ff.net.2": 1},
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * FACTOR_STD)
    adapter_dir = out / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / "README.md").unlink()  # a model card template, not needed

    reference = peft_model.double()
    sample, grads = run(reference, inputs, temporal, grads=True)
    merged = reference.merge_and_unload()
    merged_sample, _ = run(merged, inputs, temporal, grads=False)
    tensors = {"sample": sample, "merged.sample": merged_sample, **grads}
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))
    meta = {
        "base": "tests/fixtures/batch/model",
        "inputs": "tests/fixtures/batch/inputs.safetensors",
        "seed": SEED,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "dtype_of_reference": "float64",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def check_latte_adapter(out: Path, fixtures: Path, adapter: Path) -> None:
    target = out / "latte_adapter"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(adapter, target)
    # The run recorded the base by absolute path; the fixture names it in the repository.
    config_file = target / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "tests/fixtures/batch/model"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    model, inputs, temporal = load_case(fixtures)
    peft_model = PeftModel.from_pretrained(model, target).double()
    sample, _ = run(peft_model, inputs, temporal, grads=False)
    save_file({"sample": sample.float().contiguous()}, str(out / "latte_expected.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/lora"))
    parser.add_argument("--fixtures", type=Path, default=Path("tests/fixtures"))
    parser.add_argument("--latte-adapter", type=Path, help="an adapter latte-rs wrote")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.latte_adapter is None:
        make_adapter(args.out, args.fixtures)
    else:
        check_latte_adapter(args.out, args.fixtures, args.latte_adapter)


if __name__ == "__main__":
    main()
