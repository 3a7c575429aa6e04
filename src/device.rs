//! Which engine a run uses: the `--device` choice (`auto`, `cpu`, `cuda`, `cuda:N`) resolved
//! for a model, and the backend built from it. Shared by the command line and the Python
//! package, so both pick the same engine for the same input.

use std::path::Path;
use std::sync::Arc;

use crate::backend::cuda::{self, CudaDevice, DeviceChoice};
use crate::error::Result;
use crate::model::llama_config;
use crate::progress::{Event, Observer};

/// The device `device` names for a run on `model` (`None`: the CPU engine). For decoder
/// LLMs `auto` keeps the CPU engine (their verified path) and says so in a note; `cuda`
/// runs them on the GPU with a note that this path is unverified on a GPU.
pub fn select_device(
    device: &str,
    model: &Path,
    observer: &dyn Observer,
) -> Result<Option<Arc<CudaDevice>>> {
    let mut choice = device.parse::<DeviceChoice>()?;
    if llama_config::is_decoder_dir(model) {
        let (chosen, notice) = decoder_device(choice);
        if let Some(n) = notice {
            observer.event(Event::Note(n.to_string()));
        }
        choice = chosen;
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

/// What `auto` says when it keeps a decoder LLM on the CPU engine.
pub const DECODER_AUTO_NOTE: &str =
    "decoder LLMs run on the CPU engine (their verified path) under --device auto: --device cuda runs them on a GPU, unverified";

/// What `--device cuda` says for a decoder LLM.
pub const DECODER_CUDA_NOTE: &str =
    "the CUDA forward pass of decoder LLMs is unverified on a GPU: check its output against --device cpu (regmean-gpu compare)";

/// The device a run on a decoder LLM uses, with the one-line notice to show. `auto` picks
/// the CPU engine, the verified path; an explicit GPU is used, with a notice that the CUDA
/// decoder forward pass has not been verified on a GPU yet.
pub fn decoder_device(choice: DeviceChoice) -> (DeviceChoice, Option<&'static str>) {
    match choice {
        DeviceChoice::Cpu => (DeviceChoice::Cpu, None),
        DeviceChoice::Auto => (DeviceChoice::Cpu, Some(DECODER_AUTO_NOTE)),
        DeviceChoice::Cuda(n) => (DeviceChoice::Cuda(n), Some(DECODER_CUDA_NOTE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoders_stay_on_the_cpu_under_auto_and_run_on_cuda_with_a_notice_when_asked() {
        assert_eq!(decoder_device(DeviceChoice::Cpu), (DeviceChoice::Cpu, None));
        let (auto, note) = decoder_device(DeviceChoice::Auto);
        assert_eq!(auto, DeviceChoice::Cpu);
        assert!(note.is_some_and(|n| n.contains("verified path") && n.contains("--device auto")));
        for n in [0, 3] {
            let (gpu, note) = decoder_device(DeviceChoice::Cuda(n));
            assert_eq!(gpu, DeviceChoice::Cuda(n));
            assert!(note.is_some_and(|n| n.contains("unverified on a GPU")));
        }
    }
}
