//! Safetensors files: a memory-mapped reader that converts float tensors to f32 on demand
//! (the map guarded against the file changing under it, see [`super::mapped`]),
//! and a streaming writer. Parsing and validation of the header (size cap, offsets, dtype
//! × shape against byte length) are the `safetensors` crate's; this module adds file names
//! to every error and the dtype conversions the engine needs.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::mapped::{FileStamp, MappedFile};
use crate::error::{Error, Result};

/// Element types the engine distinguishes. Floats are computed in f32; everything else is
/// carried through byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    /// Any non-float (or exotic float) type, by its safetensors name, e.g. "I64".
    Other(String),
}

impl Dtype {
    pub fn name(&self) -> &str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::Other(s) => s,
        }
    }

    fn from_name(s: &str) -> Dtype {
        match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            other => Dtype::Other(other.to_string()),
        }
    }

    pub fn is_float(&self) -> bool {
        !matches!(self, Dtype::Other(_))
    }

    /// Bytes per element for the float types this crate writes.
    pub fn float_size(&self) -> Option<usize> {
        match self {
            Dtype::F64 => Some(8),
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::BF16 => Some(2),
            Dtype::Other(_) => None,
        }
    }

    /// Parses the user-facing names of `out_dtype` (torch spellings accepted).
    pub fn parse_float(s: &str) -> Option<Dtype> {
        match s.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Some(Dtype::F32),
            "float16" | "f16" | "fp16" | "half" => Some(Dtype::F16),
            "bfloat16" | "bf16" => Some(Dtype::BF16),
            _ => None,
        }
    }

    /// The torch spelling, as config.json's `torch_dtype` expects.
    pub fn torch_name(&self) -> &str {
        match self {
            Dtype::F64 => "float64",
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::Other(s) => s,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the memory map (header included in the offset).
    range: std::ops::Range<usize>,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: MappedFile,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let map = MappedFile::open(&path)?;
        let mmap = map.bytes();
        // Duplicates first: the crate's map keeps the last entry and reports a confusing error.
        if let Some(header) = mmap
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .and_then(|n| mmap.get(8..8usize.checked_add(usize::try_from(n).ok()?)?))
        {
            if let Some(dup) = duplicate_key(header) {
                map.check_read()?;
                return Err(Error::file(
                    &path,
                    format!("tensor `{dup}` is listed twice in the header"),
                ));
            }
        }
        let parsed = safetensors::SafeTensors::read_metadata(mmap);
        // A header read as zeros (the file truncated while it was parsed) is not malformed.
        map.check_read()?;
        let (header_len, meta) =
            parsed.map_err(|e| Error::file(&path, format!("not a valid safetensors file: {e}")))?;

        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype_name = serde_json::to_value(info.dtype)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", info.dtype));
            let (start, end) = info.data_offsets;
            tensors.insert(
                name,
                TensorEntry {
                    dtype: Dtype::from_name(&dtype_name),
                    shape: info.shape.clone(),
                    range: data_start + start..data_start + end,
                },
            );
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile {
            path,
            map,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::file(&self.path, format!("missing tensor `{name}`")))
    }

    /// A tensor's stored bytes, borrowed from the map. Whoever reads them checks
    /// [`SafetensorsFile::check_unchanged`] afterwards: bytes past a truncation read as zeros.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.map.bytes()[e.range.clone()])
    }

    /// The tensor converted to f32 (F32, F16, BF16, F64 accepted).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let bytes = &self.map.bytes()[e.range.clone()];
        let v = decode_f32(&e.dtype, bytes).ok_or_else(|| self.not_float(name, e))?;
        self.map.check_read()?;
        Ok(v)
    }

    /// An error naming the file when it was truncated while mapped, or when its size,
    /// modification time or inode changed since it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        self.map.check_unchanged()
    }

    /// The file as it was when opened.
    pub fn stamp(&self) -> &FileStamp {
        self.map.stamp()
    }

    /// A `[rows, cols]` tensor converted to f32 and transposed to `[cols, rows]`.
    pub fn to_f32_transposed(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let bytes = &self.map.bytes()[e.range.clone()];
        if e.shape != [rows, cols] {
            return Err(Error::file(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?}, not [{rows}, {cols}]",
                    e.shape
                ),
            ));
        }
        let v = decode_f32_transposed(&e.dtype, bytes, rows, cols)
            .ok_or_else(|| self.not_float(name, e))?;
        self.map.check_read()?;
        Ok(v)
    }

    fn not_float(&self, name: &str, e: &TensorEntry) -> Error {
        Error::file(
            &self.path,
            format!("tensor `{name}` has non-float dtype {}", e.dtype.name()),
        )
    }
}

