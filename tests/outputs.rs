//! Outputs never touch inputs, and two runs never share an output: `--force` into any input
//! of a run is refused with the inputs left byte for byte as they were (symlinks and `..`
//! resolved), and of two merges into one output exactly one succeeds.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, Pool};

/// Every file under `dir` with its bytes (symlinks as their targets' paths).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
            if t.is_symlink() {
                let target = std::fs::read_link(e.path()).unwrap();
                files.insert(rel, target.to_string_lossy().as_bytes().to_vec());
            } else if t.is_dir() {
                stack.push(e.path());
            } else {
                files.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    files
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// The command failed with one `error:` line that mentions every one of `words`.
fn assert_refused(o: &std::process::Output, words: &[&str], what: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: expected a refusal: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{what}: one error line expected: {stderr}");
    for w in words {
        assert!(errors[0].contains(w), "{what}: `{w}` not in: {}", errors[0]);
    }
}

#[test]
fn force_into_any_input_is_refused_and_the_inputs_stay_byte_identical() {
    let pool = Pool::new();
    let root = pool.dir.path();
    // A config with every kind of input: Gram file, eval data, and a symlinked model.
    let grams = pool.path("task_c.grams.safetensors");
    let o = run(&[
        "grams",
        "-q",
        "--model",
        pool.path("task_c").to_str().unwrap(),
        "--data",
        pool.path("data/task_c.jsonl").to_str().unwrap(),
        "--config",
        pool.path("compat.yaml").to_str().unwrap(),
        "-o",
        grams.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::os::unix::fs::symlink(pool.path("task_b"), pool.path("task_b_link")).unwrap();
    std::fs::write(
        pool.path("data/task_a.eval.jsonl"),
        "{\"text\": \"x\", \"label\": 0}\n",
    )
    .unwrap();
    let cfg = std::fs::read_to_string(pool.path("compat.yaml"))
        .unwrap()
        .replace(
            "  data: ./data/task_a.jsonl",
            "  data: ./data/task_a.jsonl\n  eval_data: ./data/task_a.eval.jsonl",
        )
        .replace("- model: ./task_b", "- model: ./task_b_link")
        .replace(
            "  data: ./data/task_c.jsonl",
            "  grams: ./task_c.grams.safetensors",
        );
    std::fs::write(pool.path("all.yaml"), cfg).unwrap();
    let before = snapshot(root);

    let config = pool.path("all.yaml");
    let cases: &[(&str, &str)] = &[
        ("all.yaml", "is"),
        (".", "contains"),
        ("base", "is"),
        ("task_a", "is"),
        ("task_b", "is"),
        ("task_b_link", "is"),
        ("task_b_link/merged", "lies inside"),
        ("task_a/merged", "lies inside"),
        ("task_a/../task_a", "is"),
        ("data", "contains"),
        ("data/task_a.jsonl", "is"),
        ("data/task_a.eval.jsonl", "is"),
        ("task_c.grams.safetensors", "is"),
        ("base/tokenizer.json", "lies inside"),
    ];
    for (out, how) in cases {
        let target = root.join(out);
        let o = run(&[
            "merge",
            config.to_str().unwrap(),
            target.to_str().unwrap(),
            "--force",
        ]);
        assert_refused(&o, &[how, "an input of this run"], out);
        assert_eq!(snapshot(root), before, "{out}: an input changed");
    }
    // A symlink planted where the output goes, pointing at an input.
    std::os::unix::fs::symlink(pool.path("task_a"), pool.path("out_link")).unwrap();
    let o = run(&[
        "merge",
        config.to_str().unwrap(),
        pool.path("out_link").to_str().unwrap(),
        "--force",
    ]);
    assert_refused(&o, &["task_a", "an input of this run"], "out_link");
    std::fs::remove_file(pool.path("out_link")).unwrap();
    assert_eq!(snapshot(root), before, "out_link: an input changed");

    // The other commands that write obey the same rule.
    let grams_args = |out: &Path| {
        run(&[
            "grams",
            "--model",
            pool.path("task_a").to_str().unwrap(),
            "--data",
            pool.path("data/task_a.jsonl").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--force",
        ])
    };
    for out in ["task_a/model.safetensors", "data/task_a.jsonl", "all.yaml"] {
        assert_refused(&grams_args(&root.join(out)), &["an input of this run"], out);
    }
    let o = run(&[
        "forward",
        pool.path("task_a").to_str().unwrap(),
        pool.path("data/task_a.jsonl").to_str().unwrap(),
        "-o",
        pool.path("task_a/model.safetensors").to_str().unwrap(),
        "--force",
    ]);
    assert_refused(&o, &["an input of this run"], "forward -o");
    let o = run(&[
        "merge",
        config.to_str().unwrap(),
        pool.path("merged").to_str().unwrap(),
        "--report-json",
        pool.path("data/task_a.jsonl").to_str().unwrap(),
    ]);
    assert_refused(&o, &["an input of this run"], "--report-json");
    assert!(!pool.path("merged").exists());
    assert_eq!(snapshot(root), before, "an input changed");

    // Beside the inputs is fine, and --force then replaces that earlier output.
    for _ in 0..2 {
        let o = run(&[
            "merge",
            "-q",
            config.to_str().unwrap(),
            pool.path("merged").to_str().unwrap(),
            "--force",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn force_replaces_an_earlier_output_but_not_a_folder_of_other_files() {
    let pool = Pool::new();
    let notes = pool.path("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("mine.txt"), "keep me").unwrap();
    let o = pool.merge("compat.yaml", &notes, &["--force"]);
    assert_refused(&o, &["only an earlier output"], "notes");
    assert_eq!(
        std::fs::read_to_string(notes.join("mine.txt")).unwrap(),
        "keep me"
    );
}

/// Waits until the merge `child` has staged its output under `parent`.
fn wait_for_partial(parent: &Path, child: &mut std::process::Child) {
    let start = std::time::Instant::now();
    while !std::fs::read_dir(parent).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().contains(".partial-")))
    }) {
        if start.elapsed() > std::time::Duration::from_secs(30)
            || child.try_wait().unwrap().is_some()
        {
            let _ = child.kill();
            panic!("the first merge never staged its output");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn of_two_merges_into_one_output_exactly_one_succeeds_and_its_files_are_intact() {
    let pool = Pool::new();
    // Two different merges of the same pool, and what each writes on its own.
    let reference = |config: &str| {
        let out = pool.path(&format!("ref_{config}"));
        let o = pool.merge(config, &out, &["-q", "--out-shard-size", "20KB"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        snapshot(&out)
    };
    let (ref_compat, ref_default) = (reference("compat.yaml"), reference("default.yaml"));
    assert_ne!(ref_compat, ref_default);
    for force in [false, true] {
        let out = pool.path("out/merged");
        let extra: &[&str] = if force { &["--force"] } else { &[] };
        if force {
            // An earlier output, which must survive whole until one new one replaces it.
            let o = pool.merge("compat.yaml", &out, &["-q", "--force"]);
            assert!(o.status.success());
        }
        // Its writing slowed down, so that the second merge starts while it runs.
        let shards = [&["--out-shard-size", "20KB"][..], extra].concat();
        let mut a = pool.spawn_slow_merge("compat.yaml", &out, &shards, 50);
        wait_for_partial(&pool.path("out"), &mut a);
        let b = Command::new(bin())
            .arg("merge")
            .arg(pool.path("default.yaml"))
            .arg(&out)
            .args(["--out-shard-size", "20KB"])
            .args(extra)
            .output()
            .unwrap();
        let a_status = a.wait().unwrap();
        let mut a_err = String::new();
        std::io::Read::read_to_string(a.stderr.as_mut().unwrap(), &mut a_err).unwrap();
        let b_err = String::from_utf8_lossy(&b.stderr);
        assert!(
            a_status.success() != b.status.success(),
            "force={force}: exactly one must succeed: a {a_status:?} {a_err}; b {:?} {b_err}",
            b.status
        );
        let (winner, loser_err) = if a_status.success() {
            (&ref_compat, b_err.to_string())
        } else {
            (&ref_default, a_err)
        };
        let errors: Vec<&str> = loser_err
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{loser_err}");
        assert!(
            errors[0].contains("another run") && errors[0].contains("merged"),
            "{}",
            errors[0]
        );
        let got = snapshot(&out);
        // The model card names the output directory it was merged into: compare the tensors.
        let tensors = |s: &BTreeMap<PathBuf, Vec<u8>>| {
            s.iter()
                .filter(|(p, _)| p.to_string_lossy().contains("safetensors"))
                .map(|(p, b)| (p.clone(), b.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            tensors(&got),
            tensors(winner),
            "force={force}: the winner's files"
        );
        let left: Vec<String> = std::fs::read_dir(pool.path("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            vec!["merged".to_string()],
            "force={force}: left behind"
        );
    }
}
