//! The chart check's pure parts (unit-tested): container args of rendered workloads, version
//! ordering, and which values the chart's README documents.
use super::*;

/// One container of a rendered workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ContainerArgs {
    /// `Kind/name` of the object.
    pub(super) object: String,
    pub(super) container: String,
    pub(super) command: Option<Vec<String>>,
    pub(super) args: Option<Vec<String>>,
}

impl ContainerArgs {
    /// The arguments given to the image's entrypoint. A container must set `args`
    /// (the image's default CMD is not checked) and may set `command` only to the
    /// entrypoint itself.
    pub(super) fn command_line(&self) -> Result<Vec<String>> {
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
pub(super) fn container_args(docs: &Value) -> Result<Vec<ContainerArgs>> {
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

pub(super) fn string_list(value: Option<&Value>, object: &str) -> Result<Option<Vec<String>>> {
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
pub(super) fn newest_version<'a>(versions: impl IntoIterator<Item = &'a str>) -> Option<String> {
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
pub(super) fn leaf_paths(value: &Value) -> BTreeSet<String> {
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
pub(super) fn documented_keys(readme: &str) -> BTreeSet<String> {
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
pub(super) fn expand_row(row: &str) -> Vec<String> {
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
pub(super) fn is_documented(path: &str, rows: &BTreeSet<String>) -> bool {
    rows.iter().flat_map(|row| expand_row(row)).any(|key| {
        path == key
            || path
                .strip_prefix(key.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// A row is real when every key it stands for is a leaf or an ancestor of one.
pub(super) fn row_exists(row: &str, paths: &BTreeSet<String>) -> bool {
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
