use std::time::{Duration, Instant};

use serde_json::json;

use super::*;

/// `info network` of QEMU 10.0.2, 7.2.0 and 5.2.0 (identical but for the names QEMU makes up),
/// with `-netdev user,id=net0 -device virtio-net-pci,netdev=net0,id=nic0` and a filter on
/// net0, `-net nic,model=e1000 -net user` (a hub), a NIC without a backend (`lonely`) and a
/// backend without a NIC (`sock0`).
const QEMU_10: &str = "hub 0\r\n \\ hub0port1: #net111: index=0,type=user,net=10.0.2.0,restrict=off\r\n \\ hub0port0: e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\r\nsock0: index=0,type=socket,\r\nnic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\r\n \\ net0: index=0,type=user,net=10.0.2.0,restrict=off\r\nfilters:\r\n  - f0: type=filter-buffer,interval=1000,position=tail,status=on,insert=behind,netdev=net0,queue=all\r\nlonely: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:58\r\n";
const QEMU_7_2: &str = "hub 0\r\n \\ hub0port1: #net127: index=0,type=user,net=10.0.2.0,restrict=off\r\n \\ hub0port0: e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\r\nsock0: index=0,type=socket,\r\nnic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\r\n \\ net0: index=0,type=user,net=10.0.2.0,restrict=off\r\nfilters:\r\n  - f0: type=filter-buffer,interval=1000,position=tail,status=on,insert=behind,netdev=net0,queue=all\r\nlonely: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:58\r\n";
const QEMU_5_2: &str = "hub 0\r\n \\ hub0port1: __org.qemu.net1: index=0,type=user,net=10.0.2.0,restrict=off\r\n \\ hub0port0: e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\r\nsock0: index=0,type=socket,\r\nnic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\r\n \\ net0: index=0,type=user,net=10.0.2.0,restrict=off\r\nfilters:\r\n  - f0: type=filter-buffer,position=tail,status=on,insert=behind,netdev=net0,queue=all,interval=1000\r\nlonely: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:58\r\n";
/// QEMU 10 with `-nic user,model=virtio-net-pci` (the backend's name made up) and two NICs
/// with their backends.
const QEMU_10_NICS: &str = "virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ #net097: index=0,type=user,net=10.0.2.0,restrict=off\r\nnic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\r\n \\ net0: index=0,type=user,net=10.0.2.0,restrict=off\r\ne1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:58\r\n \\ net1: index=0,type=user,net=10.0.2.0,restrict=off\r\n";

fn link(name: &str, kind: &str, link_up: bool, peer: Option<&str>) -> NetLink {
    NetLink { name: name.into(), kind: kind.into(), link_up, peer: peer.map(Into::into) }
}

#[test]
fn info_network_of_qemu_5_2_7_2_and_10() {
    let expected = vec![
        link("e1000.0", "e1000", true, Some("hub 0")),
        link("sock0", "socket", false, None),
        link("nic0", "virtio-net-pci", true, Some("net0 (user)")),
        link("lonely", "virtio-net-pci", false, None),
    ];
    for (qemu, text) in [("10.0", QEMU_10), ("7.2", QEMU_7_2), ("5.2", QEMU_5_2)] {
        assert_eq!(parse_info_network(text), expected, "QEMU {qemu}");
    }
    assert_eq!(
        parse_info_network(QEMU_10_NICS),
        vec![
            link("virtio-net-pci.0", "virtio-net-pci", true, Some("#net097 (user)")),
            link("nic0", "virtio-net-pci", true, Some("net0 (user)")),
            link("e1000.0", "e1000", true, Some("net1 (user)")),
        ]
    );
    // Without carriage returns, and a `link=down` should a QEMU print it.
    let down = "nic0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:57,link=down\n \\ net0: index=0,type=tap,ifname=tap0,link=down\n";
    assert_eq!(parse_info_network(down), vec![link("nic0", "e1000", false, Some("net0 (tap)"))]);
    // Nothing, or not QEMU's format: no devices, no panic.
    for junk in ["", "\n\n", "hub", " \\ ", "x: y", ": index=", " \\ : index=,type=nic", "hub 0\n \\ a: b: c"]
    {
        let _ = parse_info_network(junk);
    }
    assert!(parse_info_network("some error text\n").is_empty());
}

