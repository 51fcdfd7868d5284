//! `cargo xtask openapi`: regenerates the committed OpenAPI specs,
//! `api/openapi/public.json` and `api/openapi/admin.json`, by running the api
//! crate's `ledgerflow-openapi` binary (the specs come from the same code
//! that serves them). `api/tests/openapi.rs` fails with "run `cargo xtask
//! openapi` and commit" when the committed copies are stale.

use crate::cmd;
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write the specs to (default: `api/openapi` in the workspace).
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
}

/// The binary's package and name.
const PACKAGE: &str = "ledgerflow-api";
const BINARY: &str = "ledgerflow-openapi";

pub fn run(args: Args) -> Result<()> {
    let out = args
        .out
        .unwrap_or_else(|| cmd::workspace_root().join("api").join("openapi"));
    let mut c = cmd::cargo();
    c.args(["run", "--quiet", "-p", PACKAGE, "--bin", BINARY, "--"])
        .arg(&out);
    cmd::run(&mut c)
}
