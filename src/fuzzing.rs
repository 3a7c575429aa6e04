//! Entry points for the fuzz targets in fuzz/ (and their regression tests): each takes
//! arbitrary bytes, runs one parser the way the engine uses it, and must return, never panic
//! or allocate by an unchecked number from the input.

use std::path::{Path, PathBuf};

use crate::config::{MergeConfig, Parameters};
use crate::data::{make_batch, parse_jsonl, TextPadding};
use crate::io::{Checkpoint, SafetensorsFile};
use crate::model::{clip::ClipVisionConfig, gpt2::Gpt2Config, ModelConfig};
use crate::regmean::stats::{self, GramFileInfo};

/// A scratch directory per process and thread (in /dev/shm when present: the targets write
/// files, and a file rewritten under another thread's memory map would fault).
pub fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let thread =
        format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    let dir = base.join(format!("regmean-fuzz-{}-{thread}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fn tiny_gpt2() -> serde_json::Value {
    serde_json::json!({"model_type": "gpt2", "vocab_size": 11, "n_positions": 8, "n_embd": 6, "n_layer": 1, "n_head": 2})
}

/// A safetensors file: open it and decode every float tensor, 2-D ones transposed too (as
/// nn.Linear weights are read), and with a shape they do not have.
pub fn safetensors_file(data: &[u8]) {
    let path = scratch().join("file.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(f) = SafetensorsFile::open(&path) {
        let tensors: Vec<(String, Vec<usize>)> = f
            .tensors()
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone()))
            .collect();
        for (n, shape) in tensors {
            let _ = f.to_f32(&n);
            let _ = f.bytes(&n);
            if let [rows, cols] = shape[..] {
                let _ = f.to_f32_transposed(&n, rows, cols);
                let _ = f.to_f32_transposed(&n, cols, rows);
            }
            let _ = f.to_f32_transposed(&n, 2, 3);
        }
    }
}

/// A `model.safetensors.index.json` beside one valid shard and a valid config.json.
pub fn shard_index(data: &[u8]) {
    let dir = scratch().join("sharded");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::remove_file(dir.join("model.safetensors"));
    let shard = dir.join("model-00001-of-00001.safetensors");
    if !shard.exists() {
        let v = [0.5f32; 6];
        let t = [crate::io::safetensors::OutTensor {
            name: "ln_f.weight".into(),
            dtype: crate::io::Dtype::F32,
            shape: vec![6],
            data: crate::io::safetensors::TensorData::F32(&v),
        }];
        let _ = crate::io::safetensors::write_file(&shard, &t, &Default::default());
        let _ = std::fs::write(dir.join("config.json"), tiny_gpt2().to_string());
    }
    if std::fs::write(dir.join("model.safetensors.index.json"), data).is_ok() {
        if let Ok(c) = Checkpoint::open(&dir) {
            let names: Vec<String> = c.names().map(str::to_string).collect();
            for n in names {
                let _ = c.f32(&n);
            }
        }
    }
}

/// config.json: both architectures' parsers, then everything derived from the sizes.
pub fn model_config(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let path = Path::new("config.json");
    let configs = [
        Gpt2Config::from_json(&v, path).map(ModelConfig::Gpt2),
        ClipVisionConfig::from_json(&v, path).map(ModelConfig::Clip),
    ];
    for c in configs.into_iter().flatten() {
        let sites = c.sites();
        let total: usize = c
            .expected_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .fold(0, usize::saturating_add);
        std::hint::black_box((sites.len(), total));
    }
}

/// The merge YAML.
pub fn merge_yaml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        // Never the network: a fuzzed `org/name` is looked up in the cache only.
        let _ = MergeConfig::parse_offline(text, Path::new("fuzz.yaml"));
    }
}

/// A Gram statistics file read for a tiny GPT-2.
pub fn gram_file(data: &[u8]) {
    let path = scratch().join("grams.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(cfg) = Gpt2Config::from_json(&tiny_gpt2(), Path::new("config.json")) else {
        return;
    };
    let sites = ModelConfig::Gpt2(cfg).sites();
    let options = Parameters::default().gram_options();
    let info = GramFileInfo {
        arch: crate::io::Arch::Gpt2,
        fingerprint: "sha256:fuzz",
        options: &options,
        sites: &sites,
    };
    let _ = stats::read(&path, &info);
}

/// JSON Lines token data, then a batch of it as both Gram modes pad it.
pub fn jsonl_data(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ds) = parse_jsonl(text, Path::new("data.jsonl")) {
        let idx: Vec<usize> = (0..ds.len().min(4)).collect();
        for to_max_length in [false, true] {
            let _ = make_batch(
                &ds,
                &idx,
                TextPadding {
                    pad_id: 0,
                    max_length: 16,
                    to_max_length,
                },
            );
        }
    }
}

/// An image file in any format (JPEG through libjpeg, PNG, WebP), decoded and preprocessed
/// as CLIPImageProcessor's defaults say; then with a small target size, which exercises the
/// resampling of every decoded size.
pub fn image_file(data: &[u8]) {
    use crate::data::image::ImageProcessor;
    let path = scratch().join("image");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = ImageProcessor::default().process_file(&path);
    if let Ok(small) = ImageProcessor::from_json(
        r#"{"size": {"shortest_edge": 7}, "crop_size": {"height": 5, "width": 5}}"#,
        Path::new("preprocessor_config.json"),
    ) {
        let _ = small.process_file(&path);
    }
}

/// A preprocessor_config.json.
pub fn preprocessor_config(data: &[u8]) {
    use crate::data::image::ImageProcessor;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = ImageProcessor::from_json(text, Path::new("preprocessor_config.json")) {
        let _ = p.output_size();
    }
}
