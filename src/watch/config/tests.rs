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
console_rate = "8KiB"
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
    assert_eq!((c.console_budget.rate, c.console_budget.burst), (8 << 10, 256 << 10));
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
    let e = parse("[controller]\nurl = \"https://ctl\"\nca_file = \"/nonexistent/ca.pem\"\n").unwrap_err();
    assert!(e.problems[0].message.contains("cannot read CA file /nonexistent/ca.pem"), "{e}");
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
fn forwarding_settings_follow_the_forwarders_rules() {
    // The same rule set as forward::Forwarder::open, reported at the section's line.
    let e = parse("state_dir = \"/x\"\n[controller]\nurl = \"http://ctl\"\ntimeout = \"0s\"\n").unwrap_err();
    assert!(e.problems[0].message.contains("controller.timeout must be more than 0"), "{e}");
    assert_eq!(e.problems[0].line, 2, "{e}");
    let e = parse("[controller]\nurl = \"http://ctl\"\nbackoff_min = \"2m\"\n").unwrap_err();
    assert!(e.problems[0].message.contains("at most backoff_max"), "{e}");
    let c =
        parse("[controller]\nurl = \"http://ctl\"\nbackoff_max = \"500ms\"\n").unwrap().controller.unwrap();
    assert_eq!((c.backoff_min, c.backoff_max), (Duration::from_millis(500), Duration::from_millis(500)));
    let e = parse("[controller]\nurl = \"http://\"\n").unwrap_err();
    assert!(e.problems[0].message.contains("http[s]://HOST"), "{e}");
    let e = parse("[hook]\nargv = []\n").unwrap_err();
    assert!(e.problems[0].message.contains("hook.argv is empty"), "{e}");
    let e = parse("[hook]\nargv = [\"x\"]\ntimeout = \"0s\"\n").unwrap_err();
    assert!(e.problems[0].message.contains("hook.timeout"), "{e}");
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

/// `dist/watch.toml`, which says it lists every key with its default.
const DIST: &str = include_str!("../../../dist/watch.toml");

/// `text` with the commented-out block that starts at the line `# {first}` uncommented.
fn uncomment(text: &str, first: &str) -> String {
    let mut inside = false;
    let mut found = false;
    let mut out = String::new();
    for line in text.lines() {
        if line == format!("# {first}") {
            inside = true;
            found = true;
        } else if !line.starts_with('#') {
            inside = false;
        }
        out.push_str(if inside { line.strip_prefix("# ").unwrap_or(line) } else { line });
        out.push('\n');
    }
    assert!(found, "dist/watch.toml has no '# {first}' block");
    out
}

#[test]
fn dist_watch_toml_lists_the_built_in_defaults() {
    let dist = parse(DIST).unwrap();
    let builtin = parse("").unwrap();
    assert_eq!(
        dist.defaults, builtin.defaults,
        "[defaults] of dist/watch.toml differ from the built-in ones"
    );
    assert_eq!(
        (dist.discover_interval, dist.console_keep, dist.metrics, dist.bundles_keep, &dist.node),
        (
            builtin.discover_interval,
            builtin.console_keep,
            builtin.metrics,
            builtin.bundles_keep,
            &builtin.node
        )
    );
    assert_eq!(dist.console_budget, builtin.console_budget);
    assert_eq!(dist.event_log, Some(dist.data_dir.join("events.jsonl")));
    assert_eq!((dist.event_hold, dist.bundles_budget), (builtin.event_hold, builtin.bundles_budget));
    assert!(dist.controller.is_none() && dist.hook.is_none() && dist.vms.is_empty());

    // The commented-out sections show their defaults too: uncommented, they change nothing but
    // the required keys.
    let on = parse(&uncomment(&uncomment(DIST, "[controller]"), "[hook]")).unwrap();
    let only = parse(
        "[controller]\nurl = \"http://127.0.0.1:8080\"\n[hook]\nargv = [\"/usr/local/libexec/acpimon-analyze\"]\n",
    )
    .unwrap();
    assert_eq!(format!("{:?}", on.controller), format!("{:?}", only.controller));
    assert_eq!(format!("{:?}", on.hook), format!("{:?}", only.hook));
    let console = parse(&uncomment(DIST, "[[defaults.scenario]]")).unwrap();
    let only = parse("[[defaults.scenario]]\nkind = \"console\"\n").unwrap();
    assert_eq!(console.defaults.scenarios[1], only.defaults.scenarios[0]);
}

#[test]
fn diagnostics_deadline_and_symbols() {
    let c = parse("").unwrap();
    assert_eq!(c.defaults.bundle, BundleSettings { deadline: Duration::from_secs(8), symbols: None });
    let text = "[defaults.diagnostics]\ndeadline = \"5s\"\nsymbols = \"/srv/System.map\"\n\
                [vm.web]\n[vm.web.diagnostics]\ndeadline = \"20s\"\n";
    let c = parse(text).unwrap();
    assert_eq!(c.defaults.bundle.deadline, Duration::from_secs(5));
    // Key by key: web keeps the default symbols.
    let web = c.settings_for("web");
    assert_eq!(
        (web.bundle.deadline, web.bundle.symbols.as_deref()),
        (Duration::from_secs(20), Some(Path::new("/srv/System.map")))
    );
    let v = crate::report::config_json(&c);
    assert_eq!(
        v["defaults"]["diagnostics"],
        serde_json::json!({ "deadline": "5s", "symbols": "/srv/System.map" })
    );
    let e = parse("[defaults.diagnostics]\nsymbols = \"System.map\"\ndeadline = \"0s\"\n").unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.contains("defaults.diagnostics: symbols = \"System.map\" must be an absolute path"),
        "{shown}"
    );
    assert!(shown.contains("defaults.diagnostics: deadline must be more than zero"), "{shown}");
    assert!(parse("[defaults.diagnostics]\nsymbol = \"/x\"\n").is_err());
}

