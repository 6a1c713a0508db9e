//! Checks of `/metrics` text from a real `acpimon watch`, by tools nobody here wrote:
//! Prometheus's own linter (`promtool check metrics`), and the shipped Grafana dashboard
//! (`dist/grafana/acpimon-watch.json`), whose every query must name metrics and labels the
//! service exports.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Labels Prometheus adds when it scrapes (`instance`, `job`) or a histogram has (`le`).
const SCRAPE_LABELS: [&str; 3] = ["instance", "job", "le"];

/// Runs `promtool check metrics` on `text`, panicking with its findings if it has any.
pub fn promtool_check(text: &str) {
    super::require("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let findings = format!("{}{}", super::text(&out.stdout), super::text(&out.stderr));
    assert!(out.status.success() && findings.trim().is_empty(), "promtool check metrics: {findings}\n{text}");
}

/// A metric family of a `/metrics` text.
#[derive(Debug, Default)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`...
    pub kind: String,
    /// The label names seen on its samples.
    pub labels: BTreeSet<String>,
    /// How many samples it has.
    pub samples: usize,
}

/// The metric families in `text` (from its `# TYPE` lines), with their samples' labels.
pub fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            out.insert(name.into(), Family { kind: kind.into(), ..Family::default() });
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let family = family_of(&line[..name_end], &out);
        let labels = line[name_end..].strip_prefix('{').and_then(|l| l.split_once('}')).map(|(l, _)| l);
        let Some(family) = family.and_then(|f| out.get_mut(&f)) else { continue };
        family.samples += 1;
        for pair in labels.into_iter().flat_map(|l| l.split("\",")).filter(|p| !p.is_empty()) {
            family.labels.insert(pair.split_once('=').expect("label=value").0.to_string());
        }
    }
    out
}

/// The family a sample or query name belongs to: itself, or a histogram's `_bucket`, `_sum`,
/// `_count` series.
fn family_of(name: &str, families: &BTreeMap<String, Family>) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|s| name.strip_suffix(s))
        .find(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
        .map(str::to_string)
}

/// Every query of the shipped dashboard: each panel target's `expr` with its `legendFormat`,
/// and each templating variable's query.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            panels(&p["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    let mut queries = Vec::new();
    for p in all {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {} has a target without expr", p["title"]));
            queries.push((expr.to_string(), t["legendFormat"].as_str().unwrap_or("").to_string()));
        }
    }
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str() {
            queries.push((q.to_string(), String::new()));
        }
    }
    queries
}

/// Checks the shipped dashboard against `text`, a real service's `/metrics`: the JSON loads,
/// every metric a query names is exported, and every label it groups by or shows in a legend
/// is on that metric's samples (or added by the scrape). Labels of a family with no samples in
/// `text` cannot be checked: the caller sees which in [`DashboardCheck::unchecked`], and checks
/// them on a run that has them.
pub fn check_dashboard(text: &str) -> DashboardCheck {
    let path = super::repo().join("dist/grafana/acpimon-watch.json");
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: Value = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        dashboard["title"].is_string() && dashboard["uid"].is_string(),
        "a dashboard has a title and a uid"
    );
    let exported = families(text);
    let name = regex::Regex::new(r"\bacpimon_[a-z0-9_]+").unwrap();
    let grouped = regex::Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    let legend = regex::Regex::new(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}").unwrap();
    let matcher = regex::Regex::new(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\x22").unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "the dashboard has {} queries", queries.len());
    let mut used = BTreeSet::new();
    let mut unchecked = BTreeSet::new();
    for (expr, legend_format) in &queries {
        let metrics: Vec<String> = name
            .find_iter(expr)
            .map(|m| {
                family_of(m.as_str(), &exported).unwrap_or_else(|| {
                    panic!(
                        "the dashboard's `{expr}` names {}, which acpimon watch does not export",
                        m.as_str()
                    )
                })
            })
            .collect();
        assert!(!metrics.is_empty(), "the dashboard's `{expr}` names no acpimon metric");
        let mut labels: BTreeSet<&str> = SCRAPE_LABELS.into_iter().collect();
        for m in &metrics {
            used.insert(m.clone());
            labels.extend(exported[m].labels.iter().map(String::as_str));
        }
        // A family without samples in this run shows no labels: its label check would be empty.
        let sampled = metrics.iter().all(|m| exported[m].samples > 0);
        let mut wanted: Vec<&str> = Vec::new();
        for g in grouped.captures_iter(expr) {
            wanted.extend(g.get(1).unwrap().as_str().split(',').map(str::trim).filter(|l| !l.is_empty()));
        }
        wanted.extend(legend.captures_iter(legend_format).map(|c| c.get(1).unwrap().as_str()));
        wanted.extend(matcher.captures_iter(expr).map(|c| c.get(1).unwrap().as_str()));
        if sampled {
            for l in wanted {
                assert!(
                    labels.contains(l),
                    "the dashboard's `{expr}` uses label {l}, which {metrics:?} do not have: {labels:?}"
                );
            }
        } else if !wanted.is_empty() {
            unchecked.extend(metrics.iter().filter(|m| exported[*m].samples == 0).cloned());
        }
    }
    promql_check(queries.iter().map(|(e, _)| e.as_str()).filter(|e| !e.starts_with("label_values(")));
    DashboardCheck { used, unchecked }
}

/// Parses each PromQL expression with Prometheus's own parser: `promtool check rules` on a rule
/// file holding them, Grafana's variables replaced by what Grafana would put there.
fn promql_check<'a>(exprs: impl Iterator<Item = &'a str>) {
    super::require("promtool");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.enumerate() {
        let e = e.replace("$__rate_interval", "1m").replace("$__range", "1h").replace('$', "");
        let quoted = serde_json::to_string(&e).unwrap(); // a JSON string is a YAML string
        rules.push_str(&format!("      - record: acpimon:dashboard_{i}\n        expr: {quoted}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard.rules.yml");
    super::write(&path, rules.as_bytes());
    let out = super::run(Command::new("promtool").args(["check", "rules"]).arg(&path));
    assert!(
        out.status.success(),
        "promtool check rules: {}{}\n{rules}",
        super::text(&out.stdout),
        super::text(&out.stderr)
    );
}

/// What [`check_dashboard`] covered.
#[derive(Debug)]
pub struct DashboardCheck {
    /// The metric families the dashboard's queries name.
    pub used: BTreeSet<String>,
    /// Families whose labels the queries use but the text had no samples to check them on.
    pub unchecked: BTreeSet<String>,
}
