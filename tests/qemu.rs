//! Real QEMU, real Linux guest (TCG): the whole heartbeat path of DESIGN.md.

mod common;

use std::time::Duration;

use acpimon::abi::{Source, Status};
use acpimon::generate::SsdtConfig;
use acpimon::launch::channel::Channel;
use acpimon::trigger::{Beat, Completion, Via, DOORBELL_SAFETY_POLL};
use common::guest::{Edk2, Firmware, Guest, GuestSpec};

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn pc_seabios_boot_record_and_50_events() {
    let g = Guest::boot(GuestSpec::new("pc")).await;
    let boot = g.record().expect("_INI wrote the boot record");
    assert!(boot.boot_count >= 1);
    assert!(boot.bar != 0 && boot.bar & 0xfff == 0, "a page-aligned BAR below 4 GiB: {:#x}", boot.bar);
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    let before = g.record().unwrap();
    let lat = g.beats_acked(&mut hb, 50).await;
    let after = g.record().unwrap();
    assert_eq!(after.ged_count - before.ged_count, 50, "one GED event per trigger");
    assert_eq!(after.seq - before.seq, 100);
    assert_eq!(after.source, Source::Ged);
    assert_eq!(after.boot_count, boot.boot_count, "no reboot");
    eprintln!("pc: 50 events, p50 {:?}, max {:?}", p50(lat.clone()), lat.iter().max().unwrap());
}

