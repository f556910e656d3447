//! The audit log: one JSON object per line for every request, every passthrough or refused
//! connection, and every refusal the kernel reports.
//!
//! Guarantee: a record handed to [`Audit::record`] is never dropped silently. Records queue
//! in memory and a dedicated thread writes them in order, flushing whenever the queue runs
//! dry. The queue is bounded in bytes of serialised records: once it holds the bound, new
//! work (a request, a passthrough connection, a DNS query, a batch of kernel events) waits
//! in [`Audit::wait_for_space`] until the writer catches up, so a slow disk slows the
//! sandboxes down instead of growing memory or losing records. Work admitted before the
//! queue filled still writes its record, so the queue can exceed the bound by the records
//! of what was in flight; it never grows with what arrives after. Shutdown ([`Audit::close`])
//! drains the queue and fsyncs before egress exits. If a write fails (disk full, file
//! removed), the record is counted in [`Audit::dropped`] and an error is logged with the
//! running total; nothing else ever discards a record. The file rotates by size:
//! `audit.jsonl` → `audit.jsonl.1` → … → `audit.jsonl.N`.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
};

use serde::Serialize;

pub mod view;

/// Where audit lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: usize,
    },
}

pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_KEEP: usize = 5;
/// How long the writer sleeps after a burst before taking the next one, rather than
/// blocking until a sender wakes it. Records reach the file at most this much later.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
/// Bytes of serialised records the queue holds before new work waits for the writer.
pub const DEFAULT_QUEUE_BYTES: u64 = 64 * 1024 * 1024;

/// What was decided about a request, connection, query or kernel event. Serialised
/// lowercase; the audit log, metrics labels and the API all spell it the same way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
    /// Would have been denied; let through in warn mode.
    Warn,
    /// Spliced without decryption.
    Passthrough,
    /// Not decided: something failed first (an unset decision reads as this, too).
    #[default]
    Error,
}

impl Decision {
    pub const COUNT: usize = 5;
    pub const ALL: [Decision; Decision::COUNT] = [
        Decision::Allow,
        Decision::Deny,
        Decision::Warn,
        Decision::Passthrough,
        Decision::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Warn => "warn",
            Decision::Passthrough => "passthrough",
            Decision::Error => "error",
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a connection's TLS was handled. Serialised lowercase, like [`Decision`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Not known: the connection was refused before its first bytes told TLS from HTTP.
    /// Written as an empty string, as the log always has.
    #[default]
    #[serde(rename = "")]
    Unknown,
    /// Terminated with a minted leaf and served as HTTP.
    Mitm,
    /// Plain HTTP.
    Plain,
    /// Spliced without decryption.
    Passthrough,
}

impl TlsMode {
    pub const ALL: [TlsMode; 4] = [
        TlsMode::Unknown,
        TlsMode::Mitm,
        TlsMode::Plain,
        TlsMode::Passthrough,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Unknown => "",
            TlsMode::Mitm => "mitm",
            TlsMode::Plain => "plain",
            TlsMode::Passthrough => "passthrough",
        }
    }
}

/// When, and which sandbox and process: the first fields of every record, flattened into it
/// so that the line reads as it did when each record spelled them out.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Who {
    pub ts: String,
    pub sandbox: String,
    pub pid: u32,
    pub comm: String,
}

impl Who {
    /// Stamped with the current time.
    pub fn now(sandbox: String, pid: u32, comm: String) -> Self {
        Who {
            ts: now(),
            sandbox,
            pid,
            comm,
        }
    }
}

