//! Nothing is lost silently: a burst of kernel refusals that overflows the ring buffer is
//! accounted for to the last one, and an audit writer that cannot keep up slows the
//! sandbox down instead of growing egress's memory or dropping records.
//!
//! Each test owns its loopback addresses (127.0.N.2), as in the other files.

use std::{
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
    time::{Duration, Instant},
};

use egress_tests::{testclient, Egress, TempDir, Upstream};
use serde_json::Value;

fn tc() -> String {
    testclient().display().to_string()
}

/// 100,000 refused UDP sends from four threads, as fast as the kernel takes them: more than
/// the ring buffer (256 KiB, about 4,000 events) holds while the reader writes each one to
/// the audit log. Every refusal is either a `kernel_deny` record or counted in an
/// `events_lost` record.
#[test]
fn a_burst_that_overflows_the_ring_buffer_is_accounted_for() {
    const SENDS: u64 = 100_000;
    let f = Egress::run(
        &[],
        &[&tc(), "flood", "127.0.80.2:9999", &SENDS.to_string(), "4"],
    )
    .finish();
    assert!(f.status.success(), "{:#?}", f.stderr);
    let out = f.client_json();
    let eperm = out["eperm"].as_u64().unwrap();
    assert_eq!(
        (out["sent"].as_u64(), out["other_errors"].as_u64()),
        (Some(0), Some(0)),
        "every send is refused with EPERM: {out}"
    );
    assert_eq!(eperm, SENDS, "{out}");
    let denies = f
        .audit_of("kernel_deny")
        .iter()
        .filter(|r| r["protocol"] == "udp" && r["dst"] == "127.0.80.2:9999")
        .count() as u64;
    let lost_records = f.audit_of("events_lost");
    let lost: u64 = lost_records
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    eprintln!(
        "{SENDS} refusals in {} ms: {denies} kernel_deny records, {lost} lost in {} events_lost records",
        out["elapsed_ms"],
        lost_records.len()
    );
    assert_eq!(
        denies + lost,
        eperm,
        "kernel_deny records + lost events == refusals the client saw"
    );
    assert!(
        lost > 0,
        "the ring buffer never overflowed ({denies} records for {eperm} refusals): this test \
         proves nothing on this machine"
    );
    // The running total ends at the sum, and the shutdown line says the same.
    assert_eq!(lost_records.last().unwrap()["total"], lost);
    assert_eq!(
        lost_records.last().unwrap()["reason"],
        "kernel ring buffer full"
    );
    let removed = f.log_with("sandbox removed");
    assert_eq!(removed.len(), 1, "{:#?}", f.logs);
    assert_eq!(removed[0]["events_lost"], lost, "{}", removed[0]);
    assert_eq!(
        removed[0]["denied"], eperm,
        "the kernel counted every refusal"
    );
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// The audit log is a FIFO that nobody reads for a while. Requests (each with an 8 KB path,
/// so each record is about 8 KB) stall once the 1 MiB queue is full, egress's RSS stays
/// within the bound, and once the FIFO is read every request's record arrives.
#[test]
fn a_stalled_audit_writer_holds_requests_back_with_bounded_memory_and_loses_nothing() {
    const REQUESTS: u64 = 10_000;
    const PATH_LEN: usize = 8_000;
    const QUEUE: u64 = 1 << 20;
    let _up = Upstream::start("127.0.81.2:80");
    let dir = TempDir::new("audit-fifo");
    let fifo = dir.path("audit.fifo");
    let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    #[allow(unsafe_code)]
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo: {}", std::io::Error::last_os_error());
    // The read end is open (so egress's open of the write end does not block) but unread.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let fifo_arg = fifo.display().to_string();
    let mut e = Egress::run(
        &[
            "--allow",
            "127.0.81.2",
            "--private-ok",
            "127.0.0.0/8",
            "--audit",
            &fifo_arg,
            "--audit-queue",
            "1MiB",
            // Never rotate (a FIFO cannot be renamed into a log).
            "--audit-max-bytes",
            "1000000000000",
        ],
        &[
            &tc(),
            "get-loop",
            "127.0.81.2:80",
            &REQUESTS.to_string(),
            &PATH_LEN.to_string(),
        ],
    );
    e.wait_log("command started");
    let pid = e.pid();
    let baseline = vm_rss_kib(pid);
    // Unread for 8 s: without the bound, thousands of requests (tens of MB of records)
    // would pile up in memory by then.
    let stall_until = Instant::now() + Duration::from_secs(8);
    let mut peak = baseline;
    while Instant::now() < stall_until {
        peak = peak.max(vm_rss_kib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let growth_kib = peak.saturating_sub(baseline);
    eprintln!(
        "RSS: baseline {baseline} KiB, peak while stalled {peak} KiB (+{growth_kib} KiB), bound {} KiB",
        QUEUE / 1024
    );
    // The queue's bound, plus slack for the allocator, the 64 KiB pipe, the one request in
    // flight and tokio's buffers: far below the ~80 MB the records would take unbounded.
    let slack_kib = 16 * 1024;
    assert!(
        growth_kib < QUEUE / 1024 + slack_kib,
        "RSS grew by {growth_kib} KiB with the writer stalled (bound {} KiB)",
        QUEUE / 1024
    );
    let waits = e
        .logs()
        .into_iter()
        .find(|v| v["message"] == "the audit queue is full; new work waits for the audit writer");
    assert!(
        waits.is_some(),
        "the queue never filled: requests did not wait"
    );
    // Now read everything, until egress closes the write end at exit.
    let reading = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "egress never closed the FIFO");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("reading the FIFO: {e}"),
            }
        }
    });
    let f = e.finish();
    assert!(f.status.success(), "{:#?}", f.stderr);
    let out = f.client_json();
    let all = reading.join().unwrap();
    let records: Vec<Value> = all
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("each line is JSON"))
        .collect();
    let requests = records.iter().filter(|r| r["event"] == "request").count() as u64;
    eprintln!(
        "{requests} request records, client ok {} in {} ms",
        out["ok"], out["elapsed_ms"]
    );
    assert_eq!(out["ok"], REQUESTS, "every request was served: {out}");
    assert_eq!(requests, REQUESTS, "every request has its record");
    assert!(
        records
            .iter()
            .filter(|r| r["event"] == "request")
            .all(|r| r["path"].as_str().is_some_and(|p| p.len() == PATH_LEN)),
        "records are whole"
    );
    let removed = f.log_with("sandbox removed");
    assert!(
        removed[0]["audit_queue_waits"].as_u64().unwrap() > 0,
        "{}",
        removed[0]
    );
}
