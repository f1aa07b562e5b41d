//! `amazing-proxy webhook`: sidecar injection as a mutating admission webhook. (Being written.)

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct WebhookArgs {}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {}

pub fn main(_args: WebhookArgs) -> Result<(), WebhookError> {
    Ok(())
}