/// One audit record. Every variant carries who (sandbox, pid, comm) and where.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    Request(RequestRecord),
    Connection(ConnectionRecord),
    KernelDeny(KernelRecord),
    Dns(DnsRecord),
    EventsLost(LostRecord),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestRecord {
    #[serde(flatten)]
    pub who: Who,
    pub client: String,
    pub orig_dst: String,
    pub sni: Option<String>,
    pub host: String,
    pub method: String,
    /// The path; the query is replaced by `?<redacted>` unless query logging is on.
    pub path: String,
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// allow, deny, warn.
    pub decision: Decision,
    pub rule: String,
    pub reason: Option<String>,
    /// mitm or plain.
    pub tls: TlsMode,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectionRecord {
    #[serde(flatten)]
    pub who: Who,
    pub client: String,
    pub orig_dst: String,
    pub sni: Option<String>,
    /// passthrough or deny.
    pub decision: Decision,
    pub rule: String,
    pub reason: Option<String>,
    /// passthrough, or unknown when refused before sniffing.
    pub tls: TlsMode,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelRecord {
    #[serde(flatten)]
    pub who: Who,
    /// tcp, udp or the protocol number.
    pub protocol: String,
    pub dst: String,
    pub decision: Decision,
    pub reason: &'static str,
}

/// Kernel refusals that never reached user space: the ring buffer was full when the kernel
/// tried to report them, so only their number is known (not who, not where).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LostRecord {
    pub ts: String,
    /// Lost since the previous `events_lost` record.
    pub count: u64,
    /// Lost since this egress process started reading.
    pub total: u64,
    pub reason: &'static str,
}

/// One DNS query a sandbox sent, and what egress did with it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DnsRecord {
    #[serde(flatten)]
    pub who: Who,
    pub client: String,
    /// The resolver the program addressed (the kernel sent the query to egress instead).
    pub resolver: String,
    /// udp or tcp.
    pub transport: &'static str,
    pub name: String,
    pub qtype: String,
    /// allow, deny, warn.
    pub decision: Decision,
    /// The allow or deny entry that decided.
    pub rule: String,
    /// NOERROR, NXDOMAIN, SERVFAIL, ...
    pub rcode: String,
    /// The A and AAAA addresses of the answer.
    pub answers: Vec<String>,
    pub reason: Option<String>,
    /// Set when the name looked like DNS tunnelling (refused or not).
    pub suspect: Option<crate::dns::tunnel::Suspicion>,
    pub duration_ms: u64,
    pub error: Option<String>,
}

/// A size such as `64MiB`, `512KiB`, `1GiB`, `100M` (binary multiples either way) or a bare
/// number of bytes. At least 1 byte; at most 1 TiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a size such as 64MiB, 512KiB or 1048576");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if bytes == 0 || bytes > 1 << 40 {
        return Err(format!("{s:?}: must be between 1 byte and 1TiB"));
    }
    Ok(bytes)
}

/// Current time as RFC 3339 with milliseconds, UTC.
pub fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

/// Strips the query unless the operator asked to keep it: queries carry tokens.
pub fn redact_path(path_and_query: &str, keep_query: bool) -> String {
    match path_and_query.split_once('?') {
        Some((p, _)) if !keep_query => format!("{p}?<redacted>"),
        _ => path_and_query.to_owned(),
    }
}

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    queue: Arc<Queue>,
    learning: Arc<Learning>,
}

/// Sandboxes in learn mode: each record of theirs also feeds their learner
/// ([`crate::learn`]), exactly as `egress policy suggest` would read it from the log.
#[derive(Default)]
struct Learning {
    /// Whether any sandbox learns: records skip the lock otherwise.
    any: std::sync::atomic::AtomicBool,
    sessions: std::sync::Mutex<std::collections::HashMap<String, crate::learn::Session>>,
}

impl Learning {
    fn sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, crate::learn::Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn feed(&self, line: &[u8]) {
        let Ok(o) = serde_json::from_slice::<crate::learn::Observation>(line) else {
            return;
        };
        if let Some(s) = self.sessions().get_mut(&o.sandbox) {
            s.learner.observe(&o);
        }
    }
}

