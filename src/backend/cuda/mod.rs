//! The CUDA side: device selection and probing, the embedded kernels (loaded lazily), and
//! the device pieces of RegMean — Gram accumulation on tensor cores ([`gram`]) and the
//! per-layer Cholesky solve with cuSOLVER ([`solve`]), and the model forward pass
//! ([`forward`]: the [`crate::backend::Backend`] on a GPU). The Gram and solve types are
//! also the library API for CUDA pipelines that own their activations.
//!
//! Everything here loads the CUDA libraries at run time (cudarc's dynamic loading): a binary
//! built anywhere runs everywhere, and touches libcuda only after [`probe`] found it.

pub mod fault;
pub mod forward;
pub mod gram;
pub mod solve;
mod staging;
pub use staging::{Plain, STAGED_AHEAD};
pub mod weights;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::cusolver::safe::DnHandle;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};

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
    PROBED.get_or_init(probe_now).clone()
}

/// Whether a probe already found libcuda loaded: the driver may then be asked about an
/// error (never waits for a probe under way, nor starts one).
pub(crate) fn driver_loaded() -> bool {
    PROBED.get().is_some_and(|p| p.libcuda_present)
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

/// Resolves `--device`: None means the CPU.
pub fn select(choice: DeviceChoice) -> Result<Option<Arc<CudaDevice>>> {
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Auto => {
            let p = crate::profile::span("cuda: probe", probe);
            if p.unavailable_reason().is_some() {
                Ok(None)
            } else {
                CudaDevice::open(0).map(Some)
            }
        }
        DeviceChoice::Cuda(n) => {
            let p = crate::profile::span("cuda: probe", probe);
            if let Some(why) = p.unavailable_reason() {
                return Err(Error::invalid(format!(
                    "--device cuda:{n}: {why}; use --device cpu"
                )));
            }
            if n >= p.devices {
                return Err(Error::invalid(format!(
                    "--device cuda:{n}: only {} CUDA device(s) present",
                    p.devices
                )));
            }
            CudaDevice::open(n).map(Some)
        }
    }
}

