//! The flaggate binary itself, for tests that drive it as operators do.

use std::process::Command;

/// `flaggate` with none of the caller's `FLAGGATE_*` or `RUST_LOG` variables: only what a test passes
/// configures it, and its log lines are the ones the test expects.
pub fn flaggate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flaggate"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FLAGGATE_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}
