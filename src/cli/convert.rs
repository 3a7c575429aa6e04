//! `convert-config`: a FusionBench method YAML plus a model-pool YAML as our merge config,
//! printed or written (staged, never over an input), each item it could not map noted.

use regmean_gpu::io::{Inputs, StagedOutput};
use regmean_gpu::ui::Ui;
use regmean_gpu::{Error, Result};

use crate::ConvertArgs;

pub fn convert_command(a: &ConvertArgs, ui: &Ui) -> Result<()> {
    let converted = regmean_gpu::convert::convert(&a.method, &a.pool, &a.data_dir)?;
    for note in &converted.notes {
        ui.info(&format!("note: {note}"));
    }
    match &a.out {
        None => print!("{}", converted.yaml),
        Some(out) => {
            let mut inputs = Inputs::new();
            inputs.add("the method config", &a.method);
            inputs.add("the model-pool config", &a.pool);
            let staged = StagedOutput::create_file(out, a.force, &inputs)?;
            std::fs::write(staged.path(), &converted.yaml).map_err(|e| Error::io(out, e))?;
            staged.commit()?;
            ui.result(&format!("wrote {}", out.display()));
        }
    }
    Ok(())
}