#[test]
fn watch_reads_the_system_file_when_given_none() {
    let dir = tempfile::tempdir().unwrap();
    let system = dir.path().join("watch.toml");
    // None there: the built-in configuration on --state-dir.
    let c = Config::resolve(None, &system, Some(dir.path().join("vms"))).unwrap();
    assert_eq!((c.state_dir.clone(), c.node.clone()), (dir.path().join("vms"), host_name()));
    std::fs::write(&system, "node = \"from-etc\"\nstate_dir = \"/srv/vms\"\n").unwrap();
    let c = Config::resolve(None, &system, None).unwrap();
    assert_eq!((c.node.as_str(), c.state_dir.to_str()), ("from-etc", Some("/srv/vms")));
    // --state-dir still overrides it, and --config wins over it.
    let c = Config::resolve(None, &system, Some("/x".into())).unwrap();
    assert_eq!((c.node.as_str(), c.state_dir.to_str()), ("from-etc", Some("/x")));
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "node = \"given\"\n").unwrap();
    assert_eq!(Config::resolve(Some(&other), &system, None).unwrap().node, "given");
    // A broken system file is reported, not skipped.
    std::fs::write(&system, "node = [\n").unwrap();
    let e = Config::resolve(None, &system, None).unwrap_err();
    assert_eq!(e.file, system);
}

#[test]
fn the_event_hold_and_the_bundle_budgets_are_read_and_checked() {
    let c = parse(
        "event_hold_max = \"1MiB\"\nevent_hold_max_events = 10\n[bundles]\nmax_bytes_per_vm = \"100MiB\"\nmax_bytes = \"1GiB\"\n",
    )
    .unwrap();
    assert_eq!((c.event_hold.max_bytes, c.event_hold.max_events), (1 << 20, 10));
    assert_eq!((c.bundles_budget.per_vm, c.bundles_budget.total), (100 << 20, 1 << 30));
    assert_eq!(c.bundles_keep, 10, "keep_per_vm keeps its default beside the budgets");
    let v = crate::report::config_json(&c);
    assert_eq!(
        (v["event_hold_max_events"].as_u64(), v["bundles"]["max_bytes"].as_u64()),
        (Some(10), Some(1 << 30))
    );
    let e = parse("event_hold_max = \"1KiB\"\nevent_hold_max_events = 0\n[bundles]\nmax_bytes = \"1KiB\"\n")
        .unwrap_err();
    let all = e.to_string();
    assert_eq!(e.problems.len(), 3, "{all}");
    assert!(
        all.contains("event_hold_max must be at least 64KiB")
            && all.contains("event_hold_max_events must be more than 0"),
        "{all}"
    );
    assert!(all.contains("[bundles] max_bytes must be at least 1MiB"), "{all}");
}

#[test]
fn the_node_wide_bundle_limit_is_read_and_checked() {
    assert_eq!(parse("").unwrap().bundles_concurrent, crate::watch::bundles::default_concurrent());
    let c = parse("[bundles]\nconcurrent = 3\n").unwrap();
    assert_eq!((c.bundles_concurrent, c.bundles_keep), (3, 10));
    assert_eq!(crate::report::config_json(&c)["bundles"]["concurrent"].as_u64(), Some(3));
    let all = parse("[bundles]\nconcurrent = 0\n").unwrap_err().to_string();
    assert!(all.contains("[bundles] concurrent must be at least 1"), "{all}");
}