/// The bytes between [`Audit::record`] and the writer's last completed write.
struct Queue {
    /// Serialised bytes queued or being written.
    used: AtomicU64,
    bound: u64,
    /// Woken whenever the writer finishes a write (or stops).
    space: tokio::sync::Notify,
    /// Set once the writer has stopped: nobody waits for it any more.
    stopped: std::sync::atomic::AtomicBool,
    /// Times work had to wait for space.
    waits: AtomicU64,
}

impl Queue {
    fn has_room(&self) -> bool {
        self.used.load(Ordering::Acquire) < self.bound || self.stopped.load(Ordering::Acquire)
    }

    fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.space.notify_waiters();
        }
    }
}

/// Owns the writer thread; [`Audit::close`] needs it back to drain.
pub struct AuditWriter {
    thread: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit log {path}")]
pub struct OpenError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl Audit {
    /// Opens the sink with the default queue bound ([`DEFAULT_QUEUE_BYTES`]).
    pub fn open(sink: Sink) -> Result<(Audit, AuditWriter), OpenError> {
        Self::open_bounded(sink, DEFAULT_QUEUE_BYTES)
    }

    /// Opens the sink; new work waits once `queue_bytes` of records are queued.
    pub fn open_bounded(sink: Sink, queue_bytes: u64) -> Result<(Audit, AuditWriter), OpenError> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let dropped = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let queue = Arc::new(Queue {
            used: AtomicU64::new(0),
            bound: queue_bytes.max(1),
            space: tokio::sync::Notify::new(),
            stopped: Default::default(),
            waits: AtomicU64::new(0),
        });
        let mut out = Output::open(&sink)?;
        let (d, w, q) = (dropped.clone(), written.clone(), queue.clone());
        let thread = std::thread::Builder::new()
            .name("egress-audit".into())
            .spawn(move || {
                // Block for the first record, then take whatever else is queued before
                // flushing: one write syscall per burst, not per line. Then linger instead
                // of blocking again: while records keep coming, the writer sleeps a moment
                // and takes the next burst, so no sender has to wake it (a futex wake and a
                // context switch per record, a third of egress's syscalls under load). It
                // blocks again after a linger that brought nothing. An empty line (no
                // record is ever empty: each ends in a newline) is `close` asking to stop.
                // The queue's bytes are released only once written (or counted as lost),
                // so the bound covers the batch being written too.
                'run: while let Ok(first) = rx.recv() {
                    let mut next = Some(first);
                    loop {
                        let mut taken = 0;
                        while let Some(line) = next.take().or_else(|| rx.try_recv().ok()) {
                            if line.is_empty() {
                                out.flush(&d, &w);
                                q.release(taken);
                                break 'run;
                            }
                            taken += line.len() as u64;
                            out.write(&line, &d, &w);
                        }
                        if taken == 0 {
                            break;
                        }
                        out.flush(&d, &w);
                        q.release(taken);
                        std::thread::sleep(LINGER);
                    }
                }
                out.sync(&d, &w);
                q.stopped.store(true, Ordering::Release);
                q.space.notify_waiters();
            })
            .map_err(|source| OpenError {
                path: sink_path(&sink),
                source,
            })?;
        Ok((
            Audit {
                tx,
                dropped,
                written,
                queue,
                learning: Default::default(),
            },
            AuditWriter { thread },
        ))
    }

    /// Queues one record. Never blocks: work that produces records waits for room first,
    /// with [`Audit::wait_for_space`].
    pub fn record(&self, r: &Record) {
        let mut line = match serde_json::to_vec(r) {
            Ok(l) => l,
            Err(e) => {
                self.count_dropped(&format!("serialising failed: {e}"));
                return;
            }
        };
        if self.learning.any.load(Ordering::Acquire) {
            self.learning.feed(&line);
        }
        line.push(b'\n');
        let n = line.len() as u64;
        self.queue.used.fetch_add(n, Ordering::AcqRel);
        if self.tx.send(line).is_err() {
            self.queue.release(n);
            self.count_dropped("the writer has stopped");
        }
    }

    /// Returns at once while the queue is below its bound; otherwise waits until the writer
    /// has written enough. Call it before starting work that will write a record.
    pub async fn wait_for_space(&self) {
        let q = &self.queue;
        if q.has_room() {
            return;
        }
        let n = q.waits.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                waits_total = n,
                queued_bytes = q.used.load(Ordering::Relaxed),
                bound = q.bound,
                "the audit queue is full; new work waits for the audit writer"
            );
        }
        loop {
            let notified = q.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if q.has_room() {
                return;
            }
            notified.await;
        }
    }

    /// Feeds every later record of `session.name`'s sandbox to its learner. A sandbox that
    /// already learns keeps what it learned.
    pub fn start_learning(&self, session: crate::learn::Session) {
        let mut s = self.learning.sessions();
        s.entry(session.name.clone()).or_insert(session);
        self.learning.any.store(true, Ordering::Release);
    }

    /// Stops learning for `sandbox`; returns what was learned.
    pub fn stop_learning(&self, sandbox: &str) -> Option<crate::learn::Session> {
        let mut s = self.learning.sessions();
        let out = s.remove(sandbox);
        self.learning.any.store(!s.is_empty(), Ordering::Release);
        out
    }

    /// Stops learning for every sandbox.
    pub fn stop_all_learning(&self) -> Vec<crate::learn::Session> {
        let mut s = self.learning.sessions();
        self.learning.any.store(false, Ordering::Release);
        s.drain().map(|(_, v)| v).collect()
    }

    /// Bytes of records queued and not yet written.
    pub fn queued_bytes(&self) -> u64 {
        self.queue.used.load(Ordering::Relaxed)
    }

    /// Times work waited for room in the queue.
    pub fn queue_waits(&self) -> u64 {
        self.queue.waits.load(Ordering::Relaxed)
    }

    fn count_dropped(&self, why: &str) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(dropped_total = n, why, "audit record dropped");
    }

    /// Records that could not be written.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Writes every record queued so far, fsyncs, and stops the writer. Call it once the
    /// data path has stopped: a record queued after this is counted as dropped.
    pub fn close(&self, writer: AuditWriter) -> u64 {
        let _ = self.tx.send(Vec::new());
        let _ = writer.thread.join();
        self.dropped.load(Ordering::Relaxed)
    }
}

