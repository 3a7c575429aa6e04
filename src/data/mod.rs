//! Model inputs: text or token ids (JSON Lines), image folders and pixel tensors
//! (safetensors), the seeded sample selection, and batching with the padding rule of each
//! Gram mode.

pub mod chat;
pub mod image;
pub mod text;

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
    /// A folder of image files, decoded and preprocessed batch by batch.
    Images {
        root: PathBuf,
        files: Vec<PathBuf>,
        processor: image::ImageProcessor,
        shape: [usize; 3],
    },
}

/// A data set with what evaluation needs besides the inputs.
pub struct Labelled {
    pub data: Dataset,
    /// One label per example, when every example has one.
    pub labels: Option<Vec<usize>>,
    /// Class names of an image folder's sub-folders (label order); empty otherwise.
    pub classes: Vec<String>,
}

impl Dataset {
    /// Opens `.jsonl` token ids or a `.safetensors` pixel tensor, by extension; an image
    /// folder is preprocessed with `CLIPImageProcessor`'s defaults. Text needs a model's
    /// tokenizer: see [`Dataset::open_for_model`].
    pub fn open(path: &Path) -> Result<Self> {
        Ok(open_labelled(path, &[], usize::MAX)?.data)
    }

    /// Opens data for a model: text is tokenised with the tokenizer.json of the first of
    /// `model_dirs` that has one (truncated to `max_length` tokens), an image folder
    /// preprocessed as the first preprocessor_config.json found says (defaults if none).
    pub fn open_for_model(path: &Path, model_dirs: &[&Path], max_length: usize) -> Result<Self> {
        Ok(open_labelled(path, model_dirs, max_length)?.data)
    }

    pub fn len(&self) -> usize {
        match self {
            Dataset::Tokens { sequences, .. } => sequences.len(),
            Dataset::Pixels { n, .. } => *n,
            Dataset::Images { files, .. } => files.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        match self {
            Dataset::Tokens { path, .. } => path,
            Dataset::Pixels { file, .. } => file.path(),
            Dataset::Images { root, .. } => root,
        }
    }
}

/// The first of `dirs` holding `file`, else the first of `dirs`.
fn dir_with<'a>(dirs: &[&'a Path], file: &str) -> Option<&'a Path> {
    dirs.iter()
        .find(|d| d.join(file).is_file())
        .or(dirs.first())
        .copied()
}

/// Opens a data set with its labels (see [`Dataset::open_for_model`]; no `model_dirs`: no
/// tokenizer, default image preprocessing).
pub fn open_labelled(path: &Path, model_dirs: &[&Path], max_length: usize) -> Result<Labelled> {
    if path.is_dir() {
        let folder = image::ImageFolder::scan(path)?;
        let processor = match dir_with(model_dirs, "preprocessor_config.json") {
            Some(dir) => image::ImageProcessor::from_model_dir(dir)?,
            None => image::ImageProcessor::default(),
        };
        let (h, w) = processor.output_size().expect("checked when read");
        let labels = (!folder.classes.is_empty()).then_some(folder.labels);
        return Ok(Labelled {
            data: Dataset::Images {
                root: path.to_path_buf(),
                files: folder.files,
                processor,
                shape: [3, h, w],
            },
            labels,
            classes: folder.classes,
        });
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => {
            read_jsonl(path, dir_with(model_dirs, "tokenizer.json"), max_length)
        }
        Some("safetensors") => Ok(Labelled {
            data: read_pixels(path)?,
            labels: None,
            classes: Vec::new(),
        }),
        _ if !path.exists() => Err(Error::file(path, "no such file or folder")),
        _ => Err(Error::file(
            path,
            "unknown data format: expected .jsonl (text or token ids), .safetensors (pixel_values) or a folder of images",
        )),
    }
}

fn read_jsonl(path: &Path, model_dir: Option<&Path>, max_length: usize) -> Result<Labelled> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_lines(&text, path, model_dir, max_length)
}

/// Token data from JSON Lines text with `input_ids`; `path` names the source in errors.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Dataset> {
    Ok(parse_lines(text, path, None, usize::MAX)?.data)
}

/// One line of a JSON Lines file before tokenisation.
enum Line {
    Ids(Vec<u32>),
    Text(String, Option<String>),
    /// Chat turns, rendered with the model's chat template.
    Chat(serde_json::Value),
}