/// The first top-level key that occurs twice in a JSON object (a JSON map would silently keep
/// the last one, so a second `weight` could hide behind the first).
fn duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if dup.is_none() && !seen.insert(key.clone()) {
                    dup = Some(key);
                }
            }
            Ok(dup)
        }
    }
    serde_json::Deserializer::from_slice(header)
        .deserialize_map(Keys)
        .ok()
        .flatten()
}

/// Converts little-endian float bytes to f32; None for non-float dtypes.
pub fn decode_f32(dtype: &Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    // from_le_bytes per element: tensor data in a safetensors file need not be aligned.
    Some(match dtype {
        Dtype::F32 => decode_each::<4>(bytes, f32::from_le_bytes),
        Dtype::F16 => decode_each::<2>(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        Dtype::BF16 => decode_each::<2>(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
        Dtype::F64 => decode_each::<8>(bytes, |b| f64::from_le_bytes(b) as f32),
        Dtype::Other(_) => return None,
    })
}

/// Little-endian float bytes of a row-major `[rows, cols]` tensor, as f32 `[cols, rows]`;
/// None for non-float dtypes. Panics if `bytes` is shorter than the shape (a file's
/// entries are validated against their shapes when it is opened). Checkpoints store nn.Linear weights `[out, in]`, the engine
/// multiplies by `[in, out]`: converting while transposing reads each byte once.
pub fn decode_f32_transposed(
    dtype: &Dtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Option<Vec<f32>> {
    Some(match dtype {
        #[cfg(target_arch = "x86_64")]
        Dtype::F32 if std::is_x86_feature_detected!("avx512f") => {
            // SAFETY: AVX-512F was just detected.
            unsafe { transpose_f32_avx512(bytes, rows, cols) }
        }
        Dtype::F32 => transpose_each::<4>(bytes, rows, cols, f32::from_le_bytes),
        Dtype::F16 => {
            transpose_each::<2>(bytes, rows, cols, |b| half::f16::from_le_bytes(b).to_f32())
        }
        Dtype::BF16 => {
            transpose_each::<2>(bytes, rows, cols, |b| half::bf16::from_le_bytes(b).to_f32())
        }
        Dtype::F64 => transpose_each::<8>(bytes, rows, cols, |b| f64::from_le_bytes(b) as f32),
        Dtype::Other(_) => return None,
    })
}

/// Stored little-endian f32 `[rows, cols]` as `[cols, rows]` through 16 × 16 register
/// transposes: in parallel over strips of 16 input columns (16 whole output rows), 16 input
/// rows at a time loaded as vectors, transposed, and stored as 16 contiguous elements of
/// each output row; the edges past a multiple of 16 by masked loads and stores. The same
/// values as [`transpose_with`], whose scalar tile moves one element at a time: a
/// clip8-small merge's `load: decode + transpose` span fell from 1.35–1.87 s to 1.0 s.
/// Panics if `bytes` holds fewer than `rows·cols` elements.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
unsafe fn transpose_f32_avx512(bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    const STRIP: usize = 16;
    assert!(
        bytes.len() / 4 >= rows.saturating_mul(cols),
        "{} bytes for a [{rows}, {cols}] f32 tensor",
        bytes.len()
    );
    let fill = |strip: usize, dst: &mut [std::mem::MaybeUninit<f32>]| {
        let width = dst.len() / rows;
        // SAFETY: the CPU has AVX-512F (the caller's contract). Loads read rows r0.. of input columns
        // 16·strip .. 16·strip + width, all inside `bytes` (checked: rows·cols f32s); stores
        // write this strip's `width` output rows of `rows` each.
        unsafe { transpose_strip(bytes.as_ptr(), rows, cols, STRIP * strip, width, dst) }
    };
    // SAFETY: the fill writes every element of its strip: block r0 stores elements
    // r0..r0+h of each of the strip's `width` output rows, and the blocks cover 0..rows.
    unsafe { by_strips(rows, cols, STRIP, fill) }
}

/// One strip of [`transpose_f32_avx512`]: input columns `c0..c0 + width` (≤ 16) of every
/// row into `dst` (`width` output rows of `rows`).
///
/// # Safety
/// AVX-512F; `src` must hold `rows·cols` f32s (any alignment), `c0 + width ≤ cols` and
/// `dst` `width·rows` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_strip(
    src: *const u8,
    rows: usize,
    cols: usize,
    c0: usize,
    width: usize,
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    use std::arch::x86_64::*;
    let in_cols: __mmask16 = if width == 16 {
        0xFFFF
    } else {
        (1u16 << width) - 1
    };
    let (src, dst) = (src.cast::<f32>(), dst.as_mut_ptr().cast::<f32>());
    for r0 in (0..rows).step_by(16) {
        let h = 16.min(rows - r0);
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, row) in r.iter_mut().enumerate().take(h) {
            // SAFETY (the caller's contract): element (r0 + i, c0..c0 + width) is inside
            // `src`; masked-off lanes are not read.
            *row = unsafe { _mm512_maskz_loadu_ps(in_cols, src.add((r0 + i) * cols + c0)) };
        }
        let t = crate::simd::transpose_16x16(r);
        let out_rows: __mmask16 = if h == 16 { 0xFFFF } else { (1u16 << h) - 1 };
        for (j, column) in t.iter().enumerate().take(width) {
            // SAFETY: output row j of the strip, elements r0..r0 + h, inside `dst`.
            unsafe { _mm512_mask_storeu_ps(dst.add(j * rows + r0), out_rows, *column) };
        }
    }
}

/// [`decode_each`] into the transposed layout. Panics if `bytes` holds fewer than
/// `rows·cols` elements.
fn transpose_each<const N: usize>(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    convert: impl Fn([u8; N]) -> f32 + Sync,
) -> Vec<f32> {
    // SAFETY: `[u8; N]` has alignment 1 and size N, so the first len / N groups of N bytes
    // are valid `[u8; N]` values inside `bytes` (what `slice::as_chunks` gives from 1.88).
    let elements: &[[u8; N]] =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / N) };
    transpose_with(elements, rows, cols, |b| convert(*b))
}

