//! `GramAccumulator` and `solve` over the caller's own tensors (DLPack), bound to the
//! library's `accumulator`: the Grams of the merge, of activations the caller
//! computed, without copying them.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use regmean_gpu::accumulator::{
    self, cuda_device_on_stream, Accumulator, AccumulatorDevice, HostRows, RowType,
};
use regmean_gpu::regmean::describe;

use crate::dlpack::{into_capsule, view, Elements, View, DEVICE_CPU, DEVICE_CUDA};
use crate::to_py;

/// Accumulates XᵀX of the rows a caller hands in (`update`), and gives the Gram (`finish`).
#[pyclass(module = "regmean_gpu._native", name = "GramAccumulator", unsendable)]
pub struct PyGramAccumulator {
    inner: Option<Accumulator>,
    /// `None`: the CPU; else the CUDA device ordinal.
    cuda: Option<usize>,
}

/// Rows of a 2-D tensor `[rows, dim]` whose last dimension is contiguous: their count and
/// the elements between consecutive rows.
fn rows_of(v: &View, dim: usize, what: &str) -> PyResult<(usize, usize)> {
    if v.shape.len() != 2 || v.shape[1] != dim {
        return Err(PyValueError::new_err(format!(
            "{what}: expected a [rows, {dim}] tensor, got shape {:?}",
            v.shape
        )));
    }
    let rows = v.shape[0];
    if rows > 1 && v.strides[0] < dim || dim > 1 && v.strides[1] != 1 {
        return Err(PyValueError::new_err(format!(
            "{what}: each row must be contiguous (strides {:?}); call .contiguous() first",
            v.strides
        )));
    }
    Ok((rows, if rows > 1 { v.strides[0] } else { dim }))
}

fn row_type(v: &View, what: &str) -> PyResult<RowType> {
    match v.dtype {
        Elements::Rows(t) => Ok(t),
        other => Err(PyValueError::new_err(format!(
            "{what}: rows must be float32, float16 or bfloat16, not {other:?}"
        ))),
    }
}

/// A mask of one byte per row (bool, uint8 or int8), contiguous, on the rows' device.
fn mask_of(m: &View, rows: usize, x: &View) -> PyResult<()> {
    if m.dtype != Elements::Byte || m.shape != [rows] || (rows > 1 && m.strides[0] != 1) {
        return Err(PyValueError::new_err(format!(
            "mask: expected a contiguous [{rows}] tensor of bool or uint8, got {:?} of shape {:?}",
            m.dtype, m.shape
        )));
    }
    if (m.device_type, m.device_id) != (x.device_type, x.device_id) {
        return Err(PyValueError::new_err("mask: must be on the rows' device"));
    }
    Ok(())
}

#[pymethods]
impl PyGramAccumulator {
    /// `device`: None for the CPU, or a CUDA ordinal with the caller's stream (`stream`, a
    /// `cudaStream_t` as an integer: 0 is the legacy default stream).
    #[new]
    #[pyo3(signature = (dim, cuda=None, stream=0, fusionbench_compat=false))]
    fn new(
        dim: usize,
        cuda: Option<usize>,
        stream: u64,
        fusionbench_compat: bool,
    ) -> PyResult<Self> {
        let device = match cuda {
            None => AccumulatorDevice::Cpu,
            Some(ordinal) => {
                // SAFETY: the stream is the caller's current stream of the runtime's primary
                // context (the Python side passes torch's), alive while this accumulator is
                // used, as `cuda_device_on_stream` requires.
                let dev = unsafe {
                    cuda_device_on_stream(ordinal, stream as cudarc::driver::sys::CUstream)
                }
                .map_err(to_py)?;
                AccumulatorDevice::Cuda(dev)
            }
        };
        let inner = Accumulator::new(&device, dim, fusionbench_compat).map_err(to_py)?;
        Ok(Self {
            inner: Some(inner),
            cuda,
        })
    }

