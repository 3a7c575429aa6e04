//! A batch of model inputs on the host, as the data readers make them.

/// A batch of model inputs on the host.
#[derive(Clone, Debug)]
pub enum Batch {
    /// Token ids `[batch·seq]`, right-padded, with the attention mask (1 real, 0 padding).
    Tokens {
        ids: Vec<u32>,
        mask: Vec<u8>,
        batch: usize,
        seq: usize,
    },
    /// Pixel values `[batch, 3, H, W]`.
    Pixels { values: Vec<f32>, batch: usize },
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Batch::Tokens { batch, .. } | Batch::Pixels { batch, .. } => *batch,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