/// Row-major `[rows, cols]` elements, each converted by `convert`, as f32 `[cols, rows]`: in
/// parallel over strips of 32 input columns (32 whole output rows), each moved through a
/// `16 × 32` tile: 16 input rows are read 32 contiguous elements at a time into the tile,
/// then each of its 32 columns is written as 16 contiguous elements of an output row.
/// Written straight into the output, with no zeroing pass. Panics if `src` holds fewer than
/// `rows·cols` elements.
///
/// Why the tile: writing one element to each of 32 output rows per input row touches 32
/// lines `rows·4` bytes apart, which for the usual widths (768, 3072: multiples of 1 KiB)
/// fall into a few L1 sets and evict each other (it was 3.3% of a CLIP merge's samples; the
/// merge's decode-and-transpose time fell from 1.86 to 1.01 s with the tile).
pub(crate) fn transpose_with<T: Sync>(
    src: &[T],
    rows: usize,
    cols: usize,
    convert: impl Fn(&T) -> f32 + Sync,
) -> Vec<f32> {
    const STRIP: usize = 32;
    const TILE: usize = 16;
    assert!(
        src.len() >= rows.saturating_mul(cols),
        "{} elements for a [{rows}, {cols}] tensor",
        src.len()
    );
    // SAFETY: the fill writes every element of its strip: each tile r0 writes elements
    // r0..r0+height of each of the strip's `width` output rows, and the tiles cover 0..rows.
    unsafe {
        by_strips(rows, cols, STRIP, |strip, dst| {
            let c0 = strip * STRIP;
            let width = dst.len() / rows;
            let mut tile = [[0.0f32; TILE]; STRIP];
            for r0 in (0..rows).step_by(TILE) {
                let height = TILE.min(rows - r0);
                for i in 0..height {
                    let start = (r0 + i) * cols + c0;
                    for (column, s) in tile.iter_mut().zip(&src[start..start + width]) {
                        column[i] = convert(s);
                    }
                }
                for (j, column) in tile.iter().enumerate().take(width) {
                    let row = &mut dst[j * rows + r0..j * rows + r0 + height];
                    for (o, v) in row.iter_mut().zip(column) {
                        o.write(*v);
                    }
                }
            }
        })
    }
}

