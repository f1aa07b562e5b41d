//! `amazing-proxy init`: the pod's traffic redirection rules. (Being written.)

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct InitArgs {}

#[derive(Debug, thiserror::Error)]
pub enum InitError {}

pub fn main(_args: InitArgs) -> Result<(), InitError> {
    Ok(())
}