#[test]
fn hostile_info_network_is_bounded() {
    let long = "n".repeat(100_000);
    let text = format!("{long}: index=0,type=nic,model={long}\n");
    let links = parse_info_network(&text);
    assert!(links.iter().all(|l| l.name.len() <= MAX_NAME && l.kind.len() <= 64), "{}", links.len());
    let many: String = (0..10_000)
        .map(|i| format!("nic{i}: index=0,type=nic,model=e1000\n \\ n{i}: index=0,type=user\n"))
        .collect();
    let links = parse_info_network(&many);
    assert_eq!(links.len(), MAX_DRIVES);
    assert!(links.iter().all(|l| l.link_up));
    // Multi-byte characters cut on their boundary.
    let wide = format!("{}: index=0,type=nic\n", "é".repeat(1000));
    assert!(parse_info_network(&wide)[0].name.len() <= MAX_NAME);
}

fn io_error(time: &str, operation: &str) -> IoError {
    IoError {
        time: time.into(),
        operation: operation.into(),
        action: "stop".into(),
        nospace: false,
        reason: "Input/output error".into(),
    }
}

#[test]
fn errors_are_coalesced_per_stream_and_window() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_millis(s);
    let mut c = Coalescer::new(Duration::from_secs(10));
    // The first is an event at once.
    let first = c.error("disk0", Some("#block1"), &io_error("T0", "write"), at(0));
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].count, first[0].first.as_str(), first[0].last.as_str()), (1, "T0", "T0"));
    assert_eq!(first[0].node_name.as_deref(), Some("#block1"));
    // A thousand more within the window: counted, no event.
    for i in 1..=1000 {
        assert!(c.error("disk0", Some("#block1"), &io_error(&format!("T{i}"), "write"), at(i)).is_empty());
    }
    // Another stream (a read) is its own.
    assert_eq!(c.error("disk0", None, &io_error("R0", "read"), at(1500)).len(), 1);
    assert!(c.flush(at(9_999)).is_empty(), "the window has not ended");
    let due = c.flush(at(10_000));
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!((due[0].count, due[0].first.as_str(), due[0].last.as_str()), (1000, "T1", "T1000"));
    assert_eq!(due[0].operation, "write");
    // The read stream was quiet after its first: forgotten at its window's end, no event.
    assert!(c.flush(at(11_500)).is_empty());
    assert_eq!(c.error("disk0", None, &io_error("R1", "read"), at(12_000)).len(), 1, "a new stream");
    // The write stream goes on in its next window, then stops: one more event, then quiet.
    assert!(c.error("disk0", None, &io_error("T1001", "write"), at(15_000)).is_empty());
    let due = c.flush(at(20_000));
    assert_eq!(due.iter().map(|e| (e.count, e.first.as_str())).collect::<Vec<_>>(), [(1, "T1001")]);
    assert!(c.flush(at(30_000)).is_empty());
    assert_eq!(c.error("disk0", None, &io_error("T2000", "write"), at(31_000)).len(), 1);
    // A window that ended without a flush: its count first, then the new stream's first.
    assert!(c.error("disk0", None, &io_error("T2001", "write"), at(32_000)).is_empty());
    let due = c.error("disk0", None, &io_error("T2002", "write"), at(45_000));
    assert_eq!(
        due.iter().map(|e| (e.count, e.first.as_str())).collect::<Vec<_>>(),
        [(1, "T2001"), (1, "T2002")]
    );
    // Detaching: what is counted comes out.
    assert!(c.error("disk0", None, &io_error("T2003", "write"), at(46_000)).is_empty());
    let drained = c.drain();
    assert_eq!(drained.len(), 1);
    assert_eq!(drained[0].first, "T2003");
    assert!(c.drain().is_empty());
}

