//! Small helpers for running subprocesses from xtask (echo, status checks, PATH lookup).

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The workspace root (the parent of `xtask/`), so subcommands work from any directory.
pub fn workspace_root() -> &'static Path {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir)
}

/// A `cargo` command: the cargo that launched `cargo xtask` if known, else the one on `PATH`.
/// It runs in the workspace root.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// Renders a command for logs: `program arg arg`, without its environment (which may hold
/// passwords) and with any URL password masked.
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or_else(|| cmd.get_program())
        .to_string_lossy()
        .into_owned();
    std::iter::once(program)
        .chain(
            cmd.get_args()
                .map(|a| quote(&redact_url(&a.to_string_lossy()))),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%*".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Masks the password of a `scheme://user:password@host/...` URL (other text is returned as is).
pub fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_string();
    };
    let rest = &s[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return s.to_string();
    };
    let Some(colon) = rest[..at].find(':') else {
        return s.to_string();
    };
    format!(
        "{}{}:***{}",
        &s[..scheme_end + 3],
        &rest[..colon],
        &rest[at..]
    )
}

/// Runs `cmd` with inherited stdio, echoing it first; fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly (stdin closed) and returns its output, whatever its exit status.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` quietly and returns its trimmed stdout; fails (with its stderr) on a non-zero exit.
pub fn read(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The full path of `program` if it is an executable file in a `PATH` directory.
pub fn which(program: impl AsRef<OsStr>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program.as_ref()))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True when this process runs as root (and so may install packages).
pub fn is_root() -> Result<bool> {
    Ok(read(Command::new("id").arg("-u"))? == "0")
}

/// Installs Debian `packages` with apt-get, non-interactively, after updating the package
/// lists (a fresh machine may have none). The caller checks [`is_root`] first, with its own
/// advice for a developer who is not.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    for args in [
        &["update"][..],
        &[&["install", "-y"][..], packages].concat()[..],
    ] {
        run(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()))?;
    }
    Ok(())
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to `root` when
/// relative) or `root/target`.
pub fn target_dir(root: &std::path::Path) -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_url_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@127.0.0.1:5432/db"),
            "postgres://u:***@127.0.0.1:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h:5432/db"), "postgres://h:5432/db");
        assert_eq!(redact_url("select 1"), "select 1");
    }

    #[test]
    fn displays_commands_shell_quoted() {
        let mut cmd = Command::new("/usr/bin/psql");
        cmd.args(["-c", "select 1", "--dbname=postgres://u:p@h/d"]);
        assert_eq!(
            display(&cmd),
            "psql -c 'select 1' --dbname=postgres://u:***@h/d"
        );
    }
}
