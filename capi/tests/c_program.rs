//! Builds tests/c_program.c with the system C compiler against the shared library and the
//! committed header, runs it, and checks what it printed: the Gram of its rows against an
//! f64 reference computed here from the same formula, the solve, and that every invalid
//! call was refused with a message.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where cargo put libregmean_gpu_capi.so: beside this test in target/<profile>/deps/ (a
/// test build leaves it there), else in target/<profile>/ (after `cargo build`).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let found = [deps, deps.parent().unwrap()]
        .into_iter()
        .find(|d| d.join("libregmean_gpu_capi.so").exists());
    found.unwrap_or(deps).to_path_buf()
}

/// The C program's value of batch b, row r, column c (see c_program.c).
fn value(b: i32, r: i32, c: i32) -> f64 {
    (((b * 31 + r * 7 + c * 3) % 32) - 16) as f64 / 8.0
}

#[test]
fn a_c_program_drives_the_accumulator_and_the_solve_on_the_cpu() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    assert!(
        lib.join("libregmean_gpu_capi.so").exists(),
        "no libregmean_gpu_capi.so in {}",
        lib.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let exe = tmp.path().join("c_program");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let build = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(crate_dir.join("tests/c_program.c"))
        .arg("-I")
        .arg(crate_dir.join("../include"))
        .arg(format!("-L{}", lib.display()))
        .arg("-lregmean_gpu_capi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(
        build.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the C program failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // The reference: batch 0 rows 0..6 with rows 1 and 4 masked out, batch 1 rows 0..4.
    const DIM: usize = 5;
    let rows: Vec<[f64; DIM]> = (0..6)
        .filter(|r| r % 3 != 1)
        .map(|r| (0, r))
        .chain((0..4).map(|r| (1, r)))
        .map(|(b, r)| std::array::from_fn(|c| value(b, r, c as i32)))
        .collect();
    let n = rows.len() as f64;
    let want: Vec<f64> = (0..DIM * DIM)
        .map(|k| rows.iter().map(|x| x[k / DIM] * x[k % DIM]).sum::<f64>() / n)
        .collect();

    let mut lines = stdout.lines();
    let header = lines.find(|l| l.starts_with("gram ")).expect("a gram line");
    assert_eq!(header, format!("gram {} {DIM}", rows.len()));
    let got: Vec<f64> = lines
        .by_ref()
        .take(DIM)
        .flat_map(|l| l.split_whitespace().map(|v| v.parse::<f64>().unwrap()))
        .collect();
    assert_eq!(got.len(), DIM * DIM);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "[{k}]: {g} vs {w}");
    }
    let solve = stdout.lines().find(|l| l.starts_with("solve ")).unwrap();
    let w: Vec<f64> = solve[6..]
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    for (g, want) in w.iter().zip([1.0, 2.0, 3.0, 4.0]) {
        assert!((g - want).abs() < 1e-6, "{solve}");
    }
    let checks = stdout.lines().filter(|l| l.starts_with("check ")).count();
    assert_eq!(checks, 15, "{stdout}");
    assert!(stdout.contains(&format!("version {}", env!("CARGO_PKG_VERSION"))));
}
