use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, Path::new("watch.toml"))
}

#[test]
fn the_empty_file_gives_the_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.defaults.scenarios, default_scenarios());
    assert_eq!(c.metrics, Some(DEFAULT_METRICS.parse().unwrap()));
    assert!(c.controller.is_none());
    assert_eq!(c.data_dir, c.state_dir.join(".watch"));
    assert_eq!(c.defaults.recovery, Recovery { action: RecoveryAction::None, max_per_hour: 3 });
}

const FULL: &str = r#"
state_dir = "/run/acpimon"
data_dir = "/var/lib/acpimon"
node = "edge-17"
discover_interval = "500ms"
console_keep = "64KiB"
touch_file = "/run/acpimon/alive"

[metrics]
listen = "127.0.0.1:9999"

[controller]
url = "http://10.0.0.1:8080/"
spool_max = "1MiB"
backoff_max = "30s"

[hook]
argv = ["/usr/local/bin/analyze", "--json"]

[defaults]
startup_grace = "30s"
pause = "exempt"
recovery = { action = "reset", max_per_hour = 2 }

[[defaults.scenario]]
kind = "acpi-heartbeat"
interval = "500ms"
threshold = 4

[[defaults.scenario]]
kind = "console"
command = "cat /proc/loadavg"
expect = '^\d+\.\d+ '

[vm.web]
[[vm.web.scenario]]
kind = "tcp"
address = "192.168.1.5:80"

[vm.batch]
enabled = false
"#;

#[test]
fn a_full_file_resolves_with_per_vm_overrides() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.state_dir, PathBuf::from("/run/acpimon"));
    assert_eq!(c.event_log, Some(PathBuf::from("/var/lib/acpimon/events.jsonl")));
    assert_eq!(c.node, "edge-17");
    assert_eq!(c.discover_interval, Duration::from_millis(500));
    assert_eq!(c.console_keep, 64 << 10);
    assert_eq!(c.controller.as_ref().unwrap().url, "http://10.0.0.1:8080");
    assert_eq!(c.controller.as_ref().unwrap().spool_max_bytes, 1 << 20);
    let d = &c.defaults;
    assert_eq!(d.pause, PausePolicy::Exempt);
    assert_eq!(d.recovery, Recovery { action: RecoveryAction::Reset, max_per_hour: 2 });
    assert_eq!(d.scenarios.len(), 2);
    assert_eq!(
        (d.scenarios[0].interval, d.scenarios[0].timeout, d.scenarios[0].threshold),
        (Duration::from_millis(500), Duration::from_secs(1), 4)
    );
    assert!(
        matches!(&d.scenarios[1].probe, ScenarioSpec::Console { command, .. } if command == "cat /proc/loadavg")
    );
    // A VM's own scenarios replace the defaults'; everything else is inherited.
    let web = c.settings_for("web");
    assert_eq!(web.scenarios.len(), 1);
    assert_eq!(web.scenarios[0].probe, ScenarioSpec::Tcp { address: "192.168.1.5:80".into() });
    assert_eq!(web.startup_grace, Duration::from_secs(30));
    assert!(!c.settings_for("batch").enabled);
    assert_eq!(c.settings_for("unlisted").scenarios.len(), 2);
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let text = r#"
[[defaults.scenario]]
kind = "acpi-heartbeat"
threshold = 0

[[defaults.scenario]]
kind = "tcp"

[[defaults.scenario]]
kind = "console"
expect = "(unclosed"

[vm.web]
recovery = { action = "reboot-harder" }
"#;
    let e = parse(text).unwrap_err();
    let lines: Vec<usize> = e.problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![2, 6, 9, 14], "{e}");
    let shown = e.to_string();
    assert!(shown.starts_with("watch.toml has 4 problems; fix them and start again:"), "{shown}");
    assert!(
        shown.contains("watch.toml:2: defaults.scenario 'acpi-heartbeat': threshold must be 1 to 1000"),
        "{shown}"
    );
    assert!(
        shown.contains("watch.toml:6: defaults.scenario 'tcp': needs `address = \"HOST:PORT\"`"),
        "{shown}"
    );
    assert!(
        shown.contains("watch.toml:9: defaults.scenario 'console': expect is not a regular expression"),
        "{shown}"
    );
    assert!(shown.contains("watch.toml:14: vm.web.recovery: action 'reboot-harder' is unknown"), "{shown}");
}

