//! Runs cut short from outside: an input truncated by another program while the merge reads
//! it, and Ctrl-C after one output of `merge --eval --compare-average` was already written.
//! Each must end with one true line and leave no temporary output behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_mentions, bin, fixtures, Pool};

/// Polls until `ready` gives a value; kills the child and fails after 30 s.
fn wait_for<T>(child: &mut Child, what: &str, ready: impl Fn() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = ready() {
            return v;
        }
        if start.elapsed() > Duration::from_secs(30) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the run ended or timed out before {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The entries of `dir` whose names contain `part`.
fn entries_with(dir: &Path, part: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(part))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Truncates `file` to 1000 bytes (its header stays whole; its tensors are cut off).
fn truncate(file: &Path) {
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(1000)
        .unwrap();
}

/// A merge of the GPT-2 pool into many small shards, slowed down by the test hook `hook`
/// (`REGMEAN_TEST_MODEL_DELAY_MS`: each task model held open before its weights are read;
/// `REGMEAN_TEST_WRITE_DELAY_MS`: each shard held before it is flushed).
fn start_slow_merge(pool: &Pool, hook: &str, ms: u64) -> Child {
    Command::new(bin())
        .args(["merge", "-q"])
        .arg(pool.path("compat.yaml"))
        .arg(pool.path("out/merged"))
        .args(["--out-shard-size", "20KB"])
        .env(hook, ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Whether process `pid` has `file` memory-mapped now.
fn maps(pid: u32, file: &Path) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .is_ok_and(|m| m.contains(file.to_str().unwrap()))
}

/// The truncated file must be named in the one error line, the run must exit 1 (not die of
/// SIGBUS), and nothing may be left beside the output.
fn assert_reported(child: Child, pool: &Pool, file: &str) {
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{:?}: {stderr}", o.status);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_mentions(errors[0], &[file, "changed while being read"]);
    let left = names(&pool.path("out"));
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Starts a merge and calls `change` on task_a's weights while the merge holds them open at
/// their turn, before it reads them; the run must then end with the line naming the file.
fn change_task_a_at_its_turn(change: impl Fn(&Path)) {
    let pool = Pool::new();
    std::fs::create_dir(pool.path("out")).unwrap();
    let mut child = start_slow_merge(&pool, "REGMEAN_TEST_MODEL_DELAY_MS", 1500);
    let (pid, model) = (child.id(), pool.path("task_a/model.safetensors"));
    // Mapped for a moment when every input is checked, then at its turn, held by the hook:
    // changed once it has been mapped for 300 ms.
    let since = std::cell::Cell::new(None::<Instant>);
    wait_for(&mut child, "task_a was mapped at its turn", || {
        let first = maps(pid, &model).then(|| *since.get().get_or_insert_with(Instant::now));
        since.set(first);
        first.filter(|t| t.elapsed() > Duration::from_millis(300))
    });
    change(&model);
    assert_reported(child, &pool, "task_a/model.safetensors");
}

#[test]
fn a_task_model_truncated_while_the_merge_reads_it_ends_the_run_with_one_line() {
    change_task_a_at_its_turn(truncate);
}

#[test]
fn a_task_model_rewritten_in_place_while_the_merge_reads_it_ends_the_run_with_one_line() {
    // The same size, other bytes (the end of the last tensor): only the modification time
    // tells.
    change_task_a_at_its_turn(|model| {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::options().write(true).open(model).unwrap();
        f.seek(SeekFrom::End(-64)).unwrap();
        f.write_all(&[0x3f; 64]).unwrap();
    });
}

#[test]
fn the_base_model_truncated_while_the_output_is_written_ends_the_run_with_one_line() {
    let pool = Pool::new();
    std::fs::create_dir(pool.path("out")).unwrap();
    let mut child = start_slow_merge(&pool, "REGMEAN_TEST_WRITE_DELAY_MS", 300);
    // The shards are created once every task model was read; the base model is read on,
    // until the last tensor that it supplies is written.
    wait_for(&mut child, "its first shard appeared", || {
        entries_with(&pool.path("out"), ".partial-")
            .pop()
            .filter(|p| !entries_with(p, "safetensors").is_empty())
    });
    truncate(&pool.path("base/model.safetensors"));
    assert_reported(child, &pool, "base/model.safetensors");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn ctrl_c_during_the_comparison_merge_keeps_the_merged_model_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let mut child = Command::new(bin())
        .arg("merge")
        .arg(fixtures().join("eval/gpt2/merge_text.yaml"))
        .arg(&out)
        .args(["--eval", "--compare-average"])
        // Each merge holds its one shard this long before flushing it.
        .env("REGMEAN_TEST_WRITE_DELAY_MS", "1500")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The RegMean output is in place, and the averaging merge is writing in its scratch folder.
    let scratch = wait_for(&mut child, "the comparison merge started writing", || {
        let scratch = entries_with(tmp.path(), ".regmean-average-").pop()?;
        let partial = entries_with(&scratch, ".partial-").pop()?;
        (out.join("config.json").exists() && !entries_with(&partial, "safetensors").is_empty())
            .then_some(scratch)
    });
    // SAFETY: sending SIGINT to a child process this test spawned and still owns.
    assert_eq!(unsafe { libc_kill(child.id() as i32, 2) }, 0);
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("interrupted"))
        .unwrap_or_else(|| panic!("no interrupt line: {stderr}"));
    assert_mentions(
        line,
        &[
            "removed the scratch folder of the simple-average comparison",
            &scratch.display().to_string(),
            &format!("{} was already complete and is kept", out.display()),
        ],
    );
    assert!(!line.contains("nothing was written"), "{line}");
    assert_eq!(names(tmp.path()), vec!["merged".to_string()]);
    // What is kept is the whole merged model.
    let merged = regmean_gpu::io::Checkpoint::open(&out).unwrap();
    for name in merged.names() {
        merged.f32(name).unwrap_or_else(|e| panic!("{e}"));
    }
}
