//! Image data: a folder of images (class sub-folders give labels, as torchvision's
//! `ImageFolder`), decoded, converted to RGB and preprocessed as the checkpoint's
//! `preprocessor_config.json` says, the way transformers' `CLIPImageProcessor` (PIL backend)
//! does it: resize (PIL's resampling, bit for bit), centre crop, rescale, normalise.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// File extensions read from an image folder (lower-cased); the format itself is recognised
/// from the file's content.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// The OpenAI CLIP normalisation, `CLIPImageProcessor`'s default (the published digits,
/// rounded to f32 as transformers' normalisation does).
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// PIL's resampling filters (the `resample` integers of a preprocessor config).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resample {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    fn from_pil(code: u64) -> Option<Self> {
        Some(match code {
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    /// The filter's support radius at scale 1, as PIL defines it.
    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let sinc = |x: f64| {
            if x == 0.0 {
                1.0
            } else {
                let p = x * std::f64::consts::PI;
                p.sin() / p
            }
        };
        match self {
            Resample::Box => {
                if (-0.5..0.5).contains(&x) {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => (1.0 - x.abs()).max(0.0),
            Resample::Hamming => {
                let x = x.abs();
                if x >= 1.0 {
                    0.0
                } else if x == 0.0 {
                    1.0
                } else {
                    let p = x * std::f64::consts::PI;
                    p.sin() / p * (0.54 + 0.46 * p.cos())
                }
            }
            // Keys' cubic with a = −0.5 (Catmull-Rom), PIL's BICUBIC.
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// How images become pixel values (`CLIPImageProcessor`'s fields; its defaults when absent).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub do_resize: bool,
    /// Resize target: the shortest edge, or an exact (height, width).
    pub size: ResizeTo,
    pub resample: Resample,
    pub do_center_crop: bool,
    pub crop: (usize, usize),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResizeTo {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

impl Default for ImageProcessor {
    fn default() -> Self {
        ImageProcessor {
            do_resize: true,
            size: ResizeTo::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
        }
    }
}

/// The fields of preprocessor_config.json we read; others (processor class names) are ignored.
#[derive(Deserialize)]
struct RawProcessorConfig {
    do_resize: Option<bool>,
    size: Option<serde_json::Value>,
    resample: Option<u64>,
    do_center_crop: Option<bool>,
    crop_size: Option<serde_json::Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    do_convert_rgb: Option<bool>,
}

/// The most pixels an image may have (PIL's `MAX_IMAGE_PIXELS` · 2, past which PIL refuses
/// a file as a decompression bomb).
const MAX_PIXELS: usize = 2 * 89_478_485;

/// The largest image side a preprocessor config may ask for.
const MAX_SIDE: usize = 8192;

impl ImageProcessor {
    /// The model directory's preprocessor_config.json, or `CLIPImageProcessor`'s defaults.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(ImageProcessor::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text, &path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawProcessorConfig = serde_json::from_str(text)
            .map_err(|e| Error::file(path, format!("invalid preprocessor config: {e}")))?;
        let bad = |msg: String| Error::file(path, msg);
        let side = |v: &serde_json::Value, key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .filter(|&x| x >= 1 && x as usize <= MAX_SIDE)
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| bad(format!("`{key}` must be an integer from 1 to {MAX_SIDE}"))),
            }
        };
        let d = ImageProcessor::default();
        let size = match &raw.size {
            None => d.size,
            Some(serde_json::Value::Number(n)) => ResizeTo::ShortestEdge(
                side(&serde_json::json!({ "size": n }), "size")?.expect("a number"),
            ),
            Some(v) => match (
                side(v, "shortest_edge")?,
                side(v, "height")?,
                side(v, "width")?,
            ) {
                (Some(s), _, _) => ResizeTo::ShortestEdge(s),
                (None, Some(height), Some(width)) => ResizeTo::Exact { height, width },
                _ => {
                    return Err(bad(format!(
                        "`size` {v} has neither `shortest_edge` nor `height` and `width`"
                    )))
                }
            },
        };
        let crop = match &raw.crop_size {
            None => d.crop,
            Some(serde_json::Value::Number(n)) => {
                let s =
                    side(&serde_json::json!({ "crop_size": n }), "crop_size")?.expect("a number");
                (s, s)
            }
            Some(v) => match (side(v, "height")?, side(v, "width")?) {
                (Some(h), Some(w)) => (h, w),
                _ => return Err(bad(format!("`crop_size` {v} needs `height` and `width`"))),
            },
        };
        let resample = match raw.resample {
            None => d.resample,
            Some(code) => Resample::from_pil(code).ok_or_else(|| {
                bad(format!(
                    "`resample` {code} is not supported (1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"
                ))
            })?,
        };
        let triple = |v: Option<Vec<f32>>, default: [f32; 3], key: &str| -> Result<[f32; 3]> {
            match v {
                None => Ok(default),
                Some(v) if v.len() == 3 && v.iter().all(|x| x.is_finite()) => {
                    Ok([v[0], v[1], v[2]])
                }
                Some(v) => Err(bad(format!(
                    "`{key}` must be 3 finite numbers, found {v:?}"
                ))),
            }
        };
        let std = triple(raw.image_std, d.std, "image_std")?;
        if std.contains(&0.0) {
            return Err(bad("`image_std` has a zero".into()));
        }
        if raw.do_convert_rgb == Some(false) {
            return Err(bad(
                "`do_convert_rgb: false` is not supported: images are always converted to RGB"
                    .into(),
            ));
        }
        let p = ImageProcessor {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size,
            resample,
            do_center_crop: raw.do_center_crop.unwrap_or(d.do_center_crop),
            crop,
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            mean: triple(raw.image_mean, d.mean, "image_mean")?,
            std,
        };
        if p.output_size().is_none() {
            return Err(bad(
                "without `do_center_crop` the output size depends on the image: give `size` as height and width".into(),
            ));
        }
        Ok(p)
    }

    /// (height, width) of every output, when it does not depend on the input.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        match (self.do_center_crop, self.do_resize, self.size) {
            (true, _, _) => Some(self.crop),
            (false, true, ResizeTo::Exact { height, width }) => Some((height, width)),
            _ => None,
        }
    }

    /// (height, width) after the resize step, as transformers computes it.
    fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.size {
            ResizeTo::Exact { height, width } => (height, width),
            ResizeTo::ShortestEdge(s) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python's int(size * long / short): truncation of the float quotient.
                let new_long = (s as f64 * long as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// An RGB image (`[H, W, 3]` bytes) after resize and crop, before rescaling: `[3, H, W]`.
    pub fn resize_and_crop(
        &self,
        rgb: &[u8],
        height: usize,
        width: usize,
    ) -> (Vec<u8>, usize, usize) {
        let (mut img, mut h, mut w) = (rgb.to_vec(), height, width);
        if self.do_resize {
            let (nh, nw) = self.resized_size(h, w);
            img = resample(&img, w, h, nw, nh, self.resample);
            (h, w) = (nh, nw);
        }
        if self.do_center_crop {
            (img, h, w) = center_crop(&img, h, w, self.crop);
        }
        let mut chw = vec![0u8; 3 * h * w];
        for (p, px) in img.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * h * w + p] = px[c];
            }
        }
        (chw, h, w)
    }

    /// Pixel values `[3, H, W]` of one image file.
    pub fn process_file(&self, path: &Path) -> Result<Vec<f32>> {
        let (rgb, h, w) = decode_rgb(path)?;
        if self.do_resize {
            // A thin image (1 × 100 000 pixels is a small file) resized to a shortest edge
            // of 224 would need gigabytes: refuse it before allocating.
            let (nh, nw) = self.resized_size(h, w);
            if nh.saturating_mul(nw) > MAX_PIXELS {
                return Err(Error::file(
                    path,
                    format!(
                        "cannot preprocess the image: resizing {w}×{h} pixels gives {nw}×{nh}, over the limit of {MAX_PIXELS} pixels"
                    ),
                ));
            }
        }
        let (chw, oh, ow) = self.resize_and_crop(&rgb, h, w);
        let plane = oh * ow;
        Ok(chw
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let mut x = if self.do_rescale {
                    (v as f64 * self.rescale_factor) as f32
                } else {
                    v as f32
                };
                if self.do_normalize {
                    let c = i / plane;
                    x = (x - self.mean[c]) / self.std[c];
                }
                x
            })
            .collect())
    }
}

