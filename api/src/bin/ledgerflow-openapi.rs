//! Writes the public and admin OpenAPI specs into a directory (default
//! `api/openapi`): `public.json` and `admin.json`. Run by `cargo xtask openapi`;
//! `api/tests/openapi.rs` fails when the committed copies are stale.
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi")));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("error: creating {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, spec) in [
        ("public.json", ledgerflow_api::public_spec()),
        ("admin.json", ledgerflow_api::admin_spec()),
    ] {
        let path = dir.join(name);
        let text = if spec.ends_with('\n') {
            spec
        } else {
            spec + "\n"
        };
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
