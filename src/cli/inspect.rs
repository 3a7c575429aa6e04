//! `inspect`: what a checkpoint or a Gram statistics file holds.

use std::path::Path;

use regmean_gpu::Result;

pub fn inspect(path: &Path) -> Result<()> {
    use regmean_gpu::io::{Checkpoint, SafetensorsFile};
    use std::fmt::Write as _;
    let mut text = String::new();
    if path.is_dir() {
        let ckpt = Checkpoint::open(path)?;
        let _ = writeln!(
            text,
            "{}: {} checkpoint, backbone tensors (canonical names):",
            path.display(),
            ckpt.arch().title()
        );
        for name in ckpt.names() {
            let e = ckpt.entry(name)?;
            let _ = writeln!(text, "  {name:<60} {:<5} {:?}", e.dtype.name(), e.shape);
        }
    } else {
        let f = SafetensorsFile::open(path)?;
        let mut meta: Vec<_> = f.metadata().iter().collect();
        meta.sort();
        for (k, v) in meta {
            let _ = writeln!(text, "{k}: {v}");
        }
        for (name, e) in f.tensors() {
            let _ = writeln!(text, "  {name:<60} {:<5} {:?}", e.dtype.name(), e.shape);
        }
    }
    // A closed pipe (`inspect ... | head`) is not an error worth reporting.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(())
}
