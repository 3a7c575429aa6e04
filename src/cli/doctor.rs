//! `doctor`: what this machine offers the GPU engine, and the kernel checks, as text or JSON.

use regmean_gpu::{Error, Result};

pub fn doctor(json: bool, bench: bool) -> Result<()> {
    let say = |m: &str| {
        if !json {
            eprintln!("{m}");
        }
    };
    let r = regmean_gpu::doctor::run(bench, &say)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    } else {
        let p = &r.probe;
        let driver = p.driver_version.as_deref().unwrap_or(if p.libcuda_present {
            "unknown"
        } else {
            "libcuda.so not found"
        });
        let nvcc = if r.nvcc.is_empty() {
            "no nvcc at build time"
        } else {
            r.nvcc
        };
        println!("CUDA bindings:     {}", r.cuda_bindings);
        println!("driver:            {driver}");
        println!("devices:           {}", p.devices);
        if r.kernels_embedded {
            println!(
                "kernels embedded:  yes ({}; {nvcc})",
                r.kernel_architectures.join(", ")
            );
        } else {
            println!("kernels embedded:  no ({nvcc})");
        }
        println!(
            "cuBLAS / cuSOLVER: {} / {}",
            found(p.cublas_present),
            found(p.cusolver_present)
        );
        if let Some(dev) = &r.device {
            println!(
                "GPU:               {dev} ({})",
                r.compute_capability.as_deref().unwrap_or("?")
            );
        }
        for lib in &r.libraries {
            println!("loaded:            {lib}");
        }
        match &r.unavailable_reason {
            Some(why) => println!("cuda available:    no: {why}"),
            None => {
                let passed = r.checks.iter().filter(|c| c.pass).count();
                println!(
                    "cuda available:    yes; {passed} of {} kernel checks passed",
                    r.checks.len()
                )
            }
        }
        if bench && r.bench.is_empty() {
            println!(
                "benchmark:         not run: {}",
                r.unavailable_reason
                    .as_deref()
                    .unwrap_or("there is no GPU to benchmark")
            );
        }
    }
    if r.cuda_available && !r.all_passed {
        return Err(Error::Numerical(
            "some kernel checks failed (see above)".into(),
        ));
    }
    Ok(())
}

fn found(present: bool) -> &'static str {
    if present {
        "found"
    } else {
        "not found"
    }
}
