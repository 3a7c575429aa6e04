//! What a merge is given besides its config and its backend (which is where it computes):
//! how to write, how much host memory it may hold.

pub struct MergeOptions {
    /// Largest shard written, in bytes.
    pub out_shard_bytes: u64,
    /// Replace an existing output directory.
    pub force: bool,
    /// Host memory the activation caches of a layer-wise merge may hold before they spill to
    /// a file, and the cap `schedule: auto` chooses by; None: half of what is available.
    pub max_memory: Option<u64>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            out_shard_bytes: 5_000_000_000,
            force: false,
            max_memory: None,
        }
    }
}
