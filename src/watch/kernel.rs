//! What the guest kernel's own reports ([`crate::sentinel`]) do to a VM's state: a policy per
//! class, configurable per VM (`[defaults.kernel_reports]`, `[vm.NAME.kernel_reports]`).
//!
//! A report's effect lasts until the kernel has said nothing more of that kind for the
//! class's `clear_after` (a soft lockup repeats about every 28 s while the CPU is stuck, an RCU
//! stall about every minute, a hung task every check interval, 120 s by default); then the
//! probes decide again, so no report can hold a VM in a state for good.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::sentinel::ReportClass;

/// What a report of a class does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The VM is `unresponsive` (an incident, diagnostics), even if the probes answer.
    Unresponsive,
    /// The VM is `late`.
    Late,
    /// The VM is `late` and diagnostics run (a bundle, without a failure state).
    LateDiagnose,
    /// Evidence that the guest panicked: the VM is `panicked`.
    Panicked,
    /// A `kernel-report` event only.
    Report,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Unresponsive => "unresponsive",
            Action::Late => "late",
            Action::LateDiagnose => "late-diagnose",
            Action::Panicked => "panicked",
            Action::Report => "report",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        [Action::Unresponsive, Action::Late, Action::LateDiagnose, Action::Panicked, Action::Report]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

/// One class's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassPolicy {
    pub action: Action,
    /// The effect ends after this long without another report of the class.
    pub clear_after: Duration,
}

/// Every class's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPolicy(BTreeMap<ReportClass, ClassPolicy>);

impl Default for KernelPolicy {
    fn default() -> Self {
        let p = |action, secs| ClassPolicy { action, clear_after: Duration::from_secs(secs) };
        KernelPolicy(
            ReportClass::ALL
                .into_iter()
                .map(|c| {
                    let policy = match c {
                        ReportClass::SoftLockup | ReportClass::HardLockup => p(Action::Unresponsive, 90),
                        ReportClass::RcuStall => p(Action::Unresponsive, 150),
                        ReportClass::HungTask => p(Action::Late, 300),
                        ReportClass::Oom => p(Action::Late, 120),
                        ReportClass::Oops => p(Action::LateDiagnose, 300),
                        ReportClass::Panic => p(Action::Panicked, 0),
                        ReportClass::IoError | ReportClass::ReadOnly | ReportClass::Nmi => {
                            p(Action::Report, 0)
                        }
                    };
                    (c, policy)
                })
                .collect(),
        )
    }
}

impl KernelPolicy {
    pub fn get(&self, class: ReportClass) -> ClassPolicy {
        self.0
            .get(&class)
            .copied()
            .unwrap_or(ClassPolicy { action: Action::Report, clear_after: Duration::ZERO })
    }

    /// `base` with what `table` sets: `CLASS = "ACTION"` or `CLASS = { action = "ACTION",
    /// clear_after = "90s" }`. Every problem is returned, each naming the fix.
    pub fn parse(
        table: &toml::Table,
        base: &KernelPolicy,
        section: &str,
    ) -> Result<KernelPolicy, Vec<String>> {
        let mut out = base.clone();
        let mut problems = Vec::new();
        let classes = || ReportClass::ALL.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ");
        let actions = "unresponsive, late, late-diagnose, panicked or report";
        for (key, value) in table {
            let Some(class) = ReportClass::ALL.into_iter().find(|c| c.name() == key) else {
                problems.push(format!("{section}.kernel_reports: unknown class '{key}'; use {}", classes()));
                continue;
            };
            let mut policy = out.get(class);
            let (action, clear_after) = match value {
                toml::Value::String(a) => (Some(a.as_str()), None),
                toml::Value::Table(t) => {
                    if let Some(k) = t.keys().find(|k| *k != "action" && *k != "clear_after") {
                        problems.push(format!(
                            "{section}.kernel_reports.{key}: unknown key '{k}'; use action and clear_after"
                        ));
                    }
                    (t.get("action").and_then(|v| v.as_str()), t.get("clear_after"))
                }
                _ => {
                    problems.push(format!(
                        "{section}.kernel_reports.{key}: write \"ACTION\" or {{ action = \"ACTION\", clear_after = \"90s\" }}"
                    ));
                    continue;
                }
            };
            if let Some(a) = action {
                match Action::parse(a) {
                    Some(a) => policy.action = a,
                    None => problems
                        .push(format!("{section}.kernel_reports.{key}: unknown action '{a}'; use {actions}")),
                }
            }
            if let Some(d) = clear_after {
                match d.as_str().map(crate::units::parse_duration) {
                    Some(Ok(d)) => policy.clear_after = d,
                    _ => problems.push(format!(
                        "{section}.kernel_reports.{key}.clear_after: write a duration such as \"90s\" or \"5m\""
                    )),
                }
            }
            if policy.action == Action::Panicked && class != ReportClass::Panic {
                problems.push(format!(
                    "{section}.kernel_reports.{key}: only a panic report can make the VM panicked; use {actions}"
                ));
                policy.action = Action::Report;
            }
            out.0.insert(class, policy);
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

/// As the file writes it (`watch --check --json`): `{ "soft-lockup": { "action":
/// "unresponsive", "clear_after": "1m 30s" }, ... }`.
impl Serialize for KernelPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Shown {
            action: &'static str,
            clear_after: String,
        }
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (class, p) in &self.0 {
            let shown =
                Shown { action: p.action.name(), clear_after: crate::units::format_duration(p.clear_after) };
            map.serialize_entry(class.name(), &shown)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let d = KernelPolicy::default();
        assert_eq!(d.get(ReportClass::SoftLockup).action, Action::Unresponsive);
        assert_eq!(d.get(ReportClass::HungTask).action, Action::Late);
        assert_eq!(d.get(ReportClass::Oops).action, Action::LateDiagnose);
        assert_eq!(d.get(ReportClass::Panic).action, Action::Panicked);
        assert_eq!(d.get(ReportClass::IoError).action, Action::Report);
        let t: toml::Table =
            toml::from_str("hung-task = \"unresponsive\"\nsoft-lockup = { clear_after = \"2m\" }\n").unwrap();
        let p = KernelPolicy::parse(&t, &d, "defaults").unwrap();
        assert_eq!(p.get(ReportClass::HungTask).action, Action::Unresponsive);
        assert_eq!(p.get(ReportClass::SoftLockup).action, Action::Unresponsive);
        assert_eq!(p.get(ReportClass::SoftLockup).clear_after, Duration::from_secs(120));
        let t: toml::Table = toml::from_str(
            "softlockup = \"late\"\noom = \"sleep\"\noops = { clear_after = 5 }\nnmi = \"panicked\"\n",
        )
        .unwrap();
        let e = KernelPolicy::parse(&t, &d, "vm.a").unwrap_err();
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(e.iter().any(|m| m.contains("unknown class 'softlockup'; use soft-lockup")), "{e:#?}");
    }
}
