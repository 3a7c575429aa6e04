//! Model inputs: pre-tokenised text (JSON Lines) and pixel tensors (safetensors), the seeded
//! sample selection, and batching with the padding rule of each Gram mode.

use rayon::prelude::*;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::model::Batch;

/// A data set of one task.
pub enum Dataset {
    /// Unpadded token sequences.
    Tokens {
        path: PathBuf,
        sequences: Vec<Vec<u32>>,
    },
    /// A memory-mapped `pixel_values [N, C, H, W]` tensor.
    Pixels {
        file: SafetensorsFile,
        n: usize,
        per_example: usize,
        shape: [usize; 3],
    },
}

impl Dataset {
    /// Opens `.jsonl` text or a `.safetensors` pixel tensor, by extension.
    pub fn open(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") | Some("json") => read_jsonl(path),
            Some("safetensors") => read_pixels(path),
            _ => Err(Error::file(
                path,
                "unknown data format: expected .jsonl (token ids) or .safetensors (pixel_values)",
            )),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Dataset::Tokens { sequences, .. } => sequences.len(),
            Dataset::Pixels { n, .. } => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        match self {
            Dataset::Tokens { path, .. } => path,
            Dataset::Pixels { file, .. } => file.path(),
        }
    }
}

fn read_jsonl(path: &Path) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(&text, path)
}

/// Token data from JSON Lines text; `path` names the source in errors.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Dataset> {
    let mut sequences = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = |msg: String| Error::file(path, format!("line {}: {msg}", i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
        let ids = v
            .get("input_ids")
            .and_then(|x| x.as_array())
            .ok_or_else(|| {
                at("no `input_ids` array (text fields need a tokenizer; give token ids)".into())
            })?;
        let mut seq = Vec::with_capacity(ids.len());
        for x in ids {
            let id = x
                .as_u64()
                .filter(|&id| id <= u32::MAX as u64)
                .ok_or_else(|| at(format!("token id {x} is not a non-negative integer")))?;
            seq.push(id as u32);
        }
        if let Some(mask) = v.get("attention_mask") {
            let mask = mask
                .as_array()
                .ok_or_else(|| at("`attention_mask` is not an array".into()))?;
            if mask.len() != seq.len() {
                return Err(at(format!(
                    "attention_mask has {} entries for {} ids",
                    mask.len(),
                    seq.len()
                )));
            }
            let bits: Vec<u64> = mask.iter().map(|m| m.as_u64().unwrap_or(2)).collect();
            let real = bits.iter().take_while(|&&b| b == 1).count();
            if bits[real..].iter().any(|&b| b != 0) {
                return Err(at(
                    "attention_mask must be 1s followed by 0s (right padding)".into(),
                ));
            }
            seq.truncate(real);
        }
        if seq.is_empty() {
            return Err(at("empty sequence".into()));
        }
        sequences.push(seq);
    }
    if sequences.is_empty() {
        return Err(Error::file(path, "no examples"));
    }
    Ok(Dataset::Tokens {
        path: path.to_path_buf(),
        sequences,
    })
}

fn read_pixels(path: &Path) -> Result<Dataset> {
    let file = SafetensorsFile::open(path)?;
    let e = file.entry("pixel_values")?;
    if !e.dtype.is_float() {
        return Err(Error::file(
            path,
            format!(
                "`pixel_values` has dtype {}, expected a float type",
                e.dtype.name()
            ),
        ));
    }
    let [n, c, h, w] = e.shape[..] else {
        return Err(Error::file(
            path,
            format!(
                "`pixel_values` has shape {:?}, expected [N, C, H, W]",
                e.shape
            ),
        ));
    };
    if n == 0 {
        return Err(Error::file(path, "no examples"));
    }
    Ok(Dataset::Pixels {
        n,
        per_example: c * h * w,
        shape: [c, h, w],
        file,
    })
}

/// Which examples are used and how they are batched.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub num_examples: usize,
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// FusionBench: whole batches are drawn until at least `num_examples` were seen.
    pub whole_batches: bool,
}

/// A deterministic generator (SplitMix64): the order of a seeded shuffle never depends on a
/// library version.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (multiply-shift; bias below 2⁻⁶⁴·n).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

/// The example indices to use, in order; a warning when fewer exist than requested.
pub fn select(available: usize, s: &Sampling) -> (Vec<usize>, Option<String>) {
    let mut order: Vec<usize> = (0..available).collect();
    if s.shuffle {
        let mut rng = SplitMix64(s.seed);
        for i in (1..available).rev() {
            order.swap(i, rng.below(i + 1));
        }
    }
    let wanted = if s.whole_batches {
        s.num_examples.div_ceil(s.batch_size) * s.batch_size
    } else {
        s.num_examples
    };
    let warning = (available < s.num_examples).then(|| {
        format!(
            "only {available} examples available, {} requested: using {available}",
            s.num_examples
        )
    });
    order.truncate(wanted.min(available));
    (order, warning)
}