/// JSON Lines of token ids or text; text is tokenised with `model_dir`'s tokenizer.json,
/// truncated to `max_length` tokens.
fn parse_lines(
    text: &str,
    path: &Path,
    model_dir: Option<&Path>,
    max_length: usize,
) -> Result<Labelled> {
    let mut lines = Vec::new();
    let mut labels = Vec::new();
    let mut numbers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = |msg: String| Error::file(path, format!("line {}: {msg}", i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
        labels.push(match v.get("label") {
            None | Some(serde_json::Value::Null) => None,
            Some(l) => Some(
                l.as_u64()
                    .filter(|&l| l <= u32::MAX as u64)
                    .ok_or_else(|| at(format!("`label` {l} is not a non-negative integer")))?
                    as usize,
            ),
        });
        numbers.push(i + 1);
        if let Some(ids) = v.get("input_ids") {
            let ids = ids
                .as_array()
                .ok_or_else(|| at("`input_ids` is not an array".into()))?;
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
            lines.push(Line::Ids(seq));
        } else if let Some(messages) = v.get("messages") {
            if messages.as_array().is_none_or(|m| m.is_empty()) {
                return Err(at("`messages` is not a non-empty array of turns".into()));
            }
            lines.push(Line::Chat(messages.clone()));
        } else {
            match text::text_fields(&v) {
                Some(Ok((a, b))) => lines.push(Line::Text(a.to_string(), b.map(str::to_string))),
                Some(Err(msg)) => return Err(at(msg)),
                None => {
                    return Err(at(
                        "no `input_ids` array, `messages`, `text`, `sentence`, or sentence pair (text_a/text_b, sentence1/sentence2, premise/hypothesis, question/sentence, question1/question2)".into(),
                    ))
                }
            }
        }
    }
    if lines.is_empty() {
        return Err(Error::file(path, "no examples"));
    }
    let needs_tokenizer = lines
        .iter()
        .any(|l| matches!(l, Line::Text(..) | Line::Chat(..)));
    let template = match (lines.iter().any(|l| matches!(l, Line::Chat(..))), model_dir) {
        (true, Some(dir)) => Some(chat::ChatTemplate::from_model_dir(dir)?),
        _ => None,
    };
    let tokenizer =
        match (needs_tokenizer, model_dir) {
            (false, _) => None,
            (true, Some(dir)) => Some(text::TextTokenizer::from_model_dir(dir, Some(max_length))?),
            (true, None) => return Err(Error::file(
                path,
                "text fields need the model's tokenizer.json; give token ids (`input_ids`) here",
            )),
        };
    use rayon::prelude::*;
    let sequences = lines
        .into_par_iter()
        .zip(numbers.par_iter())
        .map(|(line, &n)| match line {
            Line::Ids(ids) => Ok(ids),
            Line::Text(a, b) => {
                let tok = tokenizer.as_ref().expect("loaded for text lines");
                let ids = tok.encode(&a, b.as_deref())?;
                if ids.is_empty() {
                    return Err(Error::file(
                        path,
                        format!("line {n}: the text has no tokens"),
                    ));
                }
                Ok(ids)
            }
            Line::Chat(messages) => {
                let tok = tokenizer.as_ref().expect("loaded for chat lines");
                let template = template.as_ref().expect("loaded for chat lines");
                let text = template
                    .render(&messages)
                    .map_err(|e| Error::file(path, format!("line {n}: {e}")))?;
                let ids = tok.encode_plain(&text)?;
                if ids.is_empty() {
                    return Err(Error::file(
                        path,
                        format!("line {n}: the conversation has no tokens"),
                    ));
                }
                Ok(ids)
            }
        })
        .collect::<Vec<Result<_>>>()
        // In line order: the error reported is the first bad line's, whichever thread met it.
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let labels = labels.into_iter().collect::<Option<Vec<_>>>();
    Ok(Labelled {
        data: Dataset::Tokens {
            path: path.to_path_buf(),
            sequences,
        },
        labels,
        classes: Vec::new(),
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
            if let Some(bad) = crate::io::checkpoint::first_non_finite(&values) {
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
        Dataset::Images {
            files, processor, ..
        } => {
            use rayon::prelude::*;
            let images = indices
                .par_iter()
                .map(|&i| processor.process_file(&files[i]))
                .collect::<Result<Vec<_>>>()?;
            Ok(Batch::Pixels {
                values: images.concat(),
                batch: indices.len(),
            })
        }
    }
}

/// Runs `f` on the batches of `indices` in order, each batch built (decoded, preprocessed)
/// on another thread while `f` works on the one before.
pub fn for_each_batch(
    data: &Dataset,
    indices: &[usize],
    batch_size: usize,
    padding: TextPadding,
    mut f: impl FnMut(&[usize], Batch) -> Result<()>,
) -> Result<()> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        scope.spawn(move || {
            for chunk in indices.chunks(batch_size.max(1)) {
                // A closed channel means the consumer stopped (an error): stop too.
                if tx.send((chunk, make_batch(data, chunk, padding))).is_err() {
                    break;
                }
            }
        });
        for (chunk, batch) in rx {
            f(chunk, batch?)?;
        }
        Ok(())
    })
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