    /// Adds the rows of `x` (a `dltensor` capsule) with `mask` (a capsule, one byte per row).
    #[pyo3(signature = (x, mask=None))]
    fn update(&mut self, x: &Bound<'_, PyAny>, mask: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let acc = self
            .inner
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("the accumulator is finished"))?;
        let v = view(x, "x")?;
        let (rows, stride) = rows_of(&v, acc.dim(), "x")?;
        let dtype = row_type(&v, "x")?;
        let m = mask.map(|m| view(m, "mask")).transpose()?;
        if let Some(m) = &m {
            mask_of(m, rows, &v)?;
        }
        let elements = if rows == 0 {
            0
        } else {
            (rows - 1) * stride + acc.dim()
        };
        match (v.device_type, self.cuda) {
            (DEVICE_CPU, None) => {
                let p = v.address as usize;
                // SAFETY: the producer's capsule (alive for this call) holds `elements`
                // values of `dtype` from `p` by its shape and strides, and the mask `rows`
                // bytes; nothing writes them while the GIL is held.
                let rows_in = unsafe {
                    match dtype {
                        RowType::F32 => {
                            HostRows::F32(std::slice::from_raw_parts(p as *const f32, elements))
                        }
                        RowType::F16 => HostRows::F16(std::slice::from_raw_parts(
                            p as *const half::f16,
                            elements,
                        )),
                        RowType::BF16 => HostRows::BF16(std::slice::from_raw_parts(
                            p as *const half::bf16,
                            elements,
                        )),
                    }
                };
                // SAFETY: as above, `rows` bytes.
                let mask_in = m
                    .as_ref()
                    .map(|m| unsafe { std::slice::from_raw_parts(m.address as *const u8, rows) });
                acc.update(rows_in, rows, stride, mask_in).map_err(to_py)
            }
            (DEVICE_CUDA, Some(ordinal)) if v.device_id as usize == ordinal => {
                // SAFETY: device memory of the accumulator's device, written by work on the
                // caller's stream (the accumulator's), kept alive by the caller until that
                // stream passes this update, as `update_device` requires.
                unsafe {
                    acc.update_device(
                        v.address,
                        dtype,
                        rows,
                        stride,
                        m.as_ref().map(|m| m.address),
                    )
                }
                .map_err(to_py)
            }
            (t, _) => Err(PyValueError::new_err(format!(
                "x: a tensor on DLPack device ({t}, {}) does not fit an accumulator on {}",
                v.device_id,
                match self.cuda {
                    None => "the CPU".to_string(),
                    Some(o) => format!("cuda:{o}"),
                }
            ))),
        }
    }

    /// Rows counted so far.
    #[getter]
    fn rows(&self) -> u64 {
        self.inner.as_ref().map_or(0, Accumulator::rows)
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.as_ref().map_or(0, Accumulator::dim)
    }

    /// The Gram `[dim, dim]` f32 on the host, as a `dltensor` capsule, and its rows.
    fn finish(&mut self, py: Python<'_>) -> PyResult<(Py<PyAny>, u64)> {
        let acc = self
            .inner
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the accumulator is finished"))?;
        let g = acc.finish().map_err(to_py)?;
        Ok((into_capsule(py, g.gram, g.dim, g.dim)?, g.rows))
    }
}

/// A contiguous CPU float32 tensor `[rows, cols]` read as a slice.
fn matrix<'a>(v: &'a View, rows: usize, cols: usize, what: &str) -> PyResult<&'a [f32]> {
    let compact = v.shape.len() == 2
        && (rows <= 1 || v.strides[0] == cols)
        && (cols <= 1 || v.strides[1] == 1);
    if v.device_type != DEVICE_CPU
        || v.dtype != Elements::Rows(RowType::F32)
        || v.shape != [rows, cols]
        || !compact
    {
        return Err(PyValueError::new_err(format!(
            "{what}: expected a contiguous float32 CPU tensor of shape [{rows}, {cols}], got {:?} of shape {:?}",
            v.dtype, v.shape
        )));
    }
    // SAFETY: a compact [rows, cols] f32 tensor in host memory, alive while its capsule is.
    Ok(unsafe { std::slice::from_raw_parts(v.address as *const f32, rows * cols) })
}

/// One layer's closed form from sums the caller holds (capsules); returns W `[d_in, d_out]`
/// as a capsule and how it was solved.
#[pyfunction]
pub fn solve(
    py: Python<'_>,
    gram_sum: &Bound<'_, PyAny>,
    gw_sum: &Bound<'_, PyAny>,
    w_mean: &Bound<'_, PyAny>,
) -> PyResult<(Py<PyAny>, String)> {
    let (g, gw, w) = (
        view(gram_sum, "gram_sum")?,
        view(gw_sum, "gw_sum")?,
        view(w_mean, "w_mean")?,
    );
    let d_in = g.shape.first().copied().unwrap_or(0);
    let d_out = gw.shape.get(1).copied().unwrap_or(0);
    let (g, gw, w) = (
        matrix(&g, d_in, d_in, "gram_sum")?,
        matrix(&gw, d_in, d_out, "gw_sum")?,
        matrix(&w, d_in, d_out, "w_mean")?,
    );
    let (merged, outcome) = accumulator::solve(g, gw, w, d_in, d_out).map_err(to_py)?;
    Ok((into_capsule(py, merged, d_in, d_out)?, describe(&outcome)))
}
