//! Guided sampling: the guidance gradient against PyTorch autograd through CFG
//! (`tools/make_sampler_fixtures.py`), the objective falling under guidance, and errors.

use candle_core::{DType, Device, Tensor};
use latte::config::{latte_architecture, LatteConfig};
use latte::guide::{parse_objective, GuideError};
use latte::sampling::{guided_eval, initial_noise, sample, Guidance, SampleOptions};
use latte::weights::{fresh_trainable, frozen, ModelDir};
use remat::meter::NoPhases;
use remat::schedule::Schedule;
use std::path::PathBuf;

mod common;

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    max(&(a - b).unwrap()) / max(b)
}

#[test]
fn guidance_gradient_matches_pytorch_through_cfg() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let fx = common::load(dir.join("schedulers/guide.safetensors"));
    let model = ModelDir::open(&dir.join("video/model"))
        .unwrap()
        .load_frozen(DType::F32, &Device::Cpu)
        .unwrap();
    let meta = fx["meta"].to_vec1::<f64>().unwrap();
    let (t, w, alpha) = (meta[0] as usize, meta[1], meta[2]);
    let captions = Tensor::cat(&[&fx["negative"], &fx["positive"]], 0).unwrap();
    let objective = parse_objective("smooth", fx["x_t"].dims(), &Device::Cpu).unwrap();
    let n = remat::grads::scheduled_stages(&model.chain(true));
    for schedule in [Schedule::store_all(n), Schedule::every(n, 1)] {
        let eval = guided_eval(
            &model,
            &fx["x_t"],
            t,
            alpha,
            &captions,
            w,
            objective.as_ref(),
            &schedule,
            true,
            &mut NoPhases,
        )
        .unwrap();
        let expected_objective = fx["objective"].to_vec1::<f32>().unwrap()[0] as f64;
        let d_eps = rel_diff(&eval.eps, &fx["eps"]);
        let d_grad = rel_diff(&eval.grad_latents, &fx["grad"]);
        let d_obj = (eval.objective - expected_objective).abs() / expected_objective;
        eprintln!("eps {d_eps:.2e}, objective {d_obj:.2e}, gradient {d_grad:.2e}");
        assert!(d_eps < 1e-5 && d_obj < 1e-5 && d_grad < 1e-4);
    }
}

/// A 2-layer pixel-space model on 4 frames of 8×8.
fn small_pixel_model() -> (latte::model::Latte, LatteConfig) {
    let config = LatteConfig {
        video_length: 4,
        ..latte_architecture(2, 8, 2, 8, 3, 8)
    };
    let (_, varmap) = fresh_trainable(&config, 11, DType::F32, &Device::Cpu).unwrap();
    (frozen(&config, &varmap).unwrap(), config)
}

#[test]
fn guidance_lowers_the_objective() {
    let (model, config) = small_pixel_model();
    let dev = Device::Cpu;
    let noise = initial_noise(3, (1, 3, 4, 8, 8), &dev).unwrap();
    let positive =
        latte::random::randn(&mut latte::random::rng_for(1, "cap"), (1, 3, 8), &dev).unwrap();
    let negative = positive.zeros_like().unwrap();
    let options = SampleOptions {
        steps: 8,
        guidance_scale: 2.0,
        seed: 3,
        ..SampleOptions::default()
    };
    let objective = parse_objective("color:1,-1,-1", noise.dims(), &dev).unwrap();
    let n = remat::grads::scheduled_stages(&model.chain(true));
    let schedule = Schedule::store_all(n);
    let run = |guided: bool| {
        let guidance = Guidance {
            objective: objective.as_ref(),
            // A step of Polyak's size per guided step (see latte::sampling).
            scale: 1.0,
            steps: 2..options.steps,
            schedule: &schedule,
        };
        let latents = sample(
            &model,
            &noise,
            &negative,
            &positive,
            &options,
            guided.then_some(&guidance),
            &mut NoPhases,
            &mut |_| {},
        )
        .unwrap();
        objective
            .loss(&latents)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (plain, guided) = (run(false), run(true));
    eprintln!(
        "color objective: unguided {plain:.4}, guided {guided:.4} ({})",
        config.in_channels
    );
    assert!(
        guided < 0.5 * plain,
        "guided {guided} not clearly below unguided {plain}"
    );
}

#[test]
fn bad_objectives_are_clear_errors() {
    let dev = Device::Cpu;
    let dims = [1, 4, 3, 8, 8];
    let msg = |e: GuideError| e.to_string();
    let e = msg(parse_objective("sharp", &dims, &dev).err().unwrap());
    assert!(
        e.contains("unknown objective") && e.contains("smooth"),
        "{e}"
    );
    let e = msg(parse_objective("color:1,0,0", &dims, &dev).err().unwrap());
    assert!(e.contains("3 channels"), "{e}");
    let e = msg(parse_objective("color:1,0", &[1, 3, 3, 8, 8], &dev)
        .err()
        .unwrap());
    assert!(e.contains("R,G,B"), "{e}");
    let tmp = std::env::temp_dir().join(format!("latte-ref-{}.safetensors", std::process::id()));
    let wrong = Tensor::zeros((4, 2, 8, 8), DType::F32, &dev).unwrap();
    wrong.save_safetensors("video", &tmp).unwrap();
    let e = msg(
        parse_objective(&format!("reference:{}", tmp.display()), &dims, &dev)
            .err()
            .unwrap(),
    );
    assert!(
        e.contains("[4, 2, 8, 8]") && e.contains("[4, 3, 8, 8]"),
        "{e}"
    );
    let right = Tensor::ones((4, 3, 8, 8), DType::F32, &dev).unwrap();
    right.save_safetensors("video", &tmp).unwrap();
    let objective = parse_objective(&format!("reference:{}", tmp.display()), &dims, &dev).unwrap();
    let zero = Tensor::zeros(&dims, DType::F32, &dev).unwrap();
    assert_eq!(
        objective.loss(&zero).unwrap().to_scalar::<f32>().unwrap(),
        1.0
    );
    let e = msg(
        parse_objective("reference:/nonexistent.safetensors", &dims, &dev)
            .err()
            .unwrap(),
    );
    assert!(e.contains("cannot read /nonexistent.safetensors"), "{e}");
    std::fs::remove_file(&tmp).ok();
}