fn sink_path(s: &Sink) -> PathBuf {
    match s {
        Sink::Stdout => PathBuf::from("-"),
        Sink::File { path, .. } => path.clone(),
    }
}

/// The writer thread's side. Lines gather in `batch` and go out in one write per burst, so
/// a failed write knows exactly how many lines it lost.
struct Output {
    dest: Dest,
    batch: Vec<u8>,
    batch_lines: u64,
}

enum Dest {
    Stdout(io::Stdout),
    File {
        f: File,
        path: PathBuf,
        size: u64,
        max_bytes: u64,
        keep: usize,
        /// Only a regular file rotates. Renaming a device or a FIFO (`--audit /dev/null`)
        /// would move the host's node aside and leave a plain file in its place.
        rotates: bool,
    },
}

impl Output {
    fn open(sink: &Sink) -> Result<Self, OpenError> {
        let dest = match sink {
            Sink::Stdout => Dest::Stdout(io::stdout()),
            Sink::File {
                path,
                max_bytes,
                keep,
            } => {
                let f = open_append(path)?;
                let meta = f.metadata().ok();
                let rotates = meta.as_ref().is_some_and(|m| m.file_type().is_file());
                if !rotates {
                    tracing::info!(
                        path = %path.display(),
                        "the audit log is not a regular file: it is never rotated"
                    );
                }
                Dest::File {
                    f,
                    path: path.clone(),
                    size: meta.map_or(0, |m| m.len()),
                    max_bytes: *max_bytes,
                    keep: *keep,
                    rotates,
                }
            }
        };
        Ok(Output {
            dest,
            batch: Vec::with_capacity(64 * 1024),
            batch_lines: 0,
        })
    }

