//! Runs cut short from outside: Ctrl-C after one output of `merge --eval --compare-average`
//! was already written. Each must end with one true line and leave no temporary output behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_mentions, bin, fixtures};

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
