//! The data plane in the test's own process: its flags parsed as `run` parses them, and its access
//! log captured in memory.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use amazing_proxy::config::RunArgs;
use clap::Parser;

use super::tools::json_records;
use super::{WAIT, bounded};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// `run`'s flags from `args` (without the program name), parsed and validated as `run` does.
pub fn run_args(args: &[&str]) -> RunArgs {
    let cli = Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("flags {args:?}: {e}"));
    cli.run
}

/// The access log, captured.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits (bounded) for a JSON record that satisfies `found`.
    pub async fn record(&self, found: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        bounded("the access-log record", WAIT, async {
            loop {
                if let Some(r) = json_records(&self.text()).into_iter().find(&found) {
                    return r;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
    }
}