/// Decodes an image file (format from its content) into RGB bytes `[H, W, 3]`. Transparency
/// is composited onto white, as transformers' `convert_to_rgb` does.
pub fn decode_rgb(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (rgb, h, w) = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(&bytes, path)?
    } else {
        decode_other(&bytes, path)?
    };
    if w == 0 || h == 0 {
        return Err(Error::file(path, "the image is empty (0 pixels)"));
    }
    Ok((rgb, h, w))
}

/// JPEG through libjpeg-turbo (the `mozjpeg` build of it), with libjpeg's defaults (integer
/// IDCT, fancy upsampling), as PIL decodes: the same pixels as transformers sees.
fn decode_jpeg(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let fail = |e: String| Error::file(path, format!("cannot decode the image: {e}"));
    // libjpeg reports a fatal error by unwinding out of its callback (mozjpeg's documented
    // error channel, which bypasses the panic hook): catch it and turn it into an error.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<_> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        if d.width().saturating_mul(d.height()) > MAX_PIXELS {
            return Ok(Err(format!(
                "{}×{} pixels exceed the limit of {MAX_PIXELS} (PIL's decompression-bomb limit)",
                d.width(),
                d.height()
            )));
        }
        if matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
        ) {
            return Ok(Err(
                "CMYK JPEG is not supported: convert the image to RGB".into()
            ));
        }
        let mut image = d.rgb()?;
        let (w, h) = (image.width(), image.height());
        let rgb = image.read_scanlines::<u8>()?;
        image.finish()?;
        Ok(Ok((rgb, h, w)))
    });
    match decoded {
        Ok(Ok(Ok((rgb, h, w)))) if rgb.len() == w * h * 3 => Ok((rgb, h, w)),
        Ok(Ok(Ok(_))) => Err(fail("truncated JPEG data".into())),
        Ok(Ok(Err(msg))) => Err(fail(msg)),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(payload) => Err(fail(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg failed".into()),
        )),
    }
}