#[test]
fn syntax_and_type_errors_name_the_line() {
    let e = parse("state_dir = \"/x\"\n\n[defaults]\nstartup_grace = \"soon\"\n").unwrap_err();
    assert_eq!(e.problems[0].line, 4, "{e}");
    assert!(e.problems[0].message.contains("'soon' is not a duration"), "{e}");
    let e = parse("statedir = 1\n").unwrap_err();
    assert_eq!(e.problems[0].line, 1);
    assert!(e.problems[0].message.contains("unknown field `statedir`"), "{e}");
    let e = parse("[metrics]\nlisten = \"0.0.0.0:9464\"\n").unwrap_err();
    assert!(e.problems[0].message.contains("allow_remote"), "{e}");
    let e = parse("[controller]\nurl = \"https://ctl\"\n").unwrap_err();
    assert!(e.problems[0].message.contains("TLS proxy"), "{e}");
}

#[test]
fn duplicate_scenario_names_and_misplaced_fields_are_refused() {
    let e = parse("[[defaults.scenario]]\nkind = \"acpi-heartbeat\"\n[[defaults.scenario]]\nkind = \"acpi-heartbeat\"\naddress = \"x:1\"\n")
        .unwrap_err();
    assert!(e.to_string().contains("address do(es) not apply to kind acpi-heartbeat"), "{e}");
    let e = parse("[[defaults.scenario]]\nkind = \"tcp\"\naddress = \"a:1\"\n[[defaults.scenario]]\nkind = \"tcp\"\naddress = \"b:2\"\n")
        .unwrap_err();
    assert!(e.to_string().contains("two scenarios are named 'tcp'"), "{e}");
}

#[test]
fn a_bad_vm_name_is_refused() {
    let e = parse("[vm.\"bad name\"]\n").unwrap_err();
    assert!(e.to_string().contains("not a VM name"), "{e}");
}

#[test]
fn scenario_kinds_are_typed_and_their_problems_named() {
    let e = parse("[[defaults.scenario]]\nkind = \"ping\"\n").unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with("watch.toml:1: defaults.scenario: kind 'ping' is unknown; use one of"),
        "{shown}"
    );
    assert!(shown.contains("`app-mailbox`"), "{shown}");
    // Every key the kind lacks, at once; and a bad common key on its scenario's line.
    let e = parse(
        "\n[[defaults.scenario]]\nkind = \"thermal\"\ncommand = \"x\"\naudit = \"disk\"\n\n[[defaults.scenario]]\nkind = \"tcp\"\naddress = \"h:1\"\ninterval = 5\n",
    )
    .unwrap_err();
    assert_eq!(e.problems.iter().map(|p| p.line).collect::<Vec<_>>(), vec![2, 7], "{e}");
    assert!(
        e.problems[0].message.ends_with("audit, command do(es) not apply to kind thermal; remove it"),
        "{e}"
    );
    assert!(e.problems[1].message.starts_with("defaults.scenario 'tcp': interval: "), "{e}");
    let e = parse("[[defaults.scenario]]\nkind = \"tcp\"\naddress = \"nohost\"\n").unwrap_err();
    assert!(e.to_string().contains("address 'nohost' is not HOST:PORT"), "{e}");
    let e = parse("[[defaults.scenario]]\nkind = \"console\"\ncommand = \"a\\nb\"\n").unwrap_err();
    assert!(e.to_string().contains("command must be one line"), "{e}");

    let c = parse(
        "[[defaults.scenario]]\nkind = \"app-heartbeat\"\n[[defaults.scenario]]\nkind = \"app-heartbeat\"\nname = \"quiet\"\nhealth_interval = \"0s\"\naudit = \"disk\"\n",
    )
    .unwrap();
    let s = &c.defaults.scenarios;
    assert_eq!(
        s[0].probe,
        ScenarioSpec::AppHeartbeat { health_interval: Some(Duration::from_secs(30)), audit: None }
    );
    assert_eq!(s[1].probe, ScenarioSpec::AppHeartbeat { health_interval: None, audit: Some("disk".into()) });
    assert_eq!((s[1].name.as_str(), s[1].interval, s[1].threshold), ("quiet", Duration::from_secs(5), 3));
}
