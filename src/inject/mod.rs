//! `amazing-proxy inject`: adds the sidecar to Kubernetes manifests. (Being written.)

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct InjectArgs {}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {}

pub fn main(_args: InjectArgs) -> Result<(), InjectError> {
    Ok(())
}
