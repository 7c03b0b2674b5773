//! The full pipeline against diffusers 0.42.1 / transformers 5.24.0
//! (`tools/make_pipeline_fixture.py`, references computed in float64): tokens exactly,
//! T5 embeddings after `mask_feature`, the VAE decode and a 3-step LattePipeline run
//! (latents and decoded video) from the same initial latents.
//!
//! Tolerances are relative to the reference's largest magnitude (at least 1), for f32
//! against float64:
//! - embeddings 1e-5: two T5 layers of width 32, f32 rounding ≈ 1e-7 per op, a few
//!   dozen accumulations deep;
//! - VAE decode 1e-5: a dozen convolutions of ≤ 16·9 terms and one attention (on a
//!   batch of 6 latents: candle-transformers' VAE attention is wrong for batches > 1,
//!   which `Vae::decode` avoids);
//! - pipeline latents and video 1e-4: three DDIM steps through the transformer with CFG
//!   scale 4.5, which amplifies the difference of two f32 model outputs by 2·4.5 + 1;
//! - VAE encoder 1e-4 (`tools/make_vae_encode_fixture.py`): the latent distribution's
//!   mean and standard deviation;
//! - T5 and the VAE (encoder and decoder) in bf16 5e-2 and in f16 1e-2, as the
//!   transformer's (7 and 10 mantissa bits through a dozen roundings).

use candle_core::{DType, Device, Tensor};
use latte::pipeline::PipelineDir;
use latte::sampling::{sample, SampleOptions};
use latte::text_encoder::MAX_SEQUENCE_LENGTH;
use latte::vae_encoder::{LatentDraw, VaeEncoder};
use remat::meter::NoPhases;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipeline")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

/// Largest difference relative to the reference's largest magnitude (at least 1).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let diff = max(&(a - b).unwrap()).to_scalar::<f32>().unwrap();
    diff / max(b).to_scalar::<f32>().unwrap().max(1.0)
}

#[test]
fn prompts_tokenize_and_encode_as_diffusers() {
    let pipeline = PipelineDir::open(&dir()).unwrap();
    let encoder = pipeline.text_encoder(DType::F32, &Device::Cpu).unwrap();
    let expected = expected();
    let meta = meta();
    let negative = meta["negative_prompt"].as_str().unwrap();
    for (i, case) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let tokens = encoder.tokenizer().tokenize(prompt).unwrap();
        let as_u32 = |name: &str| -> Vec<u32> {
            expected[&format!("tokens.{i}.{name}")]
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|v| v as u32)
                .collect()
        };
        assert_eq!(tokens.ids.len(), MAX_SEQUENCE_LENGTH);
        assert_eq!(tokens.ids, as_u32("ids"), "prompt {i}");
        assert_eq!(tokens.mask, as_u32("mask"), "prompt {i}");
        assert_eq!(
            tokens.truncated.as_deref(),
            case["truncated"].as_str(),
            "prompt {i}"
        );
        let embeds = encoder.encode_prompt(prompt, negative).unwrap();
        for name in ["positive", "negative"] {
            let got = if name == "positive" {
                &embeds.positive
            } else {
                &embeds.negative
            };
            let want = &expected[&format!("embeds.{i}.{name}")];
            let err = rel_diff(got, want);
            println!("prompt {i} {name}: {:?} rel err {err:.2e}", want.dims());
            assert!(err < 1e-5, "prompt {i} {name}: {err}");
        }
    }
}

#[test]
fn vae_decodes_as_diffusers() {
    let vae = PipelineDir::open(&dir())
        .unwrap()
        .vae(DType::F32, &Device::Cpu)
        .unwrap();
    let expected = expected();
    let got = vae.decode(&expected["vae.latent"]).unwrap();
    let err = rel_diff(&got, &expected["vae.decoded"]);
    println!("vae decode rel err {err:.2e}");
    assert!(err < 1e-5, "{err}");
}

