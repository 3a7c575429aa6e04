//! DLPack, the tensor exchange of torch, NumPy, JAX and CuPy: reading a caller's tensor from
//! its `dltensor` capsule without copying, and handing out an f32 matrix this module owns
//! as one. The layout is DLPack's stable C ABI (`DLManagedTensor`, the unversioned capsule
//! every producer still gives by default).

use std::ffi::{c_char, c_void, CStr};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::{ffi, Bound, PyAny};

use regmean_gpu::accumulator::RowType;

#[repr(C)]
#[derive(Clone, Copy)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

const CAPSULE: &CStr = c"dltensor";
const USED_CAPSULE: &CStr = c"used_dltensor";
pub const DEVICE_CPU: i32 = 1;
pub const DEVICE_CUDA: i32 = 2;
const CODE_INT: u8 = 0;
const CODE_UINT: u8 = 1;
const CODE_FLOAT: u8 = 2;
const CODE_BFLOAT: u8 = 4;
const CODE_BOOL: u8 = 6;

/// What a caller's tensor is: where its first element lies, on which device, and its layout
/// in elements.
pub struct View {
    pub address: u64,
    pub device_type: i32,
    pub device_id: i32,
    pub dtype: Elements,
    pub shape: Vec<usize>,
    /// Elements between consecutive indices of each dimension.
    pub strides: Vec<usize>,
}

/// A tensor's element type, as far as this module reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elements {
    Rows(RowType),
    /// One byte per element: bool, uint8 or int8 (masks).
    Byte,
    Other(u8, u8),
}

/// Reads the `dltensor` capsule `capsule` (as `__dlpack__()` returns it), which stays the
/// producer's: its memory is valid while the capsule lives.
pub fn view(capsule: &Bound<'_, PyAny>, what: &str) -> PyResult<View> {
    // SAFETY: PyCapsule_IsValid only inspects the object; a capsule of another name or a
    // non-capsule is refused before anything is read.
    let valid = unsafe { ffi::PyCapsule_IsValid(capsule.as_ptr(), CAPSULE.as_ptr()) } == 1;
    if !valid {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a DLPack tensor (an object with __dlpack__, e.g. a torch tensor)"
        )));
    }
    // SAFETY: the capsule is a valid `dltensor` capsule (checked above), whose pointer is a
    // DLManagedTensor by the DLPack protocol, alive as long as the capsule.
    let managed = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), CAPSULE.as_ptr()) }
        as *const DlManagedTensor;
    if managed.is_null() {
        return Err(PyErr::fetch(capsule.py()));
    }
    // SAFETY: as above; the shape (and strides when given) arrays hold `ndim` entries.
    let t = unsafe { &(*managed).dl_tensor };
    let ndim = usize::try_from(t.ndim).unwrap_or(0);
    let dims = |p: *const i64| -> PyResult<Vec<usize>> {
        // SAFETY: `p` points to `ndim` int64 values (DLPack), checked non-null by the caller.
        let values = unsafe { std::slice::from_raw_parts(p, ndim) };
        values
            .iter()
            .map(|&v| {
                usize::try_from(v).map_err(|_| {
                    PyValueError::new_err(format!("{what}: negative sizes or strides are not read"))
                })
            })
            .collect()
    };
    let shape = if ndim == 0 {
        Vec::new()
    } else {
        dims(t.shape)?
    };
    let strides = if t.strides.is_null() || ndim == 0 {
        // Compact row-major.
        let mut s = vec![1usize; ndim];
        for i in (0..ndim.saturating_sub(1)).rev() {
            s[i] = s[i + 1] * shape[i + 1];
        }
        s
    } else {
        dims(t.strides)?
    };
    let DlDataType { code, bits, lanes } = t.dtype;
    let dtype = match (code, bits, lanes) {
        (CODE_FLOAT, 32, 1) => Elements::Rows(RowType::F32),
        (CODE_FLOAT, 16, 1) => Elements::Rows(RowType::F16),
        (CODE_BFLOAT, 16, 1) => Elements::Rows(RowType::BF16),
        (CODE_BOOL | CODE_UINT | CODE_INT, 8, 1) => Elements::Byte,
        (c, b, _) => Elements::Other(c, b),
    };
    Ok(View {
        address: t.data as u64 + t.byte_offset,
        device_type: t.device.device_type,
        device_id: t.device.device_id,
        dtype,
        shape,
        strides,
    })
}

/// An f32 matrix handed out as a DLPack tensor: the buffer and its shape, owned by the
/// DLManagedTensor until the consumer's deleter call (or the capsule's end, unconsumed).
struct Owned {
    data: Vec<f32>,
    shape: [i64; 2],
}

unsafe extern "C" fn delete_owned(managed: *mut DlManagedTensor) {
    // SAFETY: `managed` and its context were made by `into_capsule` with Box::into_raw and
    // are freed exactly once: by the consumer's deleter call, or by the capsule destructor
    // when no consumer took it.
    unsafe {
        drop(Box::from_raw((*managed).manager_ctx as *mut Owned));
        drop(Box::from_raw(managed));
    }
}

unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python when the capsule dies. A consumer renames a capsule it takes
    // to `used_dltensor` and deletes the tensor itself; only an untaken one is deleted here.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, USED_CAPSULE.as_ptr()) == 1 {
            return;
        }
        let managed = ffi::PyCapsule_GetPointer(capsule, CAPSULE.as_ptr()) as *mut DlManagedTensor;
        if managed.is_null() {
            ffi::PyErr_Clear();
            return;
        }
        if let Some(deleter) = (*managed).deleter {
            deleter(managed);
        }
    }
}

/// `data` (`rows` × `cols`, row-major) as a CPU `dltensor` capsule of f32.
pub fn into_capsule(
    py: Python<'_>,
    data: Vec<f32>,
    rows: usize,
    cols: usize,
) -> PyResult<Py<PyAny>> {
    assert_eq!(data.len(), rows * cols, "the matrix has rows × cols values");
    let mut owned = Box::new(Owned {
        data,
        shape: [rows as i64, cols as i64],
    });
    let tensor = DlTensor {
        data: owned.data.as_mut_ptr() as *mut c_void,
        device: DlDevice {
            device_type: DEVICE_CPU,
            device_id: 0,
        },
        ndim: 2,
        dtype: DlDataType {
            code: CODE_FLOAT,
            bits: 32,
            lanes: 1,
        },
        shape: owned.shape.as_mut_ptr(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    let managed = Box::into_raw(Box::new(DlManagedTensor {
        dl_tensor: tensor,
        manager_ctx: Box::into_raw(owned) as *mut c_void,
        deleter: Some(delete_owned),
    }));
    // SAFETY: the name is a static C string; on failure the tensor is freed here and the
    // Python error raised.
    let capsule = unsafe {
        ffi::PyCapsule_New(
            managed as *mut c_void,
            CAPSULE.as_ptr() as *const c_char,
            Some(capsule_destructor),
        )
    };
    if capsule.is_null() {
        // SAFETY: the capsule was not made, so nobody else holds `managed`.
        unsafe { delete_owned(managed) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: PyCapsule_New returned a new reference.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) }.unbind())
}