fn decode_other(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))
    };
    // The header first: a decompression bomb is refused before any allocation.
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| Error::file(path, format!("cannot decode the image: {e}")))?;
    if (w as usize).saturating_mul(h as usize) > MAX_PIXELS {
        return Err(Error::file(
            path,
            format!("cannot decode the image: {w}×{h} pixels exceed the limit of {MAX_PIXELS} (PIL's decompression-bomb limit)"),
        ));
    }
    let img = reader()?
        .decode()
        .map_err(|e| Error::file(path, format!("cannot decode the image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let rgb = if img.color().has_alpha() {
        img.to_rgba8()
            .pixels()
            .flat_map(|p| {
                let a = p[3] as u32;
                // src·a + white·(255 − a), rounded, over 255 (PIL's alpha_composite on white).
                std::array::from_fn::<u8, 3, _>(|c| {
                    ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8
                })
            })
            .collect()
    } else {
        img.to_rgb8().into_raw()
    };
    Ok((rgb, h, w))
}

/// PIL's fixed-point precision of 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The taps of one output pixel: first input index and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: the filter widened by the scale
/// factor when downscaling (antialiasing), weights normalised to sum 1, then fixed point.
fn coefficients(in_size: usize, out_size: usize, filter: Resample) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero; negatives clamp to 0 below anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let k: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = k.iter().sum();
            let one = (1u64 << PRECISION_BITS) as f64;
            let weights = k
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps {
                first: xmin,
                weights,
            }
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `[H, W, 3]` bytes as PIL's `Image.resize` does: a horizontal and a vertical pass,
/// each rounded to 8 bits, vertical first when the height shrinks by more than twice as many
/// pixels as the width (Pillow ≥ 13; the order changes the rounding).
pub fn resample(
    src: &[u8],
    w: usize,
    h: usize,
    new_w: usize,
    new_h: usize,
    filter: Resample,
) -> Vec<u8> {
    let (dh, dw) = (h as i64 - new_h as i64, w as i64 - new_w as i64);
    let vertical_first = dh > 0 && dh > 2 * dw;
    let mut cur = src.to_vec();
    if vertical_first {
        if new_h != h {
            cur = resample_vertical(&cur, w, h, new_h, filter);
        }
        if new_w != w {
            cur = resample_horizontal(&cur, w, new_h, new_w, filter);
        }
    } else {
        if new_w != w {
            cur = resample_horizontal(&cur, w, h, new_w, filter);
        }
        if new_h != h {
            cur = resample_vertical(&cur, new_w, h, new_h, filter);
        }
    }
    cur
}

fn resample_horizontal(src: &[u8], w: usize, h: usize, new_w: usize, filter: Resample) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let taps = coefficients(w, new_w, filter);
    let mut out = vec![0u8; h * new_w * 3];
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        for (x, t) in taps.iter().enumerate() {
            for c in 0..3 {
                let mut acc = half;
                for (k, &wt) in t.weights.iter().enumerate() {
                    acc += row[(t.first + k) * 3 + c] as i64 * wt as i64;
                }
                out[(y * new_w + x) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

fn resample_vertical(src: &[u8], w: usize, h: usize, new_h: usize, filter: Resample) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let taps = coefficients(h, new_h, filter);
    let stride = w * 3;
    let mut out = vec![0u8; new_h * stride];
    for (y, t) in taps.iter().enumerate() {
        for i in 0..stride {
            let mut acc = half;
            for (k, &wt) in t.weights.iter().enumerate() {
                acc += src[(t.first + k) * stride + i] as i64 * wt as i64;
            }
            out[y * stride + i] = clip8(acc);
        }
    }
    out
}

/// transformers' `center_crop`: `top = (h − crop_h) // 2`; an image smaller than the crop is
/// first zero-padded around its centre.
fn center_crop(
    img: &[u8],
    h: usize,
    w: usize,
    (ch, cw): (usize, usize),
) -> (Vec<u8>, usize, usize) {
    let (nh, nw) = (h.max(ch), w.max(cw));
    let (pad_top, pad_left) = ((nh - h).div_ceil(2), (nw - w).div_ceil(2));
    // Python's floor division of a possibly negative difference, shifted by the padding.
    let top = (h as i64 - ch as i64).div_euclid(2) + pad_top as i64;
    let left = (w as i64 - cw as i64).div_euclid(2) + pad_left as i64;
    let mut out = vec![0u8; ch * cw * 3];
    for y in 0..ch {
        for x in 0..cw {
            let (sy, sx) = (
                y as i64 + top - pad_top as i64,
                x as i64 + left - pad_left as i64,
            );
            if (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx) {
                let s = (sy as usize * w + sx as usize) * 3;
                out[(y * cw + x) * 3..(y * cw + x) * 3 + 3].copy_from_slice(&img[s..s + 3]);
            }
        }
    }
    (out, ch, cw)
}

/// The image files of a folder in torchvision `ImageFolder` order, with labels: class
/// sub-folders sorted by name (each searched recursively), files sorted within a folder.
/// A folder without sub-folders is one unlabelled class.
pub struct ImageFolder {
    pub files: Vec<PathBuf>,
    pub labels: Vec<usize>,
    pub classes: Vec<String>,
}

impl ImageFolder {
    pub fn scan(root: &Path) -> Result<Self> {
        let entries = read_dir_sorted(root)?;
        let class_dirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
        let mut files = Vec::new();
        let mut labels = Vec::new();
        let mut classes = Vec::new();
        if class_dirs.is_empty() {
            collect_images(root, &mut files)?;
            labels = vec![0; files.len()];
        } else {
            for (label, dir) in class_dirs.iter().enumerate() {
                let before = files.len();
                collect_images(dir, &mut files)?;
                labels.resize(labels.len() + files.len() - before, label);
                classes.push(
                    dir.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        if files.is_empty() {
            return Err(Error::file(
                root,
                format!(
                    "no images ({}) in this folder or its class sub-folders",
                    IMAGE_EXTENSIONS.join(", ")
                ),
            ));
        }
        Ok(ImageFolder {
            files,
            labels,
            classes,
        })
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

/// Image files under `dir`: this folder's, sorted, then each sub-folder's in sorted order.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = read_dir_sorted(dir)?;
    for p in &entries {
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if p.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
            out.push(p.clone());
        }
    }
    for p in entries.iter().filter(|p| p.is_dir()) {
        collect_images(p, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_sizes_truncate_like_python() {
        let p = ImageProcessor::default();
        assert_eq!(p.resized_size(300, 451), (224, 336)); // int(224 * 451 / 300) = 336
        assert_eq!(p.resized_size(130, 97), (300, 224));
        assert_eq!(p.resized_size(50, 50), (224, 224));
    }

    #[test]
    fn identity_resize_and_weights_sum_to_one() {
        let img: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resample(&img, 5, 4, 5, 4, Resample::Bicubic), img);
        for (i, o) in [(451, 224), (97, 224), (40, 7)] {
            for t in coefficients(i, o, Resample::Bicubic) {
                let s: i64 = t.weights.iter().map(|&w| w as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64,
                    "{s}"
                );
            }
        }
        // A constant image stays constant through down- and up-scaling.
        let flat = vec![77u8; 31 * 17 * 3];
        assert!(resample(&flat, 31, 17, 8, 40, Resample::Bicubic)
            .iter()
            .all(|&v| v == 77));
    }

    #[test]
    fn center_crop_offsets_follow_transformers() {
        // 5 wide, crop 2: left = (5 - 2) // 2 = 1.
        let img: Vec<u8> = (0..5u8).flat_map(|x| [x, x, x]).collect();
        let (out, _, _) = center_crop(&img, 1, 5, (1, 2));
        assert_eq!(out, vec![1, 1, 1, 2, 2, 2]);
        // Smaller than the crop: zero-padded, the image centred (ceil of half the padding first).
        let (out, _, _) = center_crop(&[9, 9, 9], 1, 1, (1, 2));
        assert_eq!(out, vec![0, 0, 0, 9, 9, 9]);
    }
}
