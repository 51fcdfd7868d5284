//! The metrics catalogue, `docs/metrics.md`, held against the code and the chart, so the three
//! cannot drift apart:
//!
//! - [`check_references`] (`helm-check`, offline): every metric the chart's dashboards and alert
//!   rules name is in the catalogue;
//! - [`check_live`] (`dev --smoke`, the whole system running): the ops endpoint's scrape has a
//!   sample of every catalogue metric, and a real Prometheus scraping it has them too and
//!   answers every dashboard panel's query with data.

use crate::cmd::target_dir;
use crate::http;
use crate::prometheus::Server;
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

const CATALOGUE: &str = "docs/metrics.md";
const DASHBOARDS: &str = "helm/ledgerflow/files/dashboards";
const RULES: &str = "helm/ledgerflow/files/prometheus/ledgerflow-rules.yaml";
/// What stands for Grafana's variables when a panel's query is run outside Grafana.
const GRAFANA_VARIABLES: [(&str, &str); 2] = [("$__rate_interval", "1m"), ("$queue", ".*")];
/// The suffixes of a histogram's (or summary's) series.
const SERIES_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// One metric of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub name: String,
    pub kind: String,
}

/// One query the chart ships: where it is, and its PromQL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Query {
    source: String,
    expr: String,
}

/// The catalogue's metrics, in table order.
pub fn catalogue(root: &Path) -> Result<Vec<Metric>> {
    let path = root.join(CATALOGUE);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let metrics = parse_catalogue(&text);
    ensure!(!metrics.is_empty(), "{CATALOGUE} lists no metric");
    Ok(metrics)
}

/// Every metric the dashboards and rules name is in the catalogue; returns how many they name.
pub fn check_references(root: &Path) -> Result<usize> {
    let names: BTreeSet<String> = catalogue(root)?.into_iter().map(|m| m.name).collect();
    let mut named = BTreeSet::new();
    let mut unknown = Vec::new();
    for q in shipped_queries(root)?
        .into_iter()
        .chain(rule_queries(root)?)
    {
        for name in metric_names(&q.expr, &names) {
            if !names.contains(&name) {
                unknown.push(format!("{}: {name}", q.source));
            }
            named.insert(name);
        }
    }
    if !unknown.is_empty() {
        bail!(
            "metrics queried by the chart but missing from {CATALOGUE}:\n  {}",
            unknown.join("\n  ")
        );
    }
    Ok(named.len())
}