/// The `[cols, rows]` transpose of a `[rows, cols]` tensor, made in parallel by strips of
/// `strip` output rows (input columns): `fill(s, dst)` writes strip s, `dst` being its
/// output rows back to back (whole rows: fewer than `strip` in the last strip).
///
/// # Safety
/// `fill` must write every element of the `dst` it is given.
unsafe fn by_strips(
    rows: usize,
    cols: usize,
    strip: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let n = rows.checked_mul(cols).expect("tensor size overflows usize");
    let mut out: Vec<f32> = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(strip * rows)
        .enumerate()
        .for_each(|(s, dst)| fill(s, dst));
    // SAFETY: the chunks cover the first n elements, and `fill` wrote each (the caller's
    // contract).
    unsafe { out.set_len(n) };
    out
}

/// `bytes` as `N`-byte elements, each converted by `convert`: in parallel chunks, because
/// this is where a checkpoint's pages are first touched (faulted in from the page cache),
/// and written straight into the output, with no zeroing pass and no per-element
/// bookkeeping (a rayon `collect` of one element at a time ran at a third of this speed).
fn decode_each<const N: usize>(bytes: &[u8], convert: impl Fn([u8; N]) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let n = bytes.len() / N;
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(bytes[..n * N].par_chunks(CHUNK * N))
        .for_each(|(dst, src)| {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(N)) {
                d.write(convert(s.try_into().expect("chunk of N")));
            }
        });
    // SAFETY: the loop above wrote every one of the first n elements (the chunks of `dst`
    // and `src` pair up one to one and cover n elements each).
    unsafe { out.set_len(n) };
    out
}

/// What a written tensor holds: f32 values converted to the tensor's dtype on the way out,
/// or raw bytes written as they are.
pub enum TensorData<'a> {
    F32(&'a [f32]),
    Raw(&'a [u8]),
}

pub struct OutTensor<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: TensorData<'a>,
}

impl OutTensor<'_> {
    pub fn byte_len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len() * self.dtype.float_size().unwrap_or(4),
            TensorData::Raw(b) => b.len(),
        }
    }
}

/// The header of a safetensors file holding `tensors` (name, dtype, shape, byte length)
/// back to back in the given order, padded with spaces so that tensor data starts 8-byte
/// aligned, as the reference writer does. The 8-byte length prefix is not included.
pub fn header_bytes<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Dtype, &'a [usize], usize)>,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("string map"),
        );
    }
    let mut offset = 0usize;
    for (name, dtype, shape, len) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut bytes = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    bytes
}

