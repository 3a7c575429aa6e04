//! The C ABI's CUDA path (a caller's stream, device rows and mask, finish to the host and
//! into a device buffer) against its CPU path on the same rows. It needs an NVIDIA GPU, so
//! `cargo test` reports it as ignored; `scripts/gpu_check.sh` runs it (from the bundle that
//! `scripts/gpu_bundle.sh` builds) with `REGMEAN_REQUIRE_GPU=1`, under which a missing GPU
//! fails it instead of skipping it.

use std::ffi::c_void;

use cudarc::driver::{CudaContext, DevicePtr};
use regmean_gpu::compare::rel_err;
use regmean_gpu_capi::*;

const DIM: usize = 64;
const STRIDE: usize = 72;
const ROWS: usize = 100;

/// The Gram of `x` (f32 rows, with `mask`) through the CPU accumulator of the ABI.
fn cpu_gram(x: &[f32], mask: &[u8]) -> Vec<f32> {
    let mut g = std::ptr::null_mut();
    assert_eq!(regmean_gram_create_cpu(DIM, 0, &mut g), RegmeanStatus::Ok);
    let s = regmean_gram_update_host(
        g,
        x.as_ptr().cast(),
        REGMEAN_DTYPE_F32,
        ROWS,
        STRIDE,
        mask.as_ptr(),
    );
    assert_eq!(s, RegmeanStatus::Ok);
    let mut out = vec![0.0f32; DIM * DIM];
    let s = regmean_gram_finish(g, out.as_mut_ptr(), out.len(), std::ptr::null_mut());
    assert_eq!(s, RegmeanStatus::Ok);
    regmean_gram_destroy(g);
    out
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn the_c_abi_on_a_callers_stream_matches_its_cpu_path() {
    if let Some(why) = regmean_gpu::backend::cuda::probe().unavailable_reason() {
        if std::env::var("REGMEAN_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("REGMEAN_REQUIRE_GPU=1 but no GPU can be used: {why}");
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the_c_abi_on_a_callers_stream_matches_its_cpu_path: {why}"
        );
        return;
    }
    let x: Vec<f32> = (0..ROWS * STRIDE)
        .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
        .collect();
    let mask: Vec<u8> = (0..ROWS).map(|r| (r % 4 != 3) as u8).collect();
    let want = cpu_gram(&x, &mask);

    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let (dx, dmask) = (
        stream.clone_htod(&x).unwrap(),
        stream.clone_htod(&mask).unwrap(),
    );
    let mut dout = stream.alloc_zeros::<f32>(DIM * DIM).unwrap();
    let (px, _sx) = dx.device_ptr(&stream);
    let (pm, _sm) = dmask.device_ptr(&stream);
    let raw_stream = stream.cu_stream() as *mut c_void;
    for to_device in [false, true] {
        let mut g = std::ptr::null_mut();
        let s = regmean_gram_create_cuda(0, raw_stream, DIM, 0, &mut g);
        assert_eq!(s, RegmeanStatus::Ok, "{:?}", message(g));
        let s = regmean_gram_update_device(
            g,
            px as *const c_void,
            REGMEAN_DTYPE_F32,
            ROWS,
            STRIDE,
            pm as *const u8,
        );
        assert_eq!(s, RegmeanStatus::Ok, "{:?}", message(g));
        let mut rows = 0u64;
        let got = if to_device {
            // The guard (cudarc's stream ordering) ends here: the ABI orders the copy itself.
            let po = {
                use cudarc::driver::DevicePtrMut;
                let (p, _guard) = dout.device_ptr_mut(&stream);
                p
            };
            let s = regmean_gram_finish_device(g, po as *mut c_void, DIM * DIM, &mut rows);
            assert_eq!(s, RegmeanStatus::Ok, "{:?}", message(g));
            stream.synchronize().unwrap();
            stream.clone_dtoh(&dout).unwrap()
        } else {
            let mut out = vec![0.0f32; DIM * DIM];
            let s = regmean_gram_finish(g, out.as_mut_ptr(), out.len(), &mut rows);
            assert_eq!(s, RegmeanStatus::Ok, "{:?}", message(g));
            out
        };
        regmean_gram_destroy(g);
        assert_eq!(rows, mask.iter().filter(|&&m| m != 0).count() as u64);
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "to_device {to_device}: {e:.2e}");
    }
}

fn message(g: *const RegmeanGram) -> String {
    // SAFETY: the ABI returns a NUL-terminated string that lives until the next call.
    unsafe { std::ffi::CStr::from_ptr(regmean_error_message(g)) }
        .to_string_lossy()
        .into_owned()
}