/// How token sequences are padded into a batch.
#[derive(Clone, Copy, Debug)]
pub struct TextPadding {
    pub pad_id: u32,
    pub max_length: usize,
    /// FusionBench: every sequence padded to `max_length`. Otherwise to the batch's longest.
    pub to_max_length: bool,
}

/// Builds the batch of the given examples. Sequences longer than `max_length` are truncated.
pub fn make_batch(data: &Dataset, indices: &[usize], padding: TextPadding) -> Result<Batch> {
    match data {
        Dataset::Tokens { sequences, .. } => {
            let seqs: Vec<&[u32]> = indices
                .iter()
                .map(|&i| &sequences[i][..sequences[i].len().min(padding.max_length)])
                .collect();
            let seq = if padding.to_max_length {
                padding.max_length
            } else {
                seqs.iter().map(|s| s.len()).max().unwrap_or(0)
            };
            let mut ids = vec![padding.pad_id; seqs.len() * seq];
            let mut mask = vec![0u8; seqs.len() * seq];
            for (b, s) in seqs.iter().enumerate() {
                ids[b * seq..b * seq + s.len()].copy_from_slice(s);
                mask[b * seq..b * seq + s.len()].fill(1);
            }
            Ok(Batch::Tokens {
                ids,
                mask,
                batch: seqs.len(),
                seq,
            })
        }
        Dataset::Pixels {
            file, per_example, ..
        } => {
            // Decode only the examples used: the tensor stays memory-mapped.
            let dtype = &file.entry("pixel_values")?.dtype;
            let size = dtype.float_size().expect("checked at open");
            let bytes = file.bytes("pixel_values")?;
            // One image per task: decoding is memory-bound and the images are independent.
            let images: Vec<Vec<f32>> = indices
                .par_iter()
                .map(|&i| {
                    let range = i * per_example * size..(i + 1) * per_example * size;
                    crate::io::safetensors::decode_f32(dtype, &bytes[range]).expect("float dtype")
                })
                .collect();
            let values = images.concat();
            if let Some(bad) = values.par_iter().position_first(|v| !v.is_finite()) {
                return Err(Error::file(
                    file.path(),
                    format!("pixel_values holds a non-finite value at element {bad} of the batch"),
                ));
            }
            Ok(Batch::Pixels {
                values,
                batch: indices.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(n: usize, bs: usize, whole: bool, shuffle: bool) -> Sampling {
        Sampling {
            num_examples: n,
            batch_size: bs,
            shuffle,
            seed: 7,
            whole_batches: whole,
        }
    }

    #[test]
    fn fusionbench_selection_overshoots_to_whole_batches() {
        assert_eq!(
            select(16, &sampling(10, 4, true, false)).0,
            (0..12).collect::<Vec<_>>()
        );
        assert_eq!(
            select(16, &sampling(10, 4, false, false)).0,
            (0..10).collect::<Vec<_>>()
        );
        let (idx, warn) = select(5, &sampling(10, 4, true, false));
        assert_eq!(idx.len(), 5);
        assert!(warn.unwrap().contains("only 5 examples"));
    }

    #[test]
    fn seeded_shuffle_is_a_reproducible_permutation() {
        let a = select(100, &sampling(100, 8, false, true)).0;
        assert_eq!(a, select(100, &sampling(100, 8, false, true)).0);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        // Pinned: the order is part of the reproducibility promise.
        assert_eq!(&a[..5], &select(100, &sampling(5, 8, false, true)).0[..]);
    }

    #[test]
    fn padding_modes() {
        let data = Dataset::Tokens {
            path: "x".into(),
            sequences: vec![vec![1, 2, 3], vec![4]],
        };
        let pad = TextPadding {
            pad_id: 9,
            max_length: 5,
            to_max_length: false,
        };
        let Batch::Tokens { ids, mask, seq, .. } = make_batch(&data, &[0, 1], pad).unwrap() else {
            panic!()
        };
        assert_eq!(
            (seq, ids, mask),
            (3, vec![1, 2, 3, 4, 9, 9], vec![1, 1, 1, 1, 0, 0])
        );
        let pad = TextPadding {
            to_max_length: true,
            max_length: 2,
            ..pad
        };
        let Batch::Tokens { ids, mask, seq, .. } = make_batch(&data, &[0, 1], pad).unwrap() else {
            panic!()
        };
        assert_eq!((seq, ids, mask), (2, vec![1, 2, 4, 9], vec![1, 1, 1, 0]));
    }
}
