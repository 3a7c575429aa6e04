//! Hub ids in merge configs, resolved from a Hugging Face cache fabricated in a temporary
//! directory (huggingface_hub's layout: `refs/<branch>` → commit, `snapshots/<commit>/` of
//! links to `../../blobs/<hash>`), with `HF_HUB_OFFLINE=1`: no test touches the network.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_mentions, bin, fixtures};
use regmean_gpu::config::MergeConfig;

/// Puts the files of `model` into `cache` as repository `repo` at `commit`, named by
/// `refs/<branch>`.
fn cache_model(cache: &Path, repo: &str, model: &Path, branch: &str, commit: &str) {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs").join(branch), commit).unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let file = entry.unwrap().path();
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        // Blobs are named by their content's hash in the real cache; any unique name will do.
        let blob = format!("{commit}-{name}.blob");
        std::fs::copy(&file, dir.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(&name)).unwrap();
    }
}

fn pool_config(base: &str, models: [&str; 3]) -> String {
    let data = fixtures().join("gpt2_pool/data");
    let entries: String = models
        .iter()
        .zip(["task_a", "task_b", "task_c"])
        .map(|(m, task)| {
            format!(
                "- model: {m}\n  data: {}\n",
                data.join(format!("{task}.jsonl")).display()
            )
        })
        .collect();
    format!(
        "merge_method: regmean\nbase_model: {base}\nmodels:\n{entries}parameters:\n  num_regmean_examples: 10\n  batch_size: 4\n  reduce_non_diagonal_ratio: 0.6\n  max_length: 24\n  shuffle: false\nout_dtype: float32\n"
    )
}

fn merge_offline(config: &Path, out: &Path, cache: &Path) -> Output {
    Command::new(bin())
        .args(["-q", "merge"])
        .arg(config)
        .arg(out)
        .args(["--device", "cpu"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A cache holding the GPT-2 test pool as `test-org/...` (task_b at a tag), and a work dir.
fn cached_pool() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let pool = fixtures().join("gpt2_pool");
    cache_model(
        &cache,
        "test-org/gpt2-base",
        &pool.join("base"),
        "main",
        "c0ffee01",
    );
    cache_model(
        &cache,
        "test-org/task_a",
        &pool.join("task_a"),
        "main",
        "a1a1a1a1",
    );
    cache_model(
        &cache,
        "test-org/task_b",
        &pool.join("task_b"),
        "v1",
        "b2b2b2b2",
    );
    cache_model(
        &cache,
        "test-org/task_c",
        &pool.join("task_c"),
        "main",
        "c3c3c3c3",
    );
    (tmp, cache)
}

#[test]
fn a_merge_naming_hub_ids_equals_the_merge_of_the_local_directories() {
    let (tmp, cache) = cached_pool();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let hub_cfg = work.join("hub.yaml");
    std::fs::write(
        &hub_cfg,
        pool_config(
            "test-org/gpt2-base",
            [
                "test-org/task_a",
                "test-org/task_b@v1",
                "test-org/task_c@c3c3c3c3",
            ],
        ),
    )
    .unwrap();
    let pool = fixtures().join("gpt2_pool");
    let local_cfg = work.join("local.yaml");
    let local = |m: &str| pool.join(m).display().to_string();
    let models = [local("task_a"), local("task_b"), local("task_c")];
    std::fs::write(
        &local_cfg,
        pool_config(&local("base"), [&models[0], &models[1], &models[2]]),
    )
    .unwrap();

    let (from_hub, from_dirs) = (work.join("from_hub"), work.join("from_dirs"));
    let o = merge_offline(&hub_cfg, &from_hub, &cache);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = merge_offline(&local_cfg, &from_dirs, &cache);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        read(&from_hub) == read(&from_dirs),
        "the merged tensors differ"
    );
    // The model card names the hub ids, not the snapshot folders' commits.
    let card = std::fs::read_to_string(from_hub.join("README.md")).unwrap();
    assert_mentions(&card, &["test-org/gpt2-base", "test-org/task_b@v1"]);
    assert!(!card.contains("b2b2b2b2"), "{card}");

    // The cache is an input: an output inside a repository's cache folder is refused.
    let inside = cache.join("models--test-org--task_a/merged");
    let o = merge_offline(&hub_cfg, &inside, &cache);
    assert!(!o.status.success());
    assert_mentions(&stderr(&o), &["refusing to write here", "test-org/task_a"]);
    assert!(!inside.exists());
}

#[test]
fn a_hub_id_missing_offline_is_one_line_naming_it_and_the_cache() {
    let (tmp, cache) = cached_pool();
    let cfg = tmp.path().join("merge.yaml");
    std::fs::write(
        &cfg,
        pool_config(
            "test-org/gpt2-base",
            [
                "test-org/task_a",
                "test-org/not-there",
                "test-org/task_b@v2",
            ],
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = merge_offline(&cfg, &out, &cache);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_mentions(
        &err,
        &[
            "models[1].model",
            "test-org/not-there",
            "HF_HUB_OFFLINE",
            &cache
                .join("models--test-org--not-there")
                .display()
                .to_string(),
        ],
    );
    assert!(!out.exists());
    // A revision the cache does not have is missing too.
    std::fs::write(
        &cfg,
        pool_config(
            "test-org/gpt2-base",
            ["test-org/task_a", "test-org/task_b@v2", "test-org/task_c"],
        ),
    )
    .unwrap();
    let err = stderr(&merge_offline(&cfg, &out, &cache));
    assert_mentions(&err, &["test-org/task_b", "revision v2"]);
}

#[test]
fn a_local_directory_of_the_same_name_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("test-org/gpt2-base");
    std::fs::create_dir_all(&local).unwrap();
    let cfg = tmp.path().join("merge.yaml");
    std::fs::write(
        &cfg,
        pool_config(
            "test-org/gpt2-base",
            ["./a", "b", &tmp.path().join("c").display().to_string()],
        ),
    )
    .unwrap();
    // No cache is consulted for a local directory (nor for paths that are not ids).
    let cfg = MergeConfig::load(&cfg).unwrap();
    assert_eq!(cfg.base_model, local);
    assert!(cfg.hub_models.is_empty());
    assert_eq!(cfg.models[1].model, tmp.path().join("b"));
}