/// The ops endpoint at `ops` exports every catalogue metric; a real Prometheus scraping it has
/// them all and answers every dashboard panel's query with data.
pub fn check_live(root: &Path, ops: &str) -> Result<()> {
    let catalogue = catalogue(root)?;
    // Some series appear a moment after the start (the ingress' first lag measurement,
    // once its partitions are assigned): give them a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let scrape = http::request(ops, "GET", "/metrics", &[], None)?;
        ensure!(
            scrape.status == 200,
            "GET {ops}/metrics: HTTP {}",
            scrape.status
        );
        let absent = missing(&catalogue, &sampled_families(&scrape.body));
        if absent.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after 20 s the ops endpoint's /metrics still has no sample of {} catalogue \
                 metric(s): {}",
                absent.len(),
                absent.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "      {ops}/metrics has all {} catalogue metrics",
        catalogue.len()
    );

    let started = Instant::now();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    drop(listener);
    let server = Server::start(&target_dir(root).join("prometheus-check"), &addr, &[ops])?;
    // Every catalogue metric in the server's storage, and enough scrapes for a rate.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored: BTreeSet<String> = server
            .query(r#"group by (__name__) ({job="ledgerflow"})"#)?
            .iter()
            .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_owned))
            .collect();
        let families = families_of(&stored);
        let absent = missing(&catalogue, &families);
        let scrapes = server
            .query(r#"count_over_time(up{job="ledgerflow"}[1m])"#)?
            .first()
            .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
            .unwrap_or(0.0);
        if absent.is_empty() && scrapes >= 3.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after 30 s Prometheus ({scrapes} scrapes) lacks {} catalogue metric(s): {}",
                absent.len(),
                absent.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let queries = shipped_queries(root)?;
    let mut empty = Vec::new();
    for q in &queries {
        let expr = runnable(&q.expr);
        if server.query(&expr)?.is_empty() {
            empty.push(format!("{}: {expr}", q.source));
        }
    }
    if !empty.is_empty() {
        bail!(
            "{} dashboard quer(ies) returned no data from Prometheus:\n  {}",
            empty.len(),
            empty.join("\n  ")
        );
    }
    println!(
        "      Prometheus scraping it stores all of them, and all {} dashboard queries return data ({:.1} s)",
        queries.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A dashboard query as Prometheus runs it: Grafana's variables replaced, and a variable's
/// `label_values(metric, label)` (Grafana's, not PromQL) as `group by (label) (metric)`,
/// which has data exactly when the variable has values.
fn runnable(expr: &str) -> String {
    let mut expr = expr.to_owned();
    for (variable, value) in GRAFANA_VARIABLES {
        expr = expr.replace(variable, value);
    }
    if let Some((metric, label)) = expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|args| args.rsplit_once(','))
    {
        return format!("group by ({}) ({})", label.trim(), metric.trim());
    }
    expr
}

/// Catalogue names with no family in `families`.
fn missing(catalogue: &[Metric], families: &BTreeSet<String>) -> Vec<String> {
    catalogue
        .iter()
        .filter(|m| !families.contains(&m.name))
        .map(|m| m.name.clone())
        .collect()
}

/// The metrics of the catalogue's table: rows whose first cell is a name in backticks, in the
/// table whose header's first cell is `name`.
fn parse_catalogue(text: &str) -> Vec<Metric> {
    let mut out = Vec::new();
    let mut in_table = false;
    for line in text.lines().map(str::trim) {
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.first() == Some(&"name") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if let (Some(name), Some(kind)) = (
            cells
                .first()
                .and_then(|c| c.strip_prefix('`'))
                .and_then(|c| c.strip_suffix('`')),
            cells.get(1),
        ) {
            out.push(Metric {
                name: name.to_owned(),
                kind: (*kind).to_owned(),
            });
        }
    }
    out
}

/// Families with at least one sample in a Prometheus text exposition (a histogram's
/// `_bucket`/`_sum`/`_count` series count for the histogram).
fn sampled_families(text: &str) -> BTreeSet<String> {
    let series: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    families_of(&series)
}

/// Series names mapped to their families: `x_bucket`, `x_sum` and `x_count` are `x` when `x_bucket`
/// is among them (a histogram), and stay themselves otherwise (a counter may end in `_count`).
fn families_of(series: &BTreeSet<String>) -> BTreeSet<String> {
    let histograms: BTreeSet<&str> = series
        .iter()
        .filter_map(|s| s.strip_suffix("_bucket"))
        .collect();
    series
        .iter()
        .map(|s| {
            SERIES_SUFFIXES
                .iter()
                .find_map(|suffix| s.strip_suffix(suffix).filter(|b| histograms.contains(b)))
                .unwrap_or(s)
                .to_owned()
        })
        .collect()
}

/// The metric names of ours (`ledgerflow_…`, `http_…`) in a PromQL expression, with a
/// histogram's series suffix taken off when the rest is a catalogue name.
fn metric_names(expr: &str, catalogue: &BTreeSet<String>) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("ledgerflow_") || t.starts_with("http_"))
        .map(|t| {
            SERIES_SUFFIXES
                .iter()
                .find_map(|suffix| {
                    t.strip_suffix(suffix)
                        .filter(|base| catalogue.contains(*base))
                })
                .unwrap_or(t)
                .to_owned()
        })
        .collect()
}

/// Every query of the dashboards: each panel target's `expr` and each query variable's query.
fn shipped_queries(root: &Path) -> Result<Vec<Query>> {
    let dir = root.join(DASHBOARDS);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "no dashboards in {DASHBOARDS}");
    let mut out = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = fs::read_to_string(&file)?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let found = dashboard_queries(&name, &json);
        ensure!(!found.is_empty(), "dashboard {name} has no queries");
        out.extend(found);
    }
    Ok(out)
}

