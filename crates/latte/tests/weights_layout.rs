//! Model directories round-trip: single-file and sharded weights load to the same model,
//! and saving keeps the layout diffusers reads.

use candle_core::{DType, Device};
use latte::model::LatteInputs;
use latte::weights::{save_model_dir, save_model_dir_sharded, ModelDir, WEIGHTS_INDEX_FILE};
use std::path::PathBuf;

mod common;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latte-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn sample(dir: &ModelDir) -> Vec<f32> {
    let ins = candle_core::safetensors::load(
        common::fixture("video").join("inputs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let inputs = LatteInputs {
        hidden_states: ins["hidden_states"].clone(),
        timestep: ins["timestep"].clone(),
        encoder_hidden_states: ins["encoder_hidden_states"].clone(),
    };
    let model = dir.load_frozen(DType::F32, &Device::Cpu).unwrap();
    model
        .forward(&inputs, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn sharded_and_single_file_weights_give_the_same_model() {
    let original = ModelDir::open(&common::fixture("video").join("model")).unwrap();
    assert_eq!(original.shard_count(), 1);
    let reference = sample(&original);
    let tensors = original.tensors(DType::F32).unwrap();

    let sharded = scratch("sharded");
    save_model_dir_sharded(&sharded, original.config_file(), &tensors, DType::F32, 3).unwrap();
    assert!(sharded.join(WEIGHTS_INDEX_FILE).exists());
    let reopened = ModelDir::open(&sharded).unwrap();
    assert_eq!(reopened.shard_count(), 3);
    assert_eq!(sample(&reopened), reference);

    let single = scratch("single");
    save_model_dir(
        &single,
        reopened.config_file(),
        &reopened.tensors(DType::F32).unwrap(),
        DType::F32,
    )
    .unwrap();
    let reopened = ModelDir::open(&single).unwrap();
    assert_eq!(reopened.shard_count(), 1);
    assert_eq!(sample(&reopened), reference);
    assert_eq!(reopened.config_file(), original.config_file());

    // bf16 storage loads into an f32 model with every value rounded once to bf16: the
    // loaded weights are the originals' bf16 roundings, bit for bit, and the model sees them.
    let half = scratch("bf16");
    save_model_dir(&half, original.config_file(), &tensors, DType::BF16).unwrap();
    let reopened = ModelDir::open(&half).unwrap();
    assert!(reopened.stored_dtypes().contains_key("BF16"));
    let loaded = reopened.tensors(DType::F32).unwrap();
    assert_eq!(loaded.len(), tensors.len());
    for ((name, value), (loaded_name, loaded)) in tensors.iter().zip(&loaded) {
        assert_eq!(name, loaded_name);
        let rounded = value
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let bits = |t: &candle_core::Tensor| -> Vec<u32> {
            let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            values.into_iter().map(f32::to_bits).collect()
        };
        assert_eq!(bits(loaded), bits(&rounded), "{name}");
    }
    assert_ne!(
        sample(&reopened),
        reference,
        "the model uses the rounded weights"
    );
    for dir in [sharded, single, half] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn an_index_naming_a_missing_shard_is_an_error_naming_it() {
    let original = ModelDir::open(&common::fixture("unit_config").join("model")).unwrap();
    let dir = scratch("broken-index");
    save_model_dir_sharded(
        &dir,
        original.config_file(),
        &original.tensors(DType::F32).unwrap(),
        DType::F32,
        2,
    )
    .unwrap();
    std::fs::remove_file(dir.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let message = ModelDir::open(&dir).unwrap_err().to_string();
    assert!(
        message.contains("diffusion_pytorch_model-00002-of-00002.safetensors"),
        "{message}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