/// The default launch has the doorbell: each beat is woken by the byte `_EVT` writes to the
/// isa-debugcon after its record, in the argv and the -readconfig form alike.
#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_complete_through_the_doorbell() {
    for readconfig in [false, true] {
        let g = Guest::boot(GuestSpec { readconfig, ..GuestSpec::new("q35") }).await;
        let completion = g.vm.completion.describe();
        assert!(completion.starts_with("doorbell ("), "readconfig {readconfig}: {completion}");
        let Completion::Doorbell(bell) = &g.vm.completion else { unreachable!() };
        let mut hb = g.heartbeat();
        g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
        let rings = bell.rings();
        let (mut lat, mut woken) = (Vec::new(), 0);
        for _ in 0..20 {
            match hb.beat(&g.vm.qmp, Duration::from_secs(2)).await.unwrap() {
                Beat::Acked { latency, via, .. } => {
                    // A record already complete at the first look is found before its ring is
                    // read (Poll); none waits for the 250 ms safety poll.
                    assert!(latency < DOORBELL_SAFETY_POLL, "readconfig {readconfig}: {via:?} {latency:?}");
                    woken += usize::from(via == Via::Doorbell);
                    lat.push(latency);
                }
                missed => panic!("readconfig {readconfig}: {missed:?}"),
            }
        }
        assert_eq!(hb.completion(), completion, "the doorbell kept ringing");
        // One ring per event (the last may still be on its way, the first ack's just read).
        let rung = bell.rings() - rings;
        assert!((19..=21).contains(&rung), "readconfig {readconfig}: {rung} rings for 20 beats");
        assert!(woken >= 10, "readconfig {readconfig}: only {woken} of 20 beats woken by the doorbell");
        eprintln!(
            "doorbell (readconfig {readconfig}): 20 beats, p50 {:?}, max {:?}",
            p50(lat.clone()),
            lat.iter().max().unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn q35_nodefaults_argv() {
    let g = Guest::boot(GuestSpec::new("q35")).await;
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    g.beats_acked(&mut hb, 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn q35_from_a_readconfig_file() {
    let g = Guest::boot(GuestSpec { readconfig: true, ..GuestSpec::new("q35") }).await;
    let cfg = std::fs::read_to_string(g.vm.prepared.dir.join("acpimon.cfg")).unwrap();
    assert!(cfg.contains("[device \"acpimon-shm\"]") && cfg.contains("[mon \"acpimon-qmp\"]"), "{cfg}");
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    g.beats_acked(&mut hb, 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn qmp_stop_pauses_records_and_cont_resumes_them() {
    let g = Guest::boot(GuestSpec::new("q35")).await;
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    let mut events = g.vm.qmp.events();
    g.vm.qmp.execute(qapi::qmp::stop {}).await.unwrap();
    let paused = g.record().unwrap();
    for _ in 0..3 {
        match hb.beat(&g.vm.qmp, Duration::from_millis(700)).await.unwrap() {
            Beat::Missed { .. } => {}
            acked => panic!("a paused guest answered: {acked:?}"),
        }
    }
    assert_eq!(g.record().unwrap().seq, paused.seq, "no record while paused");
    g.vm.qmp.execute(qapi::qmp::cont {}).await.unwrap();
    // The line raised while paused fires on resume, then heartbeats resume.
    g.until_first_ack(&mut hb, Duration::from_secs(10)).await;
    g.beats_acked(&mut hb, 5).await;
    let mut names = Vec::new();
    while let Ok(ev) = events.try_recv() {
        names.push(ev.name);
    }
    assert!(names.contains(&"STOP".to_string()) && names.contains(&"RESUME".to_string()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_heartbeat_continues_with_all_userspace_stopped() {
    let g = Guest::boot(GuestSpec { scenario: "userspace-stop", delay: 2, ..GuestSpec::new("pc") }).await;
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    g.wait_console("stopping userspace", 0, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Userspace is gone: the shell no longer answers the console...
    let console = g.vm.console().unwrap();
    let mark = console.position();
    console.send(b"echo alive-$((6*7))\n").await.unwrap();
    assert!(console.wait_for("alive-42", mark, Duration::from_secs(3)).await.is_err(), "userspace answered");
    // ...but the kernel's ACPI interpreter still runs our AML.
    g.beats_acked(&mut hb, 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn thermal_fallback_records_arrive_without_a_trigger() {
    let ssdt = SsdtConfig { thermal_period_ds: Some(5), ..SsdtConfig::default() };
    let g = Guest::boot(GuestSpec { ssdt, ..GuestSpec::new("pc") }).await;
    // Wait for the thermal driver to start polling.
    let start = tokio::time::Instant::now();
    while g.record().map_or(0, |r| r.thermal_count) < 2 {
        assert!(start.elapsed() < Duration::from_secs(30), "no thermal record: {:?}", g.snapshot());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = g.record().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let last = g.record().unwrap();
    let polls = last.thermal_count - first.thermal_count;
    // _TZP = 5 ds: 10 polls in 5 s; allow for TCG scheduling.
    assert!((7..=13).contains(&polls), "{polls} polls in 5 s at a 0.5 s period");
    assert_eq!(last.ged_count, 0, "no host trigger was sent");
    assert_eq!(last.source, Source::Thermal);
}

/// OVMF, as EVE boots app VMs: acpimon asks OVMF for no 64-bit PCI window, so BAR2 lands below
/// 4 GiB, and names the channel. Debian's OVMF 2022.11 also needs a phys-bits it distrusts.
#[tokio::test(flavor = "multi_thread")]
async fn ovmf_q35_monitors_through_a_low_bar_and_names_the_channel() {
    let spec = GuestSpec {
        firmware: Firmware::Ovmf,
        extra: vec!["-cpu".into(), "qemu64,phys-bits=37".into()],
        ..GuestSpec::new("q35")
    };
    let g = Guest::boot(spec).await;
    assert!(g.vm.notes.iter().any(|n| n.contains("X-PciMmio64Mb,string=0")), "{:?}", g.vm.notes);
    low_bar_and_ten_beats(&g).await;
}

/// With OVMF's 64-bit window kept (here by the user's own fw_cfg, which acpimon respects), the
/// BAR is above 4 GiB: the AML writes nothing to the region and sends each record as a frame
/// on the doorbell port instead; the beats are answered through it, and the channel report
/// names the port and why. Debian bookworm's OVMF (edk2 2022.11).
#[tokio::test(flavor = "multi_thread")]
async fn ovmf_with_a_high_bar_is_monitored_through_the_port_and_says_why() {
    let spec = GuestSpec {
        firmware: Firmware::Ovmf,
        extra: vec!["-fw_cfg".into(), "name=opt/ovmf/X-PciMmio64Mb,string=32768".into()],
        ..GuestSpec::new("q35")
    };
    let g = Guest::boot(spec).await;
    assert!(g.vm.notes.is_empty(), "the user's own setting is kept: {:?}", g.vm.notes);
    high_bar_through_the_port(&g).await;
}

/// The same with Debian trixie's OVMF (edk2 2025.02) from pflash, its 64-bit window kept.
#[tokio::test(flavor = "multi_thread")]
async fn trixie_ovmf_with_a_high_bar_is_monitored_through_the_port() {
    let spec = GuestSpec {
        firmware: Firmware::Pflash(Edk2::Trixie),
        extra: vec!["-fw_cfg".into(), "name=opt/ovmf/X-PciMmio64Mb,string=32768".into()],
        ..GuestSpec::new("q35")
    };
    let g = Guest::boot(spec).await;
    high_bar_through_the_port(&g).await;
}

async fn high_bar_through_the_port(g: &Guest) {
    let channel = g.vm.channel().await.unwrap();
    let Channel::Port { port, region } = &channel else { panic!("{channel}") };
    let Channel::AboveFourGib { bar } = **region else { panic!("{channel}") };
    let text = channel.to_string();
    assert!(
        text.starts_with(&format!("I/O port {port:#x} frames: ivshmem BAR2 at {bar:#x} is above 4 GiB")),
        "{text}"
    );
    assert_eq!(g.record(), None, "nothing written through a BAR the AML cannot reach");
    let bell = g.vm.completion.doorbell().expect("the doorbell is connected");
    let boot = bell.latest_frame().expect("the boot record came as a frame");
    assert_eq!(Source::from_code(boot.source.get()), Source::Boot);
    assert_eq!(Status::from_code(boot.status.get()), Status::BarAbove4Gib);
    assert_eq!(u64::from(boot.bar3.get()) << 32 | u64::from(boot.bar2.get() & !0xf), bar, "the frame's BAR");
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    assert!(hb.port_channel(), "the heartbeat sends its nonce on pc-testdev's register");
    for _ in 0..5 {
        match hb.beat(&g.vm.qmp, Duration::from_secs(2)).await.unwrap() {
            Beat::Acked { via, record, request_no, .. } => {
                assert_eq!(via, Via::Port);
                assert_eq!((record.echo_request_no, record.status), (request_no, Status::BarAbove4Gib));
                assert_eq!(u64::from(record.bar), bar & 0xffff_ffff);
            }
            missed => panic!("not answered on the port: {missed:?}"),
        }
    }
    let (bad, why) = bell.bad_frames();
    assert_eq!(bad, 0, "no frame dropped: {why:?}");
    assert_eq!(g.record(), None, "still nothing in the region");
}

/// EVE's launch: q35, `-nodefaults -no-shutdown -S`, the machine and OVMF's pflash drives in
/// the launcher's -readconfig file, acpimon's additions in a second one. acpimon finds OVMF in
/// the file and adds the low-BAR knob as a `[fw_cfg]` section; edk2 2025.02 (Debian trixie)
/// honours it with the CPU left alone.
#[tokio::test(flavor = "multi_thread")]
async fn eve_readconfig_with_trixie_ovmf_gets_a_low_bar_without_phys_bits() {
    let spec = GuestSpec {
        firmware: Firmware::Pflash(Edk2::Trixie),
        eve_config: true,
        readconfig: true,
        ..GuestSpec::new("q35")
    };
    let g = Guest::boot(spec).await;
    assert!(
        g.vm.notes
            .iter()
            .any(|n| n.contains("[drive]") && n.contains("if = \"pflash\"") && n.contains("launcher.cfg")),
        "the note names the config file's pflash drive: {:?}",
        g.vm.notes
    );
    let cfg = std::fs::read_to_string(g.vm.prepared.dir.join("acpimon.cfg")).unwrap();
    assert!(cfg.contains("[fw_cfg]\n  name = \"opt/ovmf/X-PciMmio64Mb\"\n  string = \"0\""), "{cfg}");
    low_bar_and_ten_beats(&g).await;
}

/// The same EVE launch with Debian bookworm's OVMF (edk2 2022.11): the knob alone leaves BAR2
/// above 4 GiB, and the channel says what to add; with `-cpu qemu64,phys-bits=37` it is low.
#[tokio::test(flavor = "multi_thread")]
async fn eve_readconfig_with_bookworm_ovmf_needs_phys_bits_and_says_so() {
    let spec = GuestSpec {
        firmware: Firmware::Pflash(Edk2::Bookworm),
        eve_config: true,
        readconfig: true,
        wait_ready: false,
        ..GuestSpec::new("q35")
    };
    let g = Guest::boot(spec.clone()).await;
    assert!(g.vm.notes.iter().any(|n| n.contains("phys-bits=37")), "{:?}", g.vm.notes);
    g.wait_console(common::guest::READY, 0, common::guest::BOOT_TIMEOUT).await;
    let channel = g.vm.channel().await.unwrap();
    // Monitored through the port meanwhile; the report says how to get the cheaper region.
    assert!(
        matches!(&channel, Channel::Port { region, .. } if matches!(**region, Channel::AboveFourGib { .. })),
        "{channel}"
    );
    assert!(
        channel.to_string().contains("phys-bits=37") && channel.to_string().contains("-readconfig"),
        "{channel}"
    );
    drop(g);

    let g = Guest::boot(GuestSpec {
        extra: vec!["-cpu".into(), "qemu64,phys-bits=37".into()],
        wait_ready: true,
        ..spec
    })
    .await;
    assert!(!g.vm.notes.iter().any(|n| n.contains("phys-bits=37")), "the CPU is set: {:?}", g.vm.notes);
    low_bar_and_ten_beats(&g).await;
}

/// pvpanic on every QEMU: 6.0 and later keep the panicked guest running (`-action
/// panic=none`); 5.2 has no `-action`, and with `-no-shutdown` (as EVE launches) pauses it in
/// `guest-panicked`. Either way QEMU reports the panic and the console keeps the kernel's text.
#[tokio::test(flavor = "multi_thread")]
async fn a_panic_is_reported_and_the_guest_kept_on_every_qemu() {
    let spec =
        GuestSpec { scenario: "panic", delay: 2, extra: vec!["-no-shutdown".into()], ..GuestSpec::new("pc") };
    let g = Guest::boot(spec).await;
    let mut events = g.vm.qmp.events();
    let ev = common::guest::next_qmp_event(&mut events, "GUEST_PANICKED", Duration::from_secs(60)).await;
    let action = ev.raw["data"]["action"].as_str().unwrap_or_default().to_string();
    let (major, ..) = g.vm.qmp.version;
    let status = g.vm.qmp.status(Duration::from_secs(5)).await.unwrap();
    if major >= 6 {
        assert_eq!(action, "run", "-action panic=none keeps it running");
        assert!(g.vm.notes.is_empty(), "{:?}", g.vm.notes);
        assert_eq!(status.status, "running");
    } else {
        assert_eq!(action, "pause", "QEMU 5.2's default with -no-shutdown");
        assert!(
            g.vm.notes.iter().any(|n| n.contains("has no -action: a panicked guest pauses")),
            "{:?}",
            g.vm.notes
        );
        assert_eq!(status.status, "guest-panicked");
    }
    g.wait_console("Kernel panic - not syncing: sysrq triggered crash", 0, Duration::from_secs(10)).await;
    // pvpanic is a panic notifier: a guest paused there never prints the kernel's closing line.
    let end = "---[ end Kernel panic";
    if major >= 6 {
        g.wait_console(end, 0, Duration::from_secs(10)).await;
    } else {
        let console = g.vm.console().unwrap();
        assert!(
            console.wait_for(end, 0, Duration::from_secs(2)).await.is_err(),
            "a paused guest printed more"
        );
    }
}

/// OVMF's pflash drives on the command line of a pc machine, trixie's edk2: found in argv, and
/// the knob alone puts BAR2 below 4 GiB on pc too.
#[tokio::test(flavor = "multi_thread")]
async fn pc_with_trixie_ovmf_pflash_in_argv_gets_a_low_bar() {
    let g = Guest::boot(GuestSpec { firmware: Firmware::Pflash(Edk2::Trixie), ..GuestSpec::new("pc") }).await;
    assert!(g.vm.notes.iter().any(|n| n.contains("OVMF (-drive if=pflash")), "{:?}", g.vm.notes);
    low_bar_and_ten_beats(&g).await;
}

/// `acpimon run` over QEMU started paused (-S, as EVE launches): it resumes the VM and the
/// heartbeats are answered; with --wait-cont and nobody resuming, and with a kernel that never
/// loads the table (acpi=off), it says why at once instead of blaming the firmware later.
#[test]
fn run_resumes_a_vm_started_paused_and_says_why_when_no_heartbeat_can_answer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let qemu = common::guest::qemu();
    let run = |extra: &[&str], args: &[String]| {
        let mut argv = vec!["run", "--state-dir", d, "--interval-ms", "500"];
        argv.extend(extra);
        argv.push("--");
        argv.push(&qemu);
        argv.extend(args.iter().map(String::as_str));
        let start = std::time::Instant::now();
        let out = common::acpimon(&argv);
        (out, start.elapsed())
    };

    let spec = GuestSpec { extra: vec!["-S".into()], ..GuestSpec::new("pc") };
    let (out, _) = run(&["--duration", "6"], &spec.qemu_args());
    let (stdout, stderr) = (common::text(&out.stdout), common::text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("QEMU was started paused (-S): acpimon resumes it with `cont`"), "{stdout}");
    assert!(stdout.contains("guest booted: first record"), "{stdout}");
    assert!(stdout.contains("channel: shared region through ivshmem BAR2"), "{stdout}");
    assert!(!stdout.contains("unassigned"), "{stdout}");

    // Nobody resumes it: said at once, and at the end why nothing answered.
    let args: Vec<String> = ["-M", "pc", "-nodefaults", "-display", "none", "-S"].map(String::from).to_vec();
    let (out, took) = run(&["--duration", "3", "--wait-cont"], &args);
    let (stdout, stderr) = (common::text(&out.stdout), common::text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("waits for your `cont` (--wait-cont)"), "{stdout}");
    assert!(
        stderr.contains("no heartbeat was acknowledged: the VM never ran: QEMU waits for `cont`"),
        "{stderr}"
    );
    assert!(!stderr.contains("0 of 0") && !stdout.contains("firmware"), "{stdout}\n{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");

    // The kernel runs but never loads the table: said once the kernel is up, not after 120 s.
    let spec = GuestSpec { append: vec!["acpi=off".into()], ..GuestSpec::new("pc") };
    let (out, took) = run(&["--duration", "1"], &spec.qemu_args());
    let (stdout, stderr) = (common::text(&out.stdout), common::text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("error: no boot record 20s after the guest's kernel started"), "{stdout}");
    assert!(stderr.contains("no heartbeat was acknowledged: no boot record"), "{stderr}");
    assert!(took < Duration::from_secs(80), "{took:?}");
}

/// The channel is the region through a BAR below 4 GiB (the one the boot record names), and
/// ten heartbeats are acknowledged through it.
async fn low_bar_and_ten_beats(g: &Guest) {
    let channel = g.vm.channel().await.unwrap();
    let Channel::Region { bar } = channel else { panic!("{channel}") };
    assert!(bar < 1 << 32, "{channel}");
    assert_eq!(u64::from(g.record().expect("boot record").bar), bar);
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    g.beats_acked(&mut hb, 10).await;
}