    fn write(&mut self, line: &[u8], dropped: &AtomicU64, written: &AtomicU64) {
        let pending = self.batch.len() as u64 + line.len() as u64;
        if let Dest::File {
            size,
            max_bytes,
            rotates: true,
            ..
        } = &self.dest
        {
            // Rotate before this line would overflow the file, unless the file (and batch)
            // is empty: a single oversized line still gets written.
            if (*size > 0 || !self.batch.is_empty()) && *size + pending > *max_bytes {
                self.flush(dropped, written);
                if let Dest::File {
                    f,
                    path,
                    size,
                    keep,
                    ..
                } = &mut self.dest
                {
                    match rotate(path, *keep) {
                        Ok(new) => {
                            *f = new;
                            *size = 0;
                        }
                        Err(e) => tracing::error!(
                            path = %path.display(),
                            error = %e,
                            "audit log rotation failed; appending to the current file"
                        ),
                    }
                }
            }
        }
        self.batch.extend_from_slice(line);
        self.batch_lines += 1;
    }

    fn flush(&mut self, dropped: &AtomicU64, written: &AtomicU64) {
        if self.batch_lines == 0 {
            return;
        }
        let r = match &mut self.dest {
            Dest::Stdout(s) => s.write_all(&self.batch).and_then(|()| s.flush()),
            Dest::File { f, size, .. } => {
                let r = f.write_all(&self.batch);
                if r.is_ok() {
                    *size += self.batch.len() as u64;
                }
                r
            }
        };
        match r {
            Ok(()) => {
                written.fetch_add(self.batch_lines, Ordering::Relaxed);
            }
            Err(e) => {
                let n = dropped.fetch_add(self.batch_lines, Ordering::Relaxed) + self.batch_lines;
                tracing::error!(dropped_total = n, error = %e, "audit records could not be written");
            }
        }
        self.batch.clear();
        self.batch_lines = 0;
    }

    fn sync(&mut self, dropped: &AtomicU64, written: &AtomicU64) {
        self.flush(dropped, written);
        if let Dest::File { f, .. } = &self.dest {
            let _ = f.sync_all();
        }
    }
}

fn open_append(path: &Path) -> Result<File, OpenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| OpenError {
            path: path.to_owned(),
            source,
        })?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| OpenError {
            path: path.to_owned(),
            source,
        })
}

/// `path.{keep-1}` → `path.{keep}`, …, `path` → `path.1`, then a fresh `path`. Refuses
/// unless `path` is (still) a regular file.
fn rotate(path: &Path, keep: usize) -> io::Result<File> {
    if !std::fs::symlink_metadata(path)?.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let numbered = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
    for n in (1..keep.max(1)).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))?;
    OpenOptions::new().create(true).append(true).open(path)
}

