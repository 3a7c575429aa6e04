//! Finding the GPU without any call that could panic: the driver, cuBLAS and cuSOLVER are
//! loaded at run time, once per process, and `--device` is resolved against what was found.

use std::sync::{Mutex, OnceLock};

use cudarc::driver::CudaContext;

use super::fault;
use crate::error::{Error, Result};

/// The kernels compiled by build.rs.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// True when this binary carries compiled kernels.
pub fn kernels_embedded() -> bool {
    !kernels::MODULES.is_empty()
}

/// What `--device` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            s => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    Error::invalid(format!("--device {s}: expected auto, cpu, cuda or cuda:N"))
                }),
        }
    }
}

/// What the machine offers, found without any call that could panic.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Probe {
    pub libcuda_present: bool,
    pub cublas_present: bool,
    pub cusolver_present: bool,
    pub driver_version: Option<String>,
    pub devices: usize,
    pub kernels_embedded: bool,
}

impl Probe {
    /// Why the GPU cannot be used, or None when it can.
    pub fn unavailable_reason(&self) -> Option<String> {
        if !self.libcuda_present {
            Some("no NVIDIA driver (libcuda.so) was found".into())
        } else if self.devices == 0 {
            Some("the driver reports no CUDA device".into())
        } else if !self.kernels_embedded {
            Some("this binary was built without CUDA kernels (nvcc was missing): rebuild after `bash scripts/install_nvcc.sh`, or with NVCC set".into())
        } else if !self.cublas_present || !self.cusolver_present {
            Some("cuBLAS or cuSOLVER (libcublas.so / libcusolver.so) was not found: add the CUDA libraries to LD_LIBRARY_PATH".into())
        } else {
            None
        }
    }
}

static PROBED: OnceLock<Probe> = OnceLock::new();

/// Probes the driver, the libraries and the devices, once per process.
pub fn probe() -> Probe {
    let p = PROBED.get_or_init(probe_now);
    if p.libcuda_present {
        fault::mark_driver_loaded();
    }
    p.clone()
}

/// Loads the library cudarc loads for `names` (the same file names, in the same order) and
/// keeps it loaded for the life of the process. cudarc's own presence test unloads what it
/// found, and its loader then maps it again: with two probes per device opened, cuBLAS was
/// loaded three times (each 0.1–0.2 s).
fn load_and_keep(names: &[&str]) -> bool {
    static KEPT: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());
    for file in names
        .iter()
        .flat_map(|n| cudarc::get_lib_name_candidates(n))
    {
        // SAFETY: loading runs the library's initialisers, as cudarc's loader does with the
        // same file; no symbol is called here.
        if let Ok(lib) = unsafe { libloading::Library::new(&file) } {
            KEPT.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(lib);
            return true;
        }
    }
    false
}

fn probe_now() -> Probe {
    // cuBLAS and cuSOLVER are large (≈ 0.2 s to map and relocate): they load while the
    // driver starts up, which needs neither.
    let load_libraries = || {
        crate::profile::span("cuda: probe: load cuBLAS, cuSOLVER", || {
            (load_and_keep(&["cublas"]), load_and_keep(&["cusolver"]))
        })
    };
    // No thread to be had: the same loads, one after the other.
    let libraries = std::thread::Builder::new()
        .name("cuda-probe".into())
        .spawn(load_libraries)
        .map_err(|_| load_libraries());
    let (libcuda_present, driver_started) =
        crate::profile::span("cuda: probe: load libcuda, start it", || {
            let present = load_and_keep(&["cuda", "nvcuda"]);
            (present, present && cudarc::driver::result::init().is_ok())
        });
    let mut p = Probe {
        libcuda_present,
        cublas_present: false,
        cusolver_present: false,
        driver_version: None,
        devices: 0,
        kernels_embedded: kernels_embedded(),
    };
    if driver_started {
        let mut v = 0i32;
        // SAFETY: libcuda is loaded and initialised; the pointer is to a live i32.
        if unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            == cudarc::driver::sys::CUresult::CUDA_SUCCESS
        {
            p.driver_version = Some(format!("{}.{}", v / 1000, (v % 1000) / 10));
        }
        p.devices = CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0);
    }
    // A panic while loading (none is expected) reads as "not found", like a failed load.
    (p.cublas_present, p.cusolver_present) = match libraries {
        Ok(thread) => thread.join().unwrap_or((false, false)),
        Err(loaded_here) => loaded_here,
    };
    p
}