#[test]
fn vae_encodes_as_diffusers() {
    let reference =
        candle_core::safetensors::load(dir().join("vae_encode.safetensors"), &Device::Cpu).unwrap();
    let images = &reference["images"];
    let encoder = VaeEncoder::open(&dir().join("vae"), DType::F32, &Device::Cpu).unwrap();
    let mut means = Vec::new();
    let mut stds = Vec::new();
    for i in 0..images.dim(0).unwrap() {
        let (mean, std) = encoder
            .distribution(&images.narrow(0, i, 1).unwrap())
            .unwrap();
        means.push(mean);
        stds.push(std);
    }
    let mean_err = rel_diff(&Tensor::cat(&means, 0).unwrap(), &reference["mean"]);
    let std_err = rel_diff(&Tensor::cat(&stds, 0).unwrap(), &reference["std"]);
    println!("vae encode: mean rel err {mean_err:.2e}, std {std_err:.2e}");
    assert!(mean_err < 1e-4 && std_err < 1e-4);
    // Latents as clips store them: the mean times the scaling factor.
    let latents = encoder.encode(images, LatentDraw::Mean).unwrap();
    let scaled = (&reference["mean"] * 0.18215).unwrap();
    assert!(rel_diff(&latents, &scaled) < 1e-4);
}

#[test]
fn vae_in_half_precision_stays_within_tolerance() {
    let reference =
        candle_core::safetensors::load(dir().join("vae_encode.safetensors"), &Device::Cpu).unwrap();
    let expected = expected();
    let pipeline = PipelineDir::open(&dir()).unwrap();
    for (dtype, tolerance) in [(DType::BF16, 5e-2), (DType::F16, 1e-2)] {
        let encoder = pipeline.vae_encoder(dtype, &Device::Cpu).unwrap();
        let image = reference["images"].narrow(0, 0, 1).unwrap();
        let (mean, _) = encoder.distribution(&image).unwrap();
        let mean = mean.to_dtype(DType::F32).unwrap();
        let encode_err = rel_diff(&mean, &reference["mean"].narrow(0, 0, 1).unwrap());
        let vae = pipeline.vae(dtype, &Device::Cpu).unwrap();
        let decoded = vae.decode(&expected["vae.latent"]).unwrap();
        let decode_err = rel_diff(&decoded, &expected["vae.decoded"]);
        println!("VAE {dtype:?}: encode rel err {encode_err:.2e}, decode {decode_err:.2e}");
        assert!(
            encode_err < tolerance && decode_err < tolerance,
            "{dtype:?}"
        );
    }
}

#[test]
fn t5_in_bf16_stays_within_tolerance() {
    let pipeline = PipelineDir::open(&dir()).unwrap();
    let encoder = pipeline.text_encoder(DType::BF16, &Device::Cpu).unwrap();
    let expected = expected();
    let meta = meta();
    let prompt = meta["prompts"][0]["prompt"].as_str().unwrap();
    let embeds = encoder.encode_prompt(prompt, "").unwrap();
    let err = rel_diff(&embeds.positive, &expected["embeds.0.positive"]);
    println!("T5 bf16: rel err {err:.2e}");
    assert!(err < 5e-2, "{err}");
}

#[test]
fn pipeline_samples_and_decodes_as_diffusers() {
    let pipeline = PipelineDir::open(&dir()).unwrap();
    let device = Device::Cpu;
    let meta = meta();
    let call = &meta["call"];
    let prompt = meta["prompts"][0]["prompt"].as_str().unwrap();
    let embeds = pipeline
        .text_encoder(DType::F32, &device)
        .unwrap()
        .encode_prompt(prompt, meta["negative_prompt"].as_str().unwrap())
        .unwrap();
    let model = pipeline
        .transformer()
        .unwrap()
        .load_frozen(DType::F32, &device)
        .unwrap();
    let expected = expected();
    let options = SampleOptions {
        steps: call["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: call["guidance_scale"].as_f64().unwrap(),
        ddim: pipeline.ddim_config().unwrap(),
        ..SampleOptions::default()
    };
    let latents = sample(
        &model,
        &expected["pipe.init_latents"],
        &embeds.negative,
        &embeds.positive,
        &options,
        None,
        &mut NoPhases,
        &mut |_| {},
    )
    .unwrap();
    let err = rel_diff(&latents, &expected["pipe.latents"]);
    println!("pipeline latents rel err {err:.2e}");
    assert!(err < 1e-4, "latents: {err}");

    let vae = pipeline.vae(DType::F32, &device).unwrap();
    let video = vae.decode_video(&latents).unwrap();
    // diffusers' "pt" output is (b, f, c, h, w); ours is (b, c, f, h, w) like the latents.
    let want = expected["pipe.video"].permute((0, 2, 1, 3, 4)).unwrap();
    let err = rel_diff(&video, &want);
    println!("pipeline video rel err {err:.2e}");
    assert!(err < 1e-4, "video: {err}");
}
