//! What a forward pass hands out besides its result: every site's input (to a Gram sink) and,
//! when asked, every hidden state.

use crate::backend::Backend;
use crate::error::Result;

/// Receives the input of every site during a forward pass.
pub trait GramSink<B: Backend> {
    /// `row_mask` marks real (non-padding) rows; None when every row is real.
    fn observe(&mut self, site: usize, x: &B::Tensor, row_mask: Option<&[u8]>) -> Result<()>;
}

/// What a forward pass returns.
pub struct ForwardOutput<B: Backend> {
    /// GPT-2: after `ln_f`; CLIP: the encoder's last hidden state (`last_hidden_state`).
    pub last_hidden: B::Tensor,
    /// CLIP: `post_layernorm` of the class token (`pooler_output`).
    pub pooled: Option<B::Tensor>,
}

/// Options of one forward pass.
pub struct ForwardHooks<'a, B: Backend> {
    pub grams: Option<&'a mut dyn GramSink<B>>,
    /// Receives every hidden state as transformers' `output_hidden_states` lists them.
    pub hidden_states: Option<&'a mut Vec<Vec<f32>>>,
}

impl<B: Backend> ForwardHooks<'_, B> {
    /// Hands a hidden state to `hidden_states`, when asked for.
    pub(crate) fn record(&mut self, backend: &B, t: &B::Tensor) -> Result<()> {
        if let Some(h) = self.hidden_states.as_deref_mut() {
            h.push(backend.download(t)?);
        }
        Ok(())
    }
}

impl<B: Backend> Default for ForwardHooks<'_, B> {
    fn default() -> Self {
        ForwardHooks {
            grams: None,
            hidden_states: None,
        }
    }
}