#[test]
fn hostile_error_streams_are_bounded() {
    let t0 = Instant::now();
    let mut c = Coalescer::default();
    let long = "d".repeat(10_000);
    let ev = c.error(&long, Some(&long), &IoError { reason: long.clone(), ..io_error("T", "write") }, t0);
    assert!(ev[0].device.len() <= MAX_NAME && ev[0].reason.len() <= MAX_REASON);
    for i in 0..10_000 {
        c.error(&format!("disk{i}"), None, &io_error("T", "write"), t0);
    }
    assert_eq!(c.bursts.len(), MAX_DRIVES);
    assert!(c.dropped >= 10_000 - MAX_DRIVES as u64);

    let mut h = DeviceHistory::default();
    for i in 0..10_000 {
        h.io_error(&format!("{i}{long}"), io_error("T", "write"));
    }
    assert_eq!(h.errors.len(), MAX_DRIVES);
    assert!(h.errors.keys().all(|k| k.len() <= MAX_NAME));
    h.io_error(&long, IoError { reason: long.clone(), ..io_error("T", "write") });
    assert!(h.errors.values().all(|e| e.last.reason.len() <= MAX_REASON));
}

#[test]
fn the_history_counts_errors_and_gives_deltas() {
    let mut h = DeviceHistory::default();
    h.io_error("disk0", io_error("T0", "write"));
    h.io_error("disk0", io_error("T1", "write"));
    let e = &h.errors["disk0"];
    assert_eq!((e.count, e.first.time.as_str(), e.last.time.as_str()), (2, "T0", "T1"));

    let t0 = Instant::now();
    let mut s =
        DriveStats { wr_operations: 10, wr_bytes: 4096, failed_wr_operations: 1, ..Default::default() };
    h.stats_reading("disk0", t0, &mut s);
    assert_eq!(s.delta, None, "the first reading");
    let mut s =
        DriveStats { wr_operations: 12, wr_bytes: 8192, failed_wr_operations: 3, ..Default::default() };
    h.stats_reading("disk0", t0 + Duration::from_secs(2), &mut s);
    assert_eq!(s.delta, Some(DriveDelta { seconds: 2.0, operations: 2, failed_operations: 2, bytes: 4096 }));
    // Counters that went back (QEMU counts afresh): no delta.
    let mut s = DriveStats::default();
    h.stats_reading("disk0", t0 + Duration::from_secs(3), &mut s);
    assert_eq!(s.delta, None);
    // Bounded: the oldest drive makes room.
    for i in 0..200 {
        h.stats_reading(&format!("d{i}"), t0 + Duration::from_secs(4 + i), &mut DriveStats::default());
    }
    assert_eq!(h.last_stats.len(), MAX_DRIVES);
    assert!(h.last_stats.contains_key("d199") && !h.last_stats.contains_key("disk0"));
    h.clear();
    assert!(h.errors.is_empty() && h.last_stats.is_empty());
}

/// `query-block` and `query-blockstats` as QEMU 10 answered with `-drive
/// if=none,id=disk0,...,werror=stop -device virtio-blk-pci,drive=disk0,id=vdisk0` and a
/// `-blockdev node-name=n1` on a device without an id (trimmed to the fields read).
fn replies() -> (Value, Value) {
    let block = json!([
        {"io-status": "failed", "device": "disk0", "locked": false, "removable": false,
         "inserted": {"ro": false, "node-name": "#block178", "drv": "raw", "file": "/tmp/hd/img"},
         "qdev": "/machine/peripheral/vdisk0/virtio-backend", "type": "unknown"},
        {"io-status": "ok", "device": "", "locked": false, "removable": false,
         "inserted": {"ro": true, "node-name": "n1", "drv": "file", "file": "/tmp/hd/img2"},
         "qdev": "/machine/peripheral-anon/device[1]/virtio-backend", "type": "unknown"},
        {"device": "cd0", "locked": false, "removable": true, "type": "unknown"}
    ]);
    let stats = json!([
        {"device": "disk0", "node-name": "#block178", "qdev": "/machine/peripheral/vdisk0/virtio-backend",
         "stats": {"rd_operations": 5, "wr_operations": 0, "flush_operations": 0, "rd_bytes": 2560,
                   "wr_bytes": 0, "failed_rd_operations": 0, "failed_wr_operations": 3,
                   "failed_flush_operations": 0, "idle_time_ns": 2_500_000_000u64}},
        {"device": "", "node-name": "n1", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
         "stats": {"rd_operations": 1}},
        {"device": "gone", "stats": {}},
        "junk"
    ]);
    (block, stats)
}