/// Log lines, headers and metrics use an enum's `as_str`, the audit log serde: they must
/// agree on every variant.
#[cfg(test)]
pub(crate) fn assert_spelled_alike<T: Serialize + Copy + std::fmt::Debug>(
    all: &[T],
    as_str: fn(T) -> &'static str,
) {
    for &v in all {
        let json = serde_json::to_string(&v).expect("an enum serialises");
        assert_eq!(json, format!("\"{}\"", as_str(v)), "{v:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(i: u64) -> Record {
        Record::Request(RequestRecord {
            who: Who {
                ts: now(),
                ..Default::default()
            },
            host: format!("h{i}.example"),
            status: 200,
            decision: Decision::Allow,
            tls: TlsMode::Mitm,
            ..Default::default()
        })
    }

    fn tmp(name: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        (d, p)
    }

    #[test]
    fn every_record_is_written_in_order_and_close_drains() {
        let (_d, p) = tmp("audit.jsonl");
        let (audit, w) = Audit::open(Sink::File {
            path: p.clone(),
            max_bytes: DEFAULT_MAX_BYTES,
            keep: 2,
        })
        .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let a = audit.clone();
                std::thread::spawn(move || (0..2500).for_each(|i| a.record(&req(t * 10_000 + i))))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(audit.close(w), 0);
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 10_000, "no record lost");
        assert_eq!(lines[0]["event"], "request");
        for t in 0..4u64 {
            // Per producer, order is kept.
            let hosts: Vec<u64> = lines
                .iter()
                .filter_map(|l| {
                    l["host"]
                        .as_str()?
                        .strip_prefix('h')?
                        .split('.')
                        .next()?
                        .parse()
                        .ok()
                })
                .filter(|n: &u64| n / 10_000 == t)
                .collect();
            assert!(
                hosts.windows(2).all(|w| w[0] < w[1]),
                "producer {t} reordered"
            );
        }
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let (d, p) = tmp("a.jsonl");
        let (audit, w) = Audit::open(Sink::File {
            path: p.clone(),
            max_bytes: 2000,
            keep: 2,
        })
        .unwrap();
        for i in 0..100 {
            audit.record(&req(i));
        }
        audit.close(w);
        let mut total = 0;
        for name in ["a.jsonl", "a.jsonl.1", "a.jsonl.2"] {
            let f = d.path().join(name);
            let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(text.len() <= 2000 + 400, "{name} is {} bytes", text.len());
            total += text.lines().count();
        }
        assert!(
            !d.path().join("a.jsonl.3").exists(),
            "keeps only 2 rotated files"
        );
        assert!(total < 100, "oldest lines rotate out past `keep`");
    }

    /// `--audit /dev/null` once renamed the host's /dev/null to /dev/null.1 after 100 MiB
    /// and left a plain file in its place. A FIFO stands in for the device here.
    #[test]
    fn a_file_that_is_not_regular_never_rotates() {
        use std::{io::Read as _, os::unix::fs::FileTypeExt as _};
        let (d, p) = tmp("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(made.success());
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut text = String::new();
                File::open(p).unwrap().read_to_string(&mut text).unwrap();
                text.lines().count()
            })
        };
        let (audit, w) = Audit::open(Sink::File {
            path: p.clone(),
            max_bytes: 2000,
            keep: 2,
        })
        .unwrap();
        for i in 0..100 {
            audit.record(&req(i));
        }
        assert_eq!(audit.close(w), 0);
        assert_eq!(
            reader.join().unwrap(),
            100,
            "every line went through the FIFO"
        );
        let t = std::fs::symlink_metadata(&p).unwrap().file_type();
        assert!(t.is_fifo(), "the FIFO was replaced: {t:?}");
        assert!(!d.path().join("fifo.1").exists(), "the FIFO was renamed");
        assert!(rotate(&p, 2).is_err(), "rotate refuses a FIFO");
    }

    #[test]
    fn write_failures_are_counted_not_silent() {
        // /dev/full fails every write with ENOSPC.
        let (audit, w) = Audit::open(Sink::File {
            path: "/dev/full".into(),
            max_bytes: u64::MAX,
            keep: 1,
        })
        .unwrap();
        for i in 0..10 {
            audit.record(&req(i));
        }
        let dropped = audit.close(w);
        assert_eq!(dropped, 10, "every lost record is counted");
    }

    /// One record of each kind (and a connection refused before sniffing, whose `tls` is
    /// unset), with every field set to something recognisable.
    fn one_of_each() -> [Record; 5] {
        let ts = || "2026-01-02T03:04:05.678Z".to_owned();
        let who = |comm: &str| Who {
            ts: ts(),
            sandbox: "agent".into(),
            pid: 42,
            comm: comm.into(),
        };
        [
            Record::Request(RequestRecord {
                who: who("curl"),
                client: "10.0.0.2:40000".into(),
                orig_dst: "203.0.113.9:443".into(),
                sni: Some("api.example".into()),
                host: "api.example".into(),
                method: "POST".into(),
                path: "/v1?<redacted>".into(),
                status: 403,
                bytes_up: 10,
                bytes_down: 90,
                duration_ms: 3,
                decision: Decision::Deny,
                rule: "api.example".into(),
                reason: Some("host is not in the allowlist".into()),
                tls: TlsMode::Mitm,
                error: None,
            }),
            Record::Connection(ConnectionRecord {
                who: who("curl"),
                client: "10.0.0.2:40001".into(),
                orig_dst: "203.0.113.9:443".into(),
                sni: Some("p.example".into()),
                decision: Decision::Passthrough,
                rule: "p.example".into(),
                reason: None,
                tls: TlsMode::Passthrough,
                bytes_up: 517,
                bytes_down: 4096,
                duration_ms: 20,
                error: Some("connection reset".into()),
            }),
            Record::Connection(ConnectionRecord {
                who: Who {
                    ts: ts(),
                    ..Default::default()
                },
                decision: Decision::Deny,
                reason: Some("neither TLS nor HTTP".into()),
                ..Default::default()
            }),
            Record::KernelDeny(KernelRecord {
                who: who("nc"),
                protocol: "udp".into(),
                dst: "192.0.2.1:9".into(),
                decision: Decision::Deny,
                reason: "udp refused",
            }),
            Record::Dns(DnsRecord {
                who: who("dig"),
                client: "10.0.0.2:53000".into(),
                resolver: "1.1.1.1:53".into(),
                transport: "udp",
                name: "x.example".into(),
                qtype: "A".into(),
                decision: Decision::Warn,
                rule: "*.example".into(),
                rcode: "NOERROR".into(),
                answers: vec!["192.0.2.7".into(), "2001:db8::7".into()],
                reason: Some("not allowed".into()),
                suspect: Some(crate::dns::tunnel::Suspicion::HighEntropy),
                duration_ms: 4,
                error: None,
            }),
        ]
    }

    /// The audit log is read by other programs: field names, order and spelling are an
    /// interface. These lines are what the records serialised to before their types were
    /// reshaped (shared `Who`, enums for decision and TLS mode); they must not change.
    #[test]
    fn records_serialise_byte_for_byte_as_before() {
        const EXPECTED: [&str; 5] = [
            r#"{"event":"request","ts":"2026-01-02T03:04:05.678Z","sandbox":"agent","pid":42,"comm":"curl","client":"10.0.0.2:40000","orig_dst":"203.0.113.9:443","sni":"api.example","host":"api.example","method":"POST","path":"/v1?<redacted>","status":403,"bytes_up":10,"bytes_down":90,"duration_ms":3,"decision":"deny","rule":"api.example","reason":"host is not in the allowlist","tls":"mitm","error":null}"#,
            r#"{"event":"connection","ts":"2026-01-02T03:04:05.678Z","sandbox":"agent","pid":42,"comm":"curl","client":"10.0.0.2:40001","orig_dst":"203.0.113.9:443","sni":"p.example","decision":"passthrough","rule":"p.example","reason":null,"tls":"passthrough","bytes_up":517,"bytes_down":4096,"duration_ms":20,"error":"connection reset"}"#,
            r#"{"event":"connection","ts":"2026-01-02T03:04:05.678Z","sandbox":"","pid":0,"comm":"","client":"","orig_dst":"","sni":null,"decision":"deny","rule":"","reason":"neither TLS nor HTTP","tls":"","bytes_up":0,"bytes_down":0,"duration_ms":0,"error":null}"#,
            r#"{"event":"kernel_deny","ts":"2026-01-02T03:04:05.678Z","sandbox":"agent","pid":42,"comm":"nc","protocol":"udp","dst":"192.0.2.1:9","decision":"deny","reason":"udp refused"}"#,
            r#"{"event":"dns","ts":"2026-01-02T03:04:05.678Z","sandbox":"agent","pid":42,"comm":"dig","client":"10.0.0.2:53000","resolver":"1.1.1.1:53","transport":"udp","name":"x.example","qtype":"A","decision":"warn","rule":"*.example","rcode":"NOERROR","answers":["192.0.2.7","2001:db8::7"],"reason":"not allowed","suspect":"high-entropy","duration_ms":4,"error":null}"#,
        ];
        for (rec, want) in one_of_each().iter().zip(EXPECTED) {
            let got = serde_json::to_string(rec).expect("a record serialises");
            assert_eq!(got, want, "the audit line of {rec:?} changed");
        }
    }

    /// A record type added later: its line is fixed from the start.
    #[test]
    fn events_lost_serialises_as_documented() {
        let r = Record::EventsLost(LostRecord {
            ts: "2026-01-02T03:04:05.678Z".into(),
            count: 7,
            total: 12,
            reason: "kernel ring buffer full",
        });
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"event":"events_lost","ts":"2026-01-02T03:04:05.678Z","count":7,"total":12,"reason":"kernel ring buffer full"}"#
        );
    }

    /// A writer stuck on a FIFO nobody reads: the queue stops at its bound (work waits),
    /// and once the FIFO is read every record comes out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_makes_work_wait_and_loses_nothing() {
        use std::os::unix::fs::OpenOptionsExt as _;
        let (_d, p) = tmp("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // The read end, open (so the writer's open does not block) but not read yet.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .unwrap();
        const BOUND: u64 = 64 * 1024;
        let (audit, w) = Audit::open_bounded(
            Sink::File {
                path: p.clone(),
                max_bytes: u64::MAX,
                keep: 1,
            },
            BOUND,
        )
        .unwrap();
        let one = serde_json::to_vec(&req(0)).unwrap().len() as u64 + 1;
        let mut queued = 0u64;
        let stalled = loop {
            let ok = tokio::time::timeout(Duration::from_millis(300), audit.wait_for_space())
                .await
                .is_ok();
            if !ok {
                break true;
            }
            audit.record(&req(queued));
            queued += 1;
            assert!(queued < 100_000, "the queue never filled");
        };
        assert!(stalled);
        // The pipe holds 64 KiB, the queue its bound plus one record.
        let held = audit.queued_bytes();
        assert!(
            held <= BOUND + one,
            "queued {held} bytes over a {BOUND} bound"
        );
        assert!(audit.queue_waits() >= 1);
        // Read everything; waiters get room again, and every record arrives.
        let reading = std::thread::spawn(move || {
            use std::io::Read as _;
            let mut all = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break all,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("reading the FIFO: {e}"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), audit.wait_for_space())
            .await
            .expect("room once the FIFO is read");
        audit.record(&req(queued));
        queued += 1;
        let a = audit.clone();
        tokio::task::spawn_blocking(move || a.close(w))
            .await
            .unwrap();
        let all = reading.join().unwrap();
        let lines = all.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
        assert_eq!(lines as u64, queued, "every record was written");
    }

    #[test]
    fn decisions_and_tls_modes_are_spelled_alike_by_as_str_and_serde() {
        assert_spelled_alike(&Decision::ALL, Decision::as_str);
        assert_spelled_alike(&TlsMode::ALL, TlsMode::as_str);
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in [
            "",
            "0",
            "MiB",
            "64 MB",
            "-1",
            "2TiB",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn queries_are_redacted_by_default() {
        assert_eq!(redact_path("/a?token=x", false), "/a?<redacted>");
        assert_eq!(redact_path("/a?token=x", true), "/a?token=x");
        assert_eq!(redact_path("/a", false), "/a");
    }
}
