//! The data plane. (Being written.)

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {}

pub fn main(_args: crate::config::RunArgs) -> Result<(), ProxyError> {
    Ok(())
}