/// One GPU: a context, a stream, cuBLAS and cuSOLVER handles, and the kernels.
pub struct CudaDevice {
    ordinal: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels already looked up, by `module/name`: the forward pass launches hundreds per
    /// batch, and each lookup in the module is a driver call.
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Page-locked buffers for host → device copies (staging.rs), made on first use.
    staging: Mutex<Option<staging::Ring<CudaDevice>>>,
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Page-locked buffers are freed with the ring: no copy may still read them.
        let ring = self
            .staging
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(ring) = ring {
            let _ = ring.drain(self);
        }
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Call [`probe`] first: cudarc panics when libcuda is missing.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        if let Some(why) = probe().unavailable_reason() {
            return Err(Error::invalid(format!("cannot use the GPU: {why}")));
        }
        let opened = crate::profile::span("cuda: context", || CudaContext::new(ordinal))
            .map_err(Error::from)
            .and_then(|ctx| Self::on_stream(ctx.default_stream()));
        opened.map_err(|e| e.during(format!("opening GPU {ordinal}"), fault::FREE_THE_GPU))
    }

    /// Binds to a stream the caller owns (a CUDA pipeline's own stream): every kernel,
    /// cuBLAS and cuSOLVER call of this device is then ordered on that stream.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Arc<Self>> {
        let ordinal = stream.context().ordinal();
        let blas = crate::profile::span("cuda: cuBLAS handle", || CudaBlas::new(stream.clone()))?;
        let solver =
            crate::profile::span("cuda: cuSOLVER handle", || DnHandle::new(stream.clone()))?;
        Ok(Arc::new(CudaDevice {
            ordinal,
            stream,
            blas,
            solver,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            staging: Mutex::new(None),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    pub fn solver(&self) -> &DnHandle {
        &self.solver
    }

    pub fn name(&self) -> Result<String> {
        Ok(self.stream.context().name()?)
    }

    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok(self.stream.context().compute_capability()?)
    }

    /// Makes this device's context current on the calling thread. cudarc's own calls do
    /// this; the raw cuBLAS / cuSOLVER calls of this crate call it first, so they are right
    /// from any thread (it also reports errors cudarc recorded in destructors).
    pub fn bind(&self) -> Result<()> {
        Ok(self.stream.context().bind_to_thread()?)
    }

    /// A kernel from the embedded module `module` (a kernels/*.cu file stem), loaded once.
    pub fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        if name.contains('\0') {
            // cudarc's load_function would panic on the CString conversion.
            return Err(Error::invalid(format!(
                "kernel name {name:?} contains a NUL byte"
            )));
        }
        let key = format!("{module}/{name}");
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return Ok(f.clone());
        }
        // A panic elsewhere while the lock was held leaves the map consistent (it only
        // ever gains complete entries): take it back instead of panicking too.
        let mut modules = self
            .modules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let m = match modules.get(module) {
            Some(m) => m.clone(),
            None => {
                let image = kernels::MODULES
                    .iter()
                    .find(|(n, _)| *n == module)
                    .map(|(_, bytes)| bytes.to_vec())
                    .ok_or_else(|| Error::invalid(format!("kernel module `{module}` is not embedded in this binary: rebuild with nvcc available")))?;
                let m = self
                    .stream
                    .context()
                    .load_module(cudarc::nvrtc::Ptx::from_binary(image))?;
                modules.insert(module, m.clone());
                m
            }
        };
        let f = m.load_function(name)?;
        self.functions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, f.clone());
        Ok(f)
    }

    /// Device memory that the caller must write entirely before reading (kernel outputs).
    ///
    /// # Safety
    /// Every element must be written before it is read or downloaded.
    pub unsafe fn uninit<T: DeviceRepr>(&self, len: usize, what: &str) -> Result<CudaSlice<T>> {
        // SAFETY: passed on to the caller (above).
        unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(|e| oom(e, what, len.saturating_mul(std::mem::size_of::<T>())))
    }

    /// Zeroed device memory, with out-of-memory reported by what it was for.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| oom(e, what, len.saturating_mul(std::mem::size_of::<T>())))
    }

    pub fn upload<T: DeviceRepr>(&self, data: &[T], what: &str) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| oom(e, what, std::mem::size_of_val(data)))
    }

    /// Copies `data` to the host once every earlier call on this device's stream (kernels,
    /// cuBLAS, cuSOLVER) has finished. cudarc's `clone_dtoh` into a `Vec` does not
    /// synchronise by itself (its `SyncOnDrop` for host vectors is a no-op): it relies on
    /// the driver returning from a device → pageable-host copy only once the copy is done.
    /// The explicit synchronisation makes that a guarantee, and surfaces asynchronous
    /// errors (and errors cudarc recorded in destructors) here rather than later.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, data: &CudaSlice<T>) -> Result<Vec<T>> {
        let host = self.stream.clone_dtoh(data)?;
        self.stream.synchronize()?;
        self.stream.context().check_err()?;
        Ok(host)
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// The GPU fault tests' hook ([`fault::injected_fault`]): launches the faulting kernel
    /// asked for at task model `model`, and waits for it, so that its error surfaces in the
    /// step that is running. Nothing happens unless the hook's variable asks for it.
    pub fn inject_test_fault(&self, model: usize) -> Result<()> {
        let Some(kernel) = fault::injected_fault(model) else {
            return Ok(());
        };
        let f = self.function("fault", kernel)?;
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(&f);
        if kernel == "fault_write_through" {
            b.arg(&null);
        }
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: fault_trap takes no argument and fault_write_through one pointer, pushed
        // above. Both fault on purpose: the driver reports it as an error of this context,
        // which the run then stops using; no memory of this process is written.
        unsafe { b.launch(one) }?;
        self.synchronize()
    }
}

/// A failed allocation of `bytes` for `what`: out of memory says what it was for and its
/// size (the free memory is added by the conversion into [`Error`]).
fn oom(e: cudarc::driver::DriverError, what: &str, bytes: usize) -> Error {
    let mut gpu = fault::GpuError::from_driver(e.0);
    if gpu.kind == fault::GpuFailure::OutOfMemory {
        gpu.allocation = Some((what.to_string(), bytes as u64));
        gpu.into()
    } else {
        e.into()
    }
}

/// An error unless the device buffer `what` holds at least `need` elements: every unsafe
/// launch and library call checks its buffers with this first.
pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::invalid(format!(
            "{what}: device buffer of {have} values, {need} needed"
        )));
    }
    Ok(())
}

/// `n` as the C `int` of a kernel or library argument, or an error naming it.
pub(crate) fn c_int(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::invalid(format!("{what} = {n} does not fit a C int")))
}

/// `a·b`, or an error when it overflows usize.
pub(crate) fn mul(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(format!("{what}: {a}·{b} overflows")))
}

/// Launch configuration of the grid-stride element-wise kernels in kernels/finalize.cu.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