fn dashboard_queries(name: &str, dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = panels.pop() {
        // A row's collapsed panels.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(Query {
                    source: format!("{name} panel {:?}", panel["title"].as_str().unwrap_or("")),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    out.reverse();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            out.push(Query {
                source: format!(
                    "{name} variable {:?}",
                    variable["name"].as_str().unwrap_or("")
                ),
                // `label_values(m, l)` is Grafana's; the metric in it is what counts here.
                expr: query.to_owned(),
            });
        }
    }
    out
}

/// The `expr` of every alert rule (read as text: a block scalar's lines, or the rest of the line).
fn rule_queries(root: &Path) -> Result<Vec<Query>> {
    let path = root.join(RULES);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(rule_exprs(&text)
        .into_iter()
        .map(|expr| Query {
            source: RULES.to_owned(),
            expr,
        })
        .collect())
}

fn rule_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if !rest.starts_with(['|', '>']) {
            out.push(rest.to_owned());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .map(|l| l.trim())
            .collect();
        out.push(block.join("\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_is_read_from_its_table_only() {
        let text = "intro `ledgerflow_x` in prose\n\
                    | other | table |\n|---|---|\n| `not_this` | gauge |\n\n\
                    | name | type | labels |\n|---|---|---|\n\
                    | `ledgerflow_a` | gauge | queue |\n\
                    | `http_b_total` | counter | — |\n\
                    | no backticks | counter | — |\n";
        assert_eq!(
            parse_catalogue(text),
            vec![
                Metric {
                    name: "ledgerflow_a".into(),
                    kind: "gauge".into()
                },
                Metric {
                    name: "http_b_total".into(),
                    kind: "counter".into()
                },
            ]
        );
    }

    #[test]
    fn histogram_series_count_for_their_family_and_counters_keep_their_name() {
        let text = "# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_sum 0\nh_count 0\n\
                    # TYPE jobs_count gauge\njobs_count 3\n\
                    # HELP empty_family an empty vector\n# TYPE empty_family counter\n\
                    plain{a=\"b\"} 1\n";
        let families: Vec<String> = sampled_families(text).into_iter().collect();
        assert_eq!(families, vec!["h", "jobs_count", "plain"]);
    }

    #[test]
    fn metric_names_are_found_in_promql() {
        let catalogue: BTreeSet<String> =
            ["ledgerflow_job_duration_seconds", "http_requests_total"]
                .into_iter()
                .map(str::to_owned)
                .collect();
        let names = metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(ledgerflow_job_duration_seconds_bucket[$__rate_interval]))) \
             / sum(rate(http_requests_total{route=\"/x\"}[1m])) + ledgerflow_unknown_count",
            &catalogue,
        );
        let names: Vec<String> = names.into_iter().collect();
        assert_eq!(
            names,
            vec![
                "http_requests_total",
                "ledgerflow_job_duration_seconds",
                "ledgerflow_unknown_count"
            ]
        );
    }

    #[test]
    fn grafana_queries_become_promql() {
        assert_eq!(
            runnable("label_values(ledgerflow_queue_jobs, queue)"),
            "group by (queue) (ledgerflow_queue_jobs)"
        );
        assert_eq!(
            runnable(r#"rate(x{queue=~"$queue"}[$__rate_interval])"#),
            r#"rate(x{queue=~".*"}[1m])"#
        );
    }

    #[test]
    fn rule_exprs_read_block_and_inline_scalars() {
        let text = "groups:\n  - rules:\n      - alert: A\n        expr: |\n          a > 0\n          unless b\n        for: 1m\n      - alert: B\n        expr: max(c) > 0\n";
        assert_eq!(rule_exprs(text), vec!["a > 0\nunless b", "max(c) > 0"]);
    }

    #[test]
    fn the_shipped_dashboards_and_rules_name_only_catalogue_metrics() -> Result<()> {
        let root = crate::cmd::workspace_root();
        assert!(check_references(root)? > 20);
        Ok(())
    }
}
