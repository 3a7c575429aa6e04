//! Compiles every kernels/*.cu with nvcc into a fatbin (SASS for sm_80 and sm_90, plus
//! compute_90 PTX for newer GPUs; nvcc 13.0's PTX, which a CUDA 13.0 driver accepts) and
//! embeds them in the binary through `$OUT_DIR/kernels.rs`.
//!
//! nvcc is looked for in `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, `/usr/local/cuda`, and
//! `.cuda/` (where scripts/install_nvcc.sh puts the one from the Python package index).
//! Without nvcc the build still succeeds, with a warning: the binary has no kernels and its
//! CUDA backend says so at run time. `REGMEAN_REQUIRE_CUDA=1` turns a missing nvcc or a
//! kernel that fails to compile, or spills registers, into a build error (CI sets it).
//! `REGMEAN_PTXAS_VERBOSE=1` prints ptxas' register and spill report for every kernel as
//! build warnings.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: &[&str] = &[
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=[sm_90,compute_90]",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "REGMEAN_REQUIRE_CUDA",
        "REGMEAN_PTXAS_VERBOSE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(regmean_kernels)");
    let require = env::var("REGMEAN_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let verbose = env::var("REGMEAN_PTXAS_VERBOSE").is_ok_and(|v| v == "1");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));

    let mut sources: Vec<PathBuf> = fs::read_dir(manifest.join("kernels"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();

    let nvcc = find_nvcc(&manifest);
    let Some(nvcc) = nvcc else {
        if require {
            panic!("REGMEAN_REQUIRE_CUDA=1 but nvcc was not found: run scripts/install_nvcc.sh or set NVCC");
        }
        println!("cargo:warning=nvcc not found: building without CUDA kernels (the CPU engine is unaffected; run scripts/install_nvcc.sh, or set NVCC, to embed them)");
        write_modules(&out_dir, &[], None);
        return;
    };

    let mut modules = Vec::new();
    for src in &sources {
        let stem = src
            .file_stem()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--fatbin", "-O3", "-std=c++17", "-lineinfo"])
            .args(ARCHS)
            .arg(src)
            .arg("-o")
            .arg(&fatbin);
        // ptxas' resource report is always asked for: a kernel that spills registers to
        // local memory is a performance bug worth failing CI for.
        cmd.arg("-Xptxas").arg("-v");
        let output = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("could not run {}: {e}", nvcc.display());
                if require {
                    panic!("{msg}");
                }
                println!("cargo:warning={msg}; building without CUDA kernels");
                write_modules(&out_dir, &[], None);
                return;
            }
        };
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let msg = format!("nvcc failed on {}:\n{log}", src.display());
            if require {
                panic!("{msg}");
            }
            for line in msg.lines() {
                println!("cargo:warning={line}");
            }
            println!("cargo:warning=building without CUDA kernels");
            write_modules(&out_dir, &[], None);
            return;
        }
        if verbose {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                println!("cargo:warning={stem}: {line}");
            }
        }
        let spills: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
            })
            .collect();
        if !spills.is_empty() {
            let msg = format!(
                "{}: ptxas reports register spills:\n{}",
                src.display(),
                spills.join("\n")
            );
            if require {
                panic!("{msg}");
            }
            println!("cargo:warning={}", msg.replace('\n', " | "));
        }
        modules.push((stem, fatbin));
    }
    let version = Command::new(&nvcc).arg("--version").output().ok().map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("release"))
            .collect::<String>()
    });
    write_modules(&out_dir, &modules, version.as_deref());
    if !modules.is_empty() {
        println!("cargo:rustc-cfg=regmean_kernels");
    }
}

/// `$OUT_DIR/kernels.rs`: the embedded fatbins, by module name.
fn write_modules(out_dir: &Path, modules: &[(String, PathBuf)], nvcc_version: Option<&str>) {
    let mut text = String::from(
        "/// Embedded CUDA modules: (name, fatbin).\npub const MODULES: &[(&str, &[u8])] = &[\n",
    );
    for (name, path) in modules {
        text.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    text.push_str("];\n");
    text.push_str("/// GPU architectures with SASS in the fatbins, and the PTX target.\n");
    text.push_str(
        "pub const ARCHITECTURES: &[&str] = &[\"sm_80\", \"sm_90\", \"compute_90 (PTX)\"];\n",
    );
    text.push_str(&format!(
        "/// The nvcc that compiled them.\npub const NVCC_VERSION: &str = {:?};\n",
        nvcc_version.unwrap_or("")
    ));
    fs::write(out_dir.join("kernels.rs"), text).expect("write kernels.rs");
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = env::var_os("NVCC") {
        return exe(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            if let Some(p) = exe(PathBuf::from(home).join("bin/nvcc")) {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&path).find_map(|d| exe(d.join("nvcc"))) {
            return Some(p);
        }
    }
    exe(PathBuf::from("/usr/local/cuda/bin/nvcc"))
        .or_else(|| exe(manifest.join(".cuda/site/nvidia/cu13/bin/nvcc")))
}
