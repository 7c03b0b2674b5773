"""A tiny random diffusers LattePipeline directory and its expected outputs.

Writes tests/fixtures/pipeline/ (torch 2.15.0, diffusers 0.42.1, transformers 5.24.0,
tokenizers 0.23.3; see tools/requirements.txt):

  model_index.json, scheduler/, transformer/, vae/   written by LattePipeline.save_pretrained
  text_encoder/   a 2-layer T5 encoder (d_model 32), re-saved in 2 shards (index.json)
  tokenizer/      tokenizer.json: a small Unigram vocabulary with T5's conventions
                  (<pad> 0, </s> 1, <unk> 2, Metaspace, "$A </s>" post-processing)
  expected.safetensors, expected.json   reference outputs (below)

The pipeline is reloaded with LattePipeline.from_pretrained (so the directory is what
diffusers reads) in float64; references are stored as float32:

  tokens.<i>.ids / .mask      tokenizer ids and attention mask (padded to 120)
  embeds.<i>.positive/.negative  encode_prompt(prompt, negative "" , mask_feature=True)
  vae.latent / vae.decoded    AutoencoderKL.decode of a fixed latent (B·F, 4, 4, 4)
  pipe.init_latents           the initial latents handed to the pipeline
  pipe.latents                LattePipeline(..., output_type="latent")
  pipe.video                  LattePipeline(..., output_type="pt"): (1, F, 3, H, W) in [0, 1]

expected.json holds the prompts, the truncation text diffusers warns about and the
pipeline call's arguments. Run from the repository root:

    .venv/bin/python tools/make_pipeline_fixture.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import tokenizers
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders, normalizers
from transformers import T5Config, T5EncoderModel, T5Tokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "pipeline"
SEED = 0

WORDS = (
    "a cat dog small cactus with happy face in the sahara desert running on beach red blue "
    "car city at night under rain slowly moving camera over mountains river sunset"
).split()

PROMPTS = [
    "A small cactus with a happy face in the Sahara desert.",
    "  Red car running in the City at night  ",
    # over-long: 130 words + "</s>" is more than 120 tokens, so diffusers truncates it
    " ".join(WORDS[i % len(WORDS)] for i in range(130)),
]
NEGATIVE = ""

CALL = dict(
    num_inference_steps=3,
    guidance_scale=4.5,
    video_length=3,
    height=8,
    width=8,
    decode_chunk_size=2,
    clean_caption=False,
)


def tokenizer_json() -> Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -2.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [("\u2581", -4.0)]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz.,"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return tok


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights randn/sqrt(fan_in); 1-D parameters (norm scales, biases) 1 or 0 plus noise."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel() if "embed" not in name and "shared" not in name else 1
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
            else:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=generator))


def main() -> None:
    g = torch.Generator().manual_seed(SEED)
    if OUT.exists():
        shutil.rmtree(OUT)
    fast = T5Tokenizer(tokenizer_object=tokenizer_json(), eos_token="</s>", unk_token="<unk>",
                       pad_token="<pad>", extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(fast), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                                 dropout_rate=0.0, layer_norm_epsilon=1e-6))
    randomise(t5, g)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8)
    randomise(vae, g)
    transformer = LatteTransformer3DModel(
        sample_size=4, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=3)
    randomise(transformer, g)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace",
                              steps_offset=0, set_alpha_to_one=True)
    LattePipeline(tokenizer=fast, text_encoder=t5, vae=vae, transformer=transformer,
                  scheduler=scheduler).save_pretrained(OUT)
    # Sharded text-encoder weights, as large T5 checkpoints ship.
    shutil.rmtree(OUT / "text_encoder")
    t5.save_pretrained(OUT / "text_encoder", max_shard_size="40KB")

    pipe = LattePipeline.from_pretrained(OUT, torch_dtype=torch.float64)
    expected: dict[str, torch.Tensor] = {}
    meta: dict = dict(torch=torch.__version__, diffusers=diffusers.__version__,
                      transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                      seed=SEED, negative_prompt=NEGATIVE, prompts=[], call=CALL)
    for i, prompt in enumerate(PROMPTS):
        text = pipe._text_preprocessing(prompt, clean_caption=False)
        inputs = pipe.tokenizer(text, padding="max_length", max_length=120, truncation=True,
                                return_attention_mask=True, add_special_tokens=True,
                                return_tensors="pt")
        untruncated = pipe.tokenizer(text, padding="longest", return_tensors="pt").input_ids
        removed = None
        if untruncated.shape[-1] >= 120 and not torch.equal(inputs.input_ids, untruncated):
            removed = pipe.tokenizer.batch_decode(untruncated[:, 119:-1])[0]
        positive, negative = pipe.encode_prompt(prompt, True, negative_prompt=NEGATIVE,
                                                clean_caption=False, mask_feature=True)
        expected[f"tokens.{i}.ids"] = inputs.input_ids[0].to(torch.int64)
        expected[f"tokens.{i}.mask"] = inputs.attention_mask[0].to(torch.int64)
        expected[f"embeds.{i}.positive"] = positive.float()
        expected[f"embeds.{i}.negative"] = negative.float()
        meta["prompts"].append(dict(prompt=prompt, truncated=removed))

    latent = torch.randn((6, 4, 4, 4), generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected["vae.latent"] = latent.float()
        expected["vae.decoded"] = pipe.vae.decode(latent).sample.float()

    init = torch.randn((1, 4, CALL["video_length"], 4, 4), generator=g, dtype=torch.float64)
    expected["pipe.init_latents"] = init.float()
    out = pipe(PROMPTS[0], negative_prompt=NEGATIVE, latents=init.clone(), output_type="latent",
               **CALL).frames
    expected["pipe.latents"] = out.float()
    video = pipe(PROMPTS[0], negative_prompt=NEGATIVE, latents=init.clone(), output_type="pt",
                 **CALL).frames
    expected["pipe.video"] = video.float()

    save_file({k: v.contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
