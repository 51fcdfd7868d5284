//! The custom resources the chart renders (KEDA `ScaledObject`s, the Prometheus Operator's
//! `PrometheusRule`), validated offline against their CRDs' OpenAPI schemas for
//! `cargo xtask helm-check`.
//!
//! kubernetes-validate knows only Kubernetes' own kinds and fails on any other (which is what
//! keeps a typo in a built-in `apiVersion` from passing), so the rendered objects are split:
//! those whose `apiVersion` and `kind` one of the pinned CRDs defines are validated here with
//! `jsonschema` (from the same venv) against that CRD's `openAPIV3Schema`, made strict the way
//! the API server is for structural schemas (an object schema with `properties` and no
//! `x-kubernetes-preserve-unknown-fields` admits no other field); everything else goes on to
//! kubernetes-validate. A custom kind no pinned CRD defines stays with kubernetes-validate,
//! which rejects it.
//!
//! The CRDs come from the projects' own sources on the Go module proxy, fetched with
//! `go mod download` (checksums verified against the Go checksum database), pinned below, and
//! cached as plain files under `$HOME/.cache/ledgerflow/crds/`.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A CRD file inside a Go module's source zip.
struct Crd {
    module: &'static str,
    version: &'static str,
    path: &'static str,
}

/// The pinned CRDs. Bump a version deliberately: the cache is keyed by it.
const CRDS: [Crd; 2] = [
    Crd {
        module: "github.com/kedacore/keda/v2",
        version: "v2.16.1",
        path: "config/crd/bases/keda.sh_scaledobjects.yaml",
    },
    Crd {
        module: "github.com/prometheus-operator/prometheus-operator",
        version: "v0.79.2",
        path: "example/prometheus-operator-crd-full/monitoring.coreos.com_prometheusrules.yaml",
    },
];

/// Splits a rendered file: validates its custom resources against `crds`, writes the rest to
/// `core_out`, prints a JSON summary `{"checked": [...], "problems": [...]}`.
const SPLIT_AND_VALIDATE: &str = r#"
import json, sys, yaml, jsonschema
rendered, core_out, *crd_files = sys.argv[1:]
schemas = {}
for path in crd_files:
    with open(path) as f:
        for crd in yaml.safe_load_all(f):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schemas[(group + "/" + v["name"], kind)] = v["schema"]["openAPIV3Schema"]

def strict(s):
    if isinstance(s, list):
        return [strict(x) for x in s]
    if not isinstance(s, dict):
        return s
    s = {k: strict(v) for k, v in s.items()}
    if ("properties" in s and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        s["additionalProperties"] = False
    return s

core, checked, problems = [], [], []
with open(rendered) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
for doc in docs:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        core.append(doc)
        continue
    name = "%s/%s" % (doc["kind"], doc.get("metadata", {}).get("name"))
    validator = jsonschema.Draft7Validator(strict(schemas[key]))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    for e in errors:
        problems.append("%s: %s: %s" % (name, "/".join(map(str, e.absolute_path)) or "(root)", e.message))
    checked.append(name)
with open(core_out, "w") as f:
    yaml.safe_dump_all(core, f, sort_keys=False)
print(json.dumps({"checked": checked, "problems": problems}))
"#;

/// The pinned CRD files, fetched into the cache when missing.
pub fn ensure(cache: &Path) -> Result<Vec<PathBuf>> {
    let dir = cache.join("crds");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    for crd in &CRDS {
        let file_name = Path::new(crd.path)
            .file_name()
            .context("a CRD path names a file")?
            .to_string_lossy()
            .into_owned();
        let cached = dir.join(format!("{}-{file_name}", crd.version));
        if cached.is_file() {
            println!("  CRD {file_name} {} (cached)", crd.version);
        } else {
            let source = download(crd)?.join(crd.path);
            fs::copy(&source, &cached)
                .with_context(|| format!("copying {} to the cache", source.display()))?;
            println!("  CRD {file_name} from {}@{}", crd.module, crd.version);
        }
        files.push(cached);
    }
    Ok(files)
}

/// `go mod download` of one module version; returns its source directory.
fn download(crd: &Crd) -> Result<PathBuf> {
    let module = format!("{}@{}", crd.module, crd.version);
    let output = Command::new("go")
        .args(["mod", "download", "-json", &module])
        // Outside any module: no go.mod of ours is read or changed.
        .current_dir(std::env::temp_dir())
        .env("GOFLAGS", "-mod=mod")
        .output()
        .context("running `go mod download` (is Go installed?)")?;
    ensure!(
        output.status.success(),
        "go mod download {module} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let info: Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("go mod download -json {module}: not JSON"))?;
    let dir = info["Dir"]
        .as_str()
        .with_context(|| format!("go mod download -json {module}: no Dir"))?;
    Ok(PathBuf::from(dir))
}

/// Validates the custom resources of `rendered` against `crds` and writes the other objects to
/// `core_out` (for kubernetes-validate). Returns the custom resources checked (`Kind/name`).
pub fn split_and_validate(
    python: &Path,
    rendered: &Path,
    core_out: &Path,
    crds: &[PathBuf],
) -> Result<Vec<String>> {
    let output = Command::new(python)
        .args(["-c", SPLIT_AND_VALIDATE])
        .arg(rendered)
        .arg(core_out)
        .args(crds)
        .output()
        .context("running the CRD validation script")?;
    ensure!(
        output.status.success(),
        "the CRD validation script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout)
        .context("the CRD validation script did not print JSON")?;
    let strings = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let problems = strings("problems");
    if !problems.is_empty() {
        bail!(
            "custom resources in {} do not match their CRDs:\n  {}",
            rendered.display(),
            problems.join("\n  ")
        );
    }
    Ok(strings("checked"))
}