#[test]
fn the_resolved_configuration_serialises_with_the_file_keys() {
    let c = parse(FULL).unwrap();
    let v = crate::report::config_json(&c);
    assert_eq!(v["defaults"]["pause"], "exempt");
    assert_eq!(v["defaults"]["startup_grace"], "30s");
    assert_eq!(v["defaults"]["recovery"], serde_json::json!({ "action": "reset", "max_per_hour": 2 }));
    assert_eq!(
        v["defaults"]["scenario"][0],
        serde_json::json!({ "name": "acpi-heartbeat", "kind": "acpi-heartbeat", "interval": "500ms", "timeout": "1s", "threshold": 4 })
    );
    assert_eq!(v["defaults"]["scenario"][1]["expect"], "^\\d+\\.\\d+ ");
    assert_eq!(v["vm"]["web"]["scenario"][0]["address"], "192.168.1.5:80");
    assert_eq!(v["controller"]["spool_max"], 1 << 20);
    assert_eq!(v["defaults"]["diagnostic"][2]["step"], "sysrq");
    // Read back as a configuration, its defaults are the same.
    let defaults = serde_json::json!({ "defaults": v["defaults"] });
    let text = toml::to_string(&serde_json::from_value::<toml::Table>(defaults).unwrap()).unwrap();
    let again = parse(&text).unwrap();
    assert_eq!(again.defaults, c.defaults);
}

#[test]
fn the_libvirt_section_needs_the_feature_and_a_uri() {
    let c = parse("[libvirt]\nuri = \"qemu:///system\"\ndomains = [\"web1\"]\n");
    if cfg!(feature = "libvirt") {
        let l = c.unwrap().libvirt.unwrap();
        assert_eq!(l, LibvirtConfig { uri: "qemu:///system".into(), domains: vec!["web1".into()] });
        let e = parse("[libvirt]\nuri = \"\"\n").unwrap_err().to_string();
        assert!(e.contains("uri is empty"), "{e}");
    } else {
        let e = c.unwrap_err().to_string();
        assert!(e.contains("built without libvirt") && e.contains("--features libvirt"), "{e}");
    }
    assert!(parse("").unwrap().libvirt.is_none());
}

#[test]
fn kernel_report_policies_are_per_vm_and_their_problems_name_the_line() {
    let c = parse(
        "[defaults.kernel_reports]\nhung-task = \"unresponsive\"\n\n[vm.db]\n[vm.db.kernel_reports]\noom = { action = \"report\", clear_after = \"1m\" }\n",
    )
    .unwrap();
    use crate::sentinel::ReportClass;
    use crate::watch::kernel::Action;
    assert_eq!(c.defaults.kernel_reports.get(ReportClass::HungTask).action, Action::Unresponsive);
    let db = &c.settings_for("db").kernel_reports;
    assert_eq!(db.get(ReportClass::HungTask).action, Action::Unresponsive, "inherited from [defaults]");
    assert_eq!(db.get(ReportClass::Oom).action, Action::Report);
    let e = parse("node = \"n\"\n\n[vm.db]\nkernel_reports = { soft-lockup = \"ignore\" }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("watch.toml:4: vm.db.kernel_reports.soft-lockup: unknown action 'ignore'"), "{e}");
}

#[test]
fn the_kernel_log_is_followed_per_vm_and_not_too_often() {
    use crate::watch::config::FollowMode;
    let c = parse(
        "[defaults]\nkernel_log_every = \"10s\"\n\n[vm.db]\nkernel_log_follow = \"always\"\n\n[vm.web]\n",
    )
    .unwrap();
    assert_eq!(
        (c.defaults.kernel_log_follow, c.defaults.kernel_log_every),
        (FollowMode::Auto, Duration::from_secs(10))
    );
    let db = c.settings_for("db");
    assert_eq!((db.kernel_log_follow, db.kernel_log_every), (FollowMode::Always, Duration::from_secs(10)));
    assert_eq!(c.settings_for("web").kernel_log_follow, FollowMode::Auto);
    let e = parse("[vm.db]\nkernel_log_every = \"200ms\"\n").unwrap_err().to_string();
    assert!(e.contains("watch.toml:2: vm.db: kernel_log_every must be at least 1s"), "{e}");
    let e = parse("[vm.db]\nkernel_log_follow = \"sometimes\"\n").unwrap_err().to_string();
    assert!(e.contains("unknown variant `sometimes`, expected one of `auto`, `always`, `off`"), "{e}");
}