#[test]
fn drives_are_read_and_matched_with_their_statistics() {
    let (block, stats) = replies();
    let mut notes = Vec::new();
    let mut drives = drives(&block, &mut notes);
    assert_eq!(drives.len(), 3);
    assert_eq!(drives[0].device, "disk0");
    assert_eq!(drives[0].node.as_deref(), Some("#block178"));
    assert_eq!(drives[0].file.as_deref(), Some("/tmp/hd/img"));
    assert!(drives[0].failed());
    assert_eq!(
        drives[1].device, "/machine/peripheral-anon/device[1]/virtio-backend",
        "no name: its qdev path"
    );
    assert!(drives[1].read_only && !drives[1].failed());
    assert_eq!((drives[2].node.as_deref(), drives[2].io_status.as_deref()), (None, None));
    let found = attach_stats(&mut drives, &stats, &mut notes);
    assert_eq!(found.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(found[0].1.failed_wr_operations, 3);
    assert_eq!(found[0].1.idle_ms, Some(2500));
    assert_eq!(found[1].1.rd_operations, 1);
    assert_eq!(notes, ["query-blockstats: 1 entries unreadable, left out"]);

    // The errors of a drive with no name are found by its node.
    let mut h = DeviceHistory::default();
    h.io_error("n1", io_error("T", "read"));
    assert_eq!(h.errors_of(&drives[1]).map(|e| e.count), Some(1));
    assert_eq!(h.errors_of(&drives[0]), None);
}

#[test]
fn hostile_replies_are_bounded() {
    let long = "x".repeat(100_000);
    let one = json!({"device": long, "qdev": long, "io-status": long,
                     "inserted": {"node-name": long, "file": long}});
    let many = Value::Array(vec![one; 10_000]);
    let mut notes = Vec::new();
    let drives = drives(&many, &mut notes);
    assert_eq!(drives.len(), MAX_DRIVES);
    assert!(drives.iter().all(|d| d.device.len() <= MAX_NAME
        && d.qdev.as_ref().unwrap().len() <= MAX_NAME
        && d.node.as_ref().unwrap().len() <= MAX_NAME
        && d.file.as_ref().unwrap().len() <= MAX_FILE
        && d.io_status.as_ref().unwrap().len() <= 32));
    assert_eq!(notes, ["query-block: 10000 entries, the first 64 kept"]);
    // Not a list; negative or huge counters.
    let mut notes = Vec::new();
    assert!(super::drives(&json!({"a": 1}), &mut notes).is_empty());
    assert_eq!(notes, ["query-block: the reply is not a list"]);
    let odd = json!([{"device": "d", "stats": {"rd_operations": -5, "wr_bytes": 1e300, "idle_time_ns": -1}}]);
    let mut ds = vec![Drive { device: "d".into(), ..Default::default() }];
    let found = attach_stats(&mut ds, &odd, &mut notes);
    assert!(found.is_empty() || found[0].1.rd_operations == 0, "{:?}", found.len());
}

#[test]
fn query_stats_is_kept_bounded_or_noted() {
    let mut notes = Vec::new();
    assert_eq!(stats_reply(json!([]), &mut notes), None);
    assert!(notes[0].starts_with("query-stats: not provided by this QEMU/accelerator"), "{notes:?}");
    let some = json!([{"provider": "kvm", "qom-path": "/machine/unattached/device[0]", "stats": [{"name": "exits", "value": 9}]}]);
    assert_eq!(stats_reply(some.clone(), &mut notes), Some(some));
    let huge = json!([{"provider": "kvm", "stats": [{"name": "x".repeat(MAX_STATS), "value": 1}]}]);
    assert_eq!(stats_reply(huge, &mut notes), None);
    assert!(notes[1].contains("not kept"), "{notes:?}");
}

#[test]
fn drive_names_of_events() {
    assert_eq!(drive_name("disk0", Some("#block1")), "disk0");
    assert_eq!(drive_name("", Some("n1")), "n1");
    assert_eq!(drive_name("", None), "");
    assert_eq!(drive_name(&"x".repeat(1000), None).len(), MAX_NAME);
}

#[test]
fn the_vcpu_stats_filter_serialises() {
    // The typed command `read` sends, as QEMU 7.1+ takes it.
    let cmd = qapi::qmp::query_stats(qapi::qmp::StatsFilter::vcpu {
        providers: None,
        vcpu: qapi::qmp::StatsVCPUFilter { vcpus: None },
    });
    assert_eq!(serde_json::to_value(&cmd).unwrap(), json!({"target": "vcpu"}));
}
