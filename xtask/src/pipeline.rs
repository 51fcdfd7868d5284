//! The deploy pipeline's own checks, for `cargo xtask test`: the GitHub workflows linted
//! with `actionlint`, and the image's binary built by the Dockerfile's own build commands,
//! run outside Docker (this machine has no Docker engine).
//!
//! * [`actionlint`]: `actionlint` (a Go module, pinned) is built with `go install` into
//!   `$HOME/.cache/ledgerflow/tools/actionlint-<version>/` once, and lints every file of
//!   `.github/workflows/`, with shellcheck on their `run:` scripts (Debian's `shellcheck`,
//!   installed when missing and running as root). A broken workflow fed to it must fail,
//!   so a linter that checks nothing cannot pass.
//! * [`image_binary`]: the Dockerfile's builder stage is read (its `ENV`s and `RUN`s), and
//!   each `RUN` runs here with the same environment, in the workspace root (the stage's
//!   `WORKDIR` after `COPY . .`), minus its `--mount` flags; the container's paths are
//!   mapped to this machine's (`target/` → the cargo target directory, `/out/` →
//!   `<target>/image/`). The runtime stage must copy the result to the `ENTRYPOINT`, so the
//!   binary built here is the one the image runs. `cargo xtask test` then runs the chart's
//!   container args through it (helm-check).

use crate::cmd;
use anyhow::{Context, Result, bail, ensure};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Pinned actionlint release (a Go module).
const ACTIONLINT_VERSION: &str = "1.7.12";
const ACTIONLINT_MODULE: &str = "github.com/rhysd/actionlint/cmd/actionlint";
/// Where Go is on the CI machine kind when it is not on `PATH`.
const GO_FALLBACK: &str = "/usr/local/go/bin/go";

/// The builder stage's name and its output directory inside the image build.
const BUILDER_STAGE: &str = "builder";
const IMAGE_OUT: &str = "/out/";

/// A workflow actionlint must refuse (unknown runner label expression, undefined
/// step output): the control that proves the linter runs.
const BROKEN_WORKFLOW: &str = "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    \
    steps:\n      - run: echo ${{ steps.nope.outputs.value }}\n        shell: bash\n      \
    - uses: actions/checkout@v4\n        with:\n          no-such-input: 1\n";

/// `cargo xtask pipeline`: what `cargo xtask test` checks of the pipeline, alone.
pub fn run(root: &Path) -> Result<()> {
    actionlint(root)?;
    let binary = image_binary(root)?;
    crate::helm_check::run_with_binary(root, &binary)
}

/// Lints `.github/workflows/*` under `root`.
pub fn actionlint(root: &Path) -> Result<()> {
    let binary = ensure_actionlint()?;
    if cmd::which("shellcheck").is_none() {
        install_shellcheck()?;
    }
    cmd::run(Command::new(&binary).arg("-no-color").current_dir(root))
        .context("actionlint found problems in .github/workflows")?;
    let mut control = Command::new(&binary)
        .args(["-no-color", "-"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting actionlint")?;
    if let Some(mut stdin) = control.stdin.take() {
        stdin.write_all(BROKEN_WORKFLOW.as_bytes())?;
    }
    let out = control.wait_with_output()?;
    ensure!(
        !out.status.success(),
        "actionlint accepted a broken workflow: the lint step proves nothing"
    );
    println!(
        "actionlint {ACTIONLINT_VERSION}: .github/workflows clean (and a broken workflow refused)"
    );
    Ok(())
}

fn ensure_actionlint() -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .context("HOME is not set; the tool cache lives in $HOME/.cache/ledgerflow")?;
    let dir = PathBuf::from(home)
        .join(".cache/ledgerflow/tools")
        .join(format!("actionlint-{ACTIONLINT_VERSION}"));
    let binary = dir.join("actionlint");
    if binary.is_file() {
        return Ok(binary);
    }
    let go = cmd::which("go")
        .or_else(|| {
            Path::new(GO_FALLBACK)
                .is_file()
                .then(|| PathBuf::from(GO_FALLBACK))
        })
        .context("`go` is needed to build actionlint (not on PATH, nor at /usr/local/go)")?;
    println!(
        "building actionlint {ACTIONLINT_VERSION} into {}",
        dir.display()
    );
    std::fs::create_dir_all(&dir)?;
    cmd::run(
        Command::new(go)
            .args([
                "install",
                &format!("{ACTIONLINT_MODULE}@v{ACTIONLINT_VERSION}"),
            ])
            .env("GOBIN", &dir)
            .env("GOFLAGS", "-mod=mod")
            .stdin(Stdio::null()),
    )
    .context("go install of actionlint")?;
    ensure!(binary.is_file(), "go install left no {}", binary.display());
    Ok(binary)
}

fn install_shellcheck() -> Result<()> {
    if !cmd::is_root()? {
        println!(
            "warning: shellcheck is not installed (apt-get install shellcheck): actionlint \
             skips the workflows' run: scripts"
        );
        return Ok(());
    }
    println!("installing shellcheck (Debian) for actionlint's run: script checks");
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "shellcheck"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
}

/// What `docker build` runs in the builder stage.
#[derive(Debug, PartialEq, Eq)]
struct BuilderStage {
    env: Vec<(String, String)>,
    runs: Vec<String>,
    /// `COPY --from=builder <from> <to>` of the runtime stage.
    copied: (String, String),
    /// The image's `ENTRYPOINT` program.
    entrypoint: String,
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current).trim().to_string());
            }
        }
    }
    out
}

