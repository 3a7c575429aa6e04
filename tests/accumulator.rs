//! The Gram accumulator over a caller's rows (`accumulator`) against the merge's
//! own Grams: fed the activations the merge's forward pass hands its accumulator, batch by
//! batch with the same padding masks, it gives the merge's Grams bit for bit, in both modes.

mod common;

use common::fixtures;
use regmean_gpu::accumulator::{Accumulator, AccumulatorDevice, HostRows};
use regmean_gpu::backend::{CpuBackend, CpuTensor};
use regmean_gpu::config::MergeConfig;
use regmean_gpu::data::{select, Dataset};
use regmean_gpu::io::Checkpoint;
use regmean_gpu::model::{ForwardHooks, GramSink, Model, ModelConfig};
use regmean_gpu::progress::Silent;
use regmean_gpu::regmean::gram::{batch_of, compute_grams};

/// Every site's activation batches, as the forward pass hands them over.
#[derive(Default)]
struct Captured {
    batches: Vec<Vec<(CpuTensor, Option<Vec<u8>>)>>,
}

impl GramSink<CpuBackend> for Captured {
    fn observe(
        &mut self,
        site: usize,
        x: &CpuTensor,
        row_mask: Option<&[u8]>,
    ) -> regmean_gpu::Result<()> {
        if self.batches.len() <= site {
            self.batches.resize_with(site + 1, Vec::new);
        }
        self.batches[site].push((x.clone(), row_mask.map(<[u8]>::to_vec)));
        Ok(())
    }
}

#[test]
fn the_accumulator_gives_the_merges_grams_for_the_same_activations() {
    for config in ["default.yaml", "compat.yaml"] {
        let cfg = MergeConfig::load(&fixtures().join("gpt2_pool").join(config)).unwrap();
        let params = &cfg.parameters;
        let entry = &cfg.models[1];
        let ckpt = Checkpoint::open(&entry.model).unwrap();
        let model_cfg = ModelConfig::from_checkpoint(&ckpt).unwrap();
        let data = Dataset::open_for_model(
            entry.data.as_ref().unwrap(),
            &[ckpt.dir(), &cfg.base_model],
            params.max_length,
        )
        .unwrap();
        let merge_grams =
            compute_grams(&CpuBackend, &ckpt, &model_cfg, &data, params, &Silent).unwrap();

        let model = Model::load(&CpuBackend, &ckpt).unwrap();
        let (indices, _) = select(data.len(), &params.sampling());
        let mut captured = Captured::default();
        for chunk in indices.chunks(params.batch_size) {
            let batch = batch_of(&model_cfg, &data, params, chunk).unwrap();
            let hooks = ForwardHooks {
                grams: Some(&mut captured),
                hidden_states: None,
            };
            model.forward(&CpuBackend, &batch, hooks).unwrap();
        }
        assert_eq!(captured.batches.len(), merge_grams.sites.len(), "{config}");
        let padded = captured.batches[0].iter().any(|(_, m)| m.is_some());
        assert!(padded, "{config}: the pool's batches have padding rows");
        for (site, want) in captured.batches.iter().zip(&merge_grams.sites) {
            let mut acc =
                Accumulator::new(&AccumulatorDevice::Cpu, want.dim, params.fusionbench_compat)
                    .unwrap();
            for (x, mask) in site {
                // Compat mode counts every row: the merge drops the mask there too.
                let mask = mask.as_deref().filter(|_| !params.fusionbench_compat);
                acc.update(HostRows::F32(&x.data), x.rows, x.cols, mask)
                    .unwrap();
            }
            let got = acc.finish().unwrap();
            assert_eq!(got.rows, want.rows, "{config} {}", want.name);
            assert!(
                got.gram == want.gram,
                "{config} {}: Grams differ",
                want.name
            );
        }
    }
}