/// Writes a safetensors file, streaming tensor data (no second copy of the model), and
/// flushes it to disk so that a full disk surfaces here, not later.
pub fn write_file(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    for t in tensors {
        if let TensorData::F32(v) = &t.data {
            check_f32_target(&t.name, &t.dtype)?;
            debug_assert_eq!(v.len(), t.shape.iter().product::<usize>());
        }
    }
    let header_bytes = header_bytes(
        tensors
            .iter()
            .map(|t| (t.name.as_str(), &t.dtype, t.shape.as_slice(), t.byte_len())),
        metadata,
    );
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;
    let mut buf = Vec::with_capacity(1 << 16);
    for t in tensors {
        match &t.data {
            TensorData::Raw(b) => w.write_all(b).map_err(io)?,
            TensorData::F32(values) => {
                for chunk in values.chunks(1 << 14) {
                    buf.clear();
                    encode_f32(&t.dtype, chunk, &mut buf);
                    w.write_all(&buf).map_err(io)?;
                }
            }
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// f32 values can be written as `dtype` only when it is a float type.
pub(crate) fn check_f32_target(name: &str, dtype: &Dtype) -> Result<()> {
    if dtype.float_size().is_none() {
        return Err(Error::invalid(format!(
            "tensor `{name}`: cannot write f32 data as {}",
            dtype.name()
        )));
    }
    Ok(())
}

pub(crate) fn encode_f32(dtype: &Dtype, values: &[f32], out: &mut Vec<u8>) {
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        Dtype::F64 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as f64).to_le_bytes())),
        Dtype::Other(_) => unreachable!("checked before writing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_covers_every_element_across_parallel_chunks() {
        let n = 2 * (1 << 16) + 3;
        let vals: Vec<f32> = (0..n).map(|i| (i as f32 - 7.0) * 0.5).collect();
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_f32(&Dtype::F32, &f32_bytes).unwrap(), vals);
        let f64_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect();
        assert_eq!(decode_f32(&Dtype::F64, &f64_bytes).unwrap(), vals);
        let halves: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
        let f16_bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        let want: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
        assert_eq!(decode_f32(&Dtype::F16, &f16_bytes).unwrap(), want);
        // Transposed while converting, at shapes that are not multiples of the strip width.
        type Encode = fn(f32) -> (Vec<u8>, f32);
        let encodings: [(Dtype, Encode); 4] = [
            (Dtype::F32, |v| (v.to_le_bytes().to_vec(), v)),
            (Dtype::F64, |v| ((v as f64).to_le_bytes().to_vec(), v)),
            (Dtype::F16, |v| {
                let h = half::f16::from_f32(v);
                (h.to_le_bytes().to_vec(), h.to_f32())
            }),
            (Dtype::BF16, |v| {
                let h = half::bf16::from_f32(v);
                (h.to_le_bytes().to_vec(), h.to_f32())
            }),
        ];
        for (rows, cols) in [
            (70, 33),
            (1, 5),
            (5, 1),
            (32, 64),
            (0, 3),
            (3, 0),
            (300, 47),
        ] {
            let m: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.75).collect();
            for (dtype, encode) in &encodings {
                let (bytes, stored): (Vec<Vec<u8>>, Vec<f32>) =
                    m.iter().map(|&v| encode(v)).unzip();
                let want: Vec<f32> = (0..rows * cols)
                    .map(|i| stored[(i % rows) * cols + i / rows])
                    .collect();
                let got = decode_f32_transposed(dtype, &bytes.concat(), rows, cols).unwrap();
                assert_eq!(got, want, "{} [{rows}, {cols}]", dtype.name());
            }
        }
        // Stored f32 need not be 4-byte aligned in the map.
        let m: Vec<f32> = (0..37 * 19).map(|i| i as f32 - 100.0).collect();
        let mut bytes = vec![0u8];
        bytes.extend(m.iter().flat_map(|v| v.to_le_bytes()));
        let want: Vec<f32> = (0..37 * 19).map(|i| m[(i % 37) * 19 + i / 37]).collect();
        assert_eq!(
            decode_f32_transposed(&Dtype::F32, &bytes[1..], 37, 19).unwrap(),
            want
        );
        assert!(decode_f32_transposed(&Dtype::Other("I64".into()), &[0; 16], 2, 1).is_none());
        // A trailing partial element is not a value.
        assert_eq!(
            decode_f32(&Dtype::F32, &f32_bytes[..9]).unwrap(),
            &vals[..2]
        );
    }

    #[test]
    fn roundtrip_all_float_dtypes_and_raw_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let vals = [1.0f32, -2.5, 0.333_333_34, 65504.0];
        let raw: Vec<u8> = (0i64..3).flat_map(|v| v.to_le_bytes()).collect();
        let tensors = vec![
            OutTensor {
                name: "a".into(),
                dtype: Dtype::F32,
                shape: vec![2, 2],
                data: TensorData::F32(&vals),
            },
            OutTensor {
                name: "b".into(),
                dtype: Dtype::F16,
                shape: vec![4],
                data: TensorData::F32(&vals),
            },
            OutTensor {
                name: "c".into(),
                dtype: Dtype::BF16,
                shape: vec![4],
                data: TensorData::F32(&vals),
            },
            OutTensor {
                name: "ids".into(),
                dtype: Dtype::Other("I64".into()),
                shape: vec![3],
                data: TensorData::Raw(&raw),
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_file(&path, &tensors, &meta).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.metadata()["format"], "pt");
        assert_eq!(f.to_f32("a").unwrap(), vals);
        assert_eq!(f.to_f32("b").unwrap(), vec![1.0, -2.5, 0.33325195, 65504.0]);
        assert_eq!(f.to_f32("c").unwrap(), vec![1.0, -2.5, 0.33398438, 65536.0]);
        assert_eq!(f.bytes("ids").unwrap(), &raw[..]);
        assert!(f
            .to_f32("ids")
            .unwrap_err()
            .to_string()
            .contains("non-float dtype I64"));
        assert!(f
            .to_f32("zz")
            .unwrap_err()
            .to_string()
            .contains("missing tensor `zz`"));
    }

    #[test]
    fn truncated_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("not a valid safetensors file"),
            "{err}"
        );
    }
}