fn parse(dockerfile: &str) -> Result<BuilderStage> {
    let mut stage = String::new();
    let mut env = Vec::new();
    let mut runs = Vec::new();
    let mut copied = None;
    let mut entrypoint = None;
    for inst in instructions(dockerfile) {
        let (keyword, rest) = inst.split_once(' ').unwrap_or((inst.as_str(), ""));
        match keyword.to_ascii_uppercase().as_str() {
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                stage = match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                    _ => String::new(),
                };
            }
            "ENV" if stage == BUILDER_STAGE => {
                let (k, v) = rest
                    .split_once('=')
                    .with_context(|| format!("ENV without `=`: {inst}"))?;
                env.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
            }
            "RUN" if stage == BUILDER_STAGE => {
                ensure!(
                    !rest.contains("<<"),
                    "heredoc RUNs are not supported: {inst}"
                );
                // Flags (`--mount=…`) come first; the shell command follows.
                let command: Vec<&str> = rest
                    .split_whitespace()
                    .skip_while(|w| w.starts_with("--"))
                    .collect();
                runs.push(command.join(" "));
            }
            "COPY" if rest.starts_with(&format!("--from={BUILDER_STAGE} ")) => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let [_, from, to] = words.as_slice() {
                    copied = Some((from.to_string(), to.to_string()));
                }
            }
            "ENTRYPOINT" => {
                let list: Vec<String> = serde_json::from_str(rest)
                    .with_context(|| format!("ENTRYPOINT is not a JSON list: {inst}"))?;
                entrypoint = list.into_iter().next();
            }
            _ => {}
        }
    }
    ensure!(!runs.is_empty(), "no RUN in the `{BUILDER_STAGE}` stage");
    Ok(BuilderStage {
        env,
        runs,
        copied: copied.context("the runtime stage copies nothing from the builder")?,
        entrypoint: entrypoint.context("no ENTRYPOINT")?,
    })
}

/// Runs the Dockerfile's build commands here and returns the binary they produce.
pub fn image_binary(root: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(root.join("Dockerfile")).context("reading Dockerfile")?;
    let stage = parse(&text)?;
    let (from, to) = &stage.copied;
    ensure!(
        *to == stage.entrypoint,
        "the image copies the build's {from} to {to}, but its ENTRYPOINT is {}",
        stage.entrypoint
    );
    let from = from
        .strip_prefix(IMAGE_OUT)
        .with_context(|| format!("the image copies {from}, not a file of {IMAGE_OUT}"))?;
    let target = cmd::target_dir(root);
    let out = target.join("image");
    for run in &stage.runs {
        let here = run
            .replace(IMAGE_OUT, &format!("{}/", out.display()))
            .replace(" target/", &format!(" {}/", target.display()));
        println!("image: {here}");
        let mut c = Command::new("sh");
        c.args(["-ec", &here])
            .current_dir(root)
            .envs(stage.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd::run(&mut c).context("a Dockerfile build command failed")?;
    }
    let binary = out.join(from);
    ensure!(
        binary.is_file(),
        "the Dockerfile's commands left no {}",
        binary.display()
    );
    let version = cmd::read(Command::new(&binary).arg("--version"))?;
    if !version.starts_with("ledgerflow ") {
        bail!("{} --version said {version:?}", binary.display());
    }
    println!("image: {} ({version})", binary.display());
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_real_dockerfile() -> Result<()> {
        let text = std::fs::read_to_string(cmd::workspace_root().join("Dockerfile"))?;
        let stage = parse(&text)?;
        assert_eq!(stage.env, vec![("SQLX_OFFLINE".into(), "true".into())]);
        assert_eq!(
            stage.runs,
            vec![
                "cargo build --release --locked -p ledgerflow-workers --bin ledgerflow && \
                 install -D -m 0755 target/release/ledgerflow /out/ledgerflow"
                    .to_string()
            ]
        );
        assert_eq!(
            stage.copied,
            ("/out/ledgerflow".into(), "/usr/local/bin/ledgerflow".into())
        );
        assert_eq!(stage.entrypoint, "/usr/local/bin/ledgerflow");
        Ok(())
    }

    #[test]
    fn ignores_other_stages_and_comments() -> Result<()> {
        let stage = parse(
            "FROM a AS builder\n# RUN not-this\nENV A=1\nRUN --mount=type=cache,target=/x \\\n  \
             make \\\n  && make install\nFROM b\nRUN apt-get update\n\
             COPY --from=builder /out/app /bin/app\nENTRYPOINT [\"/bin/app\"]\n",
        )?;
        assert_eq!(stage.runs, vec!["make && make install".to_string()]);
        assert_eq!(stage.env, vec![("A".into(), "1".into())]);
        Ok(())
    }
}
