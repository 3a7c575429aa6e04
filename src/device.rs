//! Which engine a run uses: the `--device` choice (`auto`, `cpu`, `cuda`, `cuda:N`) resolved
//! for a model, and the backend built from it. Shared by the command line and the Python
//! package, so both pick the same engine for the same input.

use std::path::Path;
use std::sync::Arc;

use crate::backend::cuda::{self, CudaDevice, DeviceChoice};
use crate::error::Result;
use crate::model::llama_config;
use crate::progress::{Event, Observer};

/// The device `device` names for a run on `model` (`None`: the CPU engine). Decoder LLMs run
/// on the CPU engine: `auto` says so in a note, a GPU is refused.
pub fn select_device(
    device: &str,
    model: &Path,
    observer: &dyn Observer,
) -> Result<Option<Arc<CudaDevice>>> {
    let mut choice = device.parse::<DeviceChoice>()?;
    if llama_config::is_decoder_dir(model) {
        let (cpu, notice) = decoder_device(choice)?;
        if let Some(n) = notice {
            observer.event(Event::Note(n.to_string()));
        }
        choice = cpu;
    }
    cuda::select(choice)
}

/// Runs `$body` with `$backend` bound to the backend of the device [`select_device`] chose
/// (`&Option<Arc<CudaDevice>>`): the CPU engine, or the CUDA one in the given precision.
/// Evaluates to `$body`'s value.
#[macro_export]
macro_rules! with_backend {
    ($gpu:expr, $precision:expr, |$backend:ident| $body:expr) => {
        match $gpu {
            None => {
                let $backend = $crate::backend::CpuBackend;
                $body
            }
            Some(dev) => {
                let $backend = $crate::backend::CudaBackend::new(dev.clone(), $precision);
                $body
            }
        }
    };
}

/// The device a run on a decoder LLM uses: the CPU engine, the only one with their
/// operations for now. `auto` picks it, with the notice returned; a GPU is refused.
pub fn decoder_device(choice: DeviceChoice) -> Result<(DeviceChoice, Option<&'static str>)> {
    match choice {
        DeviceChoice::Cpu => Ok((DeviceChoice::Cpu, None)),
        DeviceChoice::Auto => Ok((
            DeviceChoice::Cpu,
            Some("decoder LLMs run on the CPU engine for now: --device auto chose cpu"),
        )),
        DeviceChoice::Cuda(n) => Err(crate::backend::decoder_ops_unsupported(
            &format!("cuda:{n}"),
            "the decoder forward pass",
        )),
    }
}
