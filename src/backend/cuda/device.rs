//! One GPU: its context and stream, cuBLAS and cuSOLVER handles, the embedded kernels
//! (loaded once each, on first use), allocation and copies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cusolver::safe::DnHandle;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};

use super::fault;
use super::launch::oom;
use super::probe::{kernels, probe, DeviceChoice};
use super::ring::Ring;
use crate::error::{Error, Result};

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
    pub(super) stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels already looked up, by `module/name`: the forward pass launches hundreds per
    /// batch, and each lookup in the module is a driver call.
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Page-locked buffers for host → device copies (staging.rs), made on first use.
    pub(super) staging: Mutex<Option<Ring<CudaDevice>>>,
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
