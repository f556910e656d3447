//! DNS pinning: per sandbox, which addresses its own DNS answers returned for each name, so
//! that a connection claiming a name (SNI, Host) can be checked against what that sandbox
//! was actually told, rather than against whatever the name resolves to now.
//!
//! The store is bounded. When full, expired names go first, then the least recently
//! recorded. Lookups do not refresh recency: a name stays pinned because answers keep
//! arriving for it, not because something keeps connecting.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// TTLs are capped at this: a week-long TTL (or RFC 2181's 68-year maximum) should not keep
/// an address trusted after the name has long moved.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Most addresses remembered per name; when exceeded, those expiring soonest go. A hostile
/// resolver answer should not be able to grow one entry without bound.
pub const MAX_ADDRS_PER_NAME: usize = 64;

/// Per sandbox: name -> addresses its own DNS answers returned. Bounded; thread-safe.
pub struct Pins {
    capacity: usize,
    min_ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// sandbox -> name -> entry. Nested so lookups by `&str` need no allocation.
    sandboxes: HashMap<u32, HashMap<String, Entry>>,
    /// Recording order: the first key is the least recently recorded name.
    by_recency: BTreeMap<u64, (u32, String)>,
    /// (when the entry's last address expires, its seq): the first key expires soonest.
    by_expiry: BTreeSet<(Instant, u64)>,
    next_seq: u64,
    len: usize,
}

struct Entry {
    /// Position in `by_recency` and `by_expiry`.
    seq: u64,
    /// The latest expiry of any address.
    expires: Instant,
    addrs: HashMap<IpAddr, Instant>,
}

impl Pins {
    /// `capacity`: most names kept over all sandboxes (at least 1). `min_ttl`: an answer is
    /// remembered for max(its TTL, min_ttl), since programs cache names longer than the TTL.
    pub fn new(capacity: usize, min_ttl: Duration) -> Self {
        Pins {
            capacity: capacity.max(1),
            min_ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Adds addresses to what `name` resolved to in `sandbox` (a union with what is
    /// remembered, each address with its own expiry). Names are normalised (lowercase, no
    /// trailing dot), v4-mapped IPv6 addresses stored as IPv4.
    pub fn record(&self, sandbox: u32, name: &str, addrs: &[(IpAddr, u32)]) {
        self.record_at(Instant::now(), sandbox, name, addrs);
    }

    /// Whether `name` resolved to `ip` (v4-mapped accepted) in `sandbox`, unexpired.
    pub fn resolves_to(&self, sandbox: u32, name: &str, ip: IpAddr) -> bool {
        self.resolves_to_at(Instant::now(), sandbox, name, ip)
    }

    /// Names kept over all sandboxes, including expired ones not yet evicted.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything `sandbox` resolved: for when it is torn down.
    pub fn remove_sandbox(&self, sandbox: u32) {
        let mut inner = self.lock();
        if let Some(names) = inner.sandboxes.remove(&sandbox) {
            inner.len -= names.len();
            for entry in names.values() {
                inner.by_recency.remove(&entry.seq);
                inner.by_expiry.remove(&(entry.expires, entry.seq));
            }
        }
    }

    fn record_at(&self, now: Instant, sandbox: u32, name: &str, addrs: &[(IpAddr, u32)]) {
        if addrs.is_empty() {
            return;
        }
        let name = normalize(name);
        let mut inner = self.lock();
        let exists = inner
            .sandboxes
            .get(&sandbox)
            .is_some_and(|names| names.contains_key(&name));
        if !exists {
            while inner.len >= self.capacity {
                inner.evict_one(now);
            }
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;

        let names = inner.sandboxes.entry(sandbox).or_default();
        let entry = names.entry(name.clone()).or_insert_with(|| Entry {
            seq,
            expires: now,
            addrs: HashMap::new(),
        });
        let (old_seq, old_expires) = (entry.seq, entry.expires);
        entry.addrs.retain(|_, exp| *exp > now);
        for &(ip, ttl) in addrs {
            let keep = Duration::from_secs(u64::from(ttl))
                .max(self.min_ttl)
                .min(MAX_TTL);
            let exp = now.checked_add(keep).unwrap_or(now);
            let slot = entry.addrs.entry(canonical(ip)).or_insert(exp);
            *slot = (*slot).max(exp);
        }
        if entry.addrs.len() > MAX_ADDRS_PER_NAME {
            let mut by_expiry: Vec<(IpAddr, Instant)> = entry.addrs.drain().collect();
            by_expiry.sort_unstable_by_key(|&(_, exp)| std::cmp::Reverse(exp));
            by_expiry.truncate(MAX_ADDRS_PER_NAME);
            entry.addrs.extend(by_expiry);
        }
        entry.seq = seq;
        entry.expires = entry.addrs.values().copied().max().unwrap_or(now);
        let expires = entry.expires;

        if exists {
            inner.by_recency.remove(&old_seq);
            inner.by_expiry.remove(&(old_expires, old_seq));
        } else {
            inner.len += 1;
        }
        inner.by_recency.insert(seq, (sandbox, name));
        inner.by_expiry.insert((expires, seq));
    }

    fn resolves_to_at(&self, now: Instant, sandbox: u32, name: &str, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let inner = self.lock();
        let Some(names) = inner.sandboxes.get(&sandbox) else {
            return false;
        };
        let entry = match names.get(name) {
            Some(e) => e,
            None => match names.get(normalize(name).as_str()) {
                Some(e) => e,
                None => return false,
            },
        };
        entry.addrs.get(&ip).is_some_and(|exp| *exp > now)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The maps are updated so that a panic midway leaves them usable; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Drops the entry that expired first if it has expired, else the least recently
    /// recorded one.
    fn evict_one(&mut self, now: Instant) {
        let seq = match self.by_expiry.first() {
            Some(&(exp, seq)) if exp <= now => seq,
            _ => match self.by_recency.first_key_value() {
                Some((&seq, _)) => seq,
                None => {
                    // Indexes empty but len > 0 cannot happen; resync rather than spin.
                    self.len = 0;
                    return;
                }
            },
        };
        let Some((sandbox, name)) = self.by_recency.remove(&seq) else {
            self.len = 0;
            return;
        };
        if let Some(names) = self.sandboxes.get_mut(&sandbox) {
            if let Some(entry) = names.remove(&name) {
                self.by_expiry.remove(&(entry.expires, entry.seq));
                self.len -= 1;
            }
            if names.is_empty() {
                self.sandboxes.remove(&sandbox);
            }
        }
    }
}

fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

    fn pins() -> Pins {
        Pins::new(100, Duration::from_secs(60))
    }

    #[test]
    fn records_and_looks_up() {
        let p = pins();
        assert!(p.is_empty());
        p.record(1, "api.example.com", &[(A, 300), (V6, 300)]);
        assert!(p.resolves_to(1, "api.example.com", A));
        assert!(p.resolves_to(1, "api.example.com", V6));
        assert!(!p.resolves_to(1, "api.example.com", B));
        assert!(!p.resolves_to(1, "www.example.com", A));
        assert_eq!(p.len(), 1);

        // A later answer adds to what is remembered.
        p.record(1, "api.example.com", &[(B, 300)]);
        assert!(p.resolves_to(1, "api.example.com", A));
        assert!(p.resolves_to(1, "api.example.com", B));
        assert_eq!(p.len(), 1);

        // An empty answer records nothing.
        p.record(1, "empty.example.com", &[]);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn normalises_names() {
        let p = pins();
        p.record(1, "API.Example.COM.", &[(A, 300)]);
        assert!(p.resolves_to(1, "api.example.com", A));
        assert!(p.resolves_to(1, "Api.Example.Com.", A));
        assert!(p.resolves_to(1, "api.example.com.", A));
    }

    #[test]
    fn v4_mapped_addresses_match_v4() {
        let p = pins();
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        p.record(1, "a.example", &[(mapped, 300)]);
        assert!(p.resolves_to(1, "a.example", A));
        assert!(p.resolves_to(1, "a.example", mapped));
        p.record(1, "b.example", &[(B, 300)]);
        let mapped_b = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 2).to_ipv6_mapped());
        assert!(p.resolves_to(1, "b.example", mapped_b));
    }

    #[test]
    fn expires_after_max_of_ttl_and_min_ttl() {
        let p = Pins::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        p.record_at(t0, 1, "a.example", &[(A, 0), (B, 600)]);
        let at = |secs| t0 + Duration::from_secs(secs);
        assert!(p.resolves_to_at(at(59), 1, "a.example", A));
        assert!(!p.resolves_to_at(at(60), 1, "a.example", A));
        assert!(p.resolves_to_at(at(599), 1, "a.example", B));
        assert!(!p.resolves_to_at(at(600), 1, "a.example", B));

        // A fresh answer extends an address; an older, shorter one never shortens it.
        p.record_at(at(500), 1, "a.example", &[(B, 0)]);
        assert!(p.resolves_to_at(at(599), 1, "a.example", B));
        p.record_at(at(590), 1, "a.example", &[(B, 600)]);
        assert!(p.resolves_to_at(at(1189), 1, "a.example", B));

        // Huge TTLs are capped.
        p.record_at(t0, 1, "c.example", &[(A, u32::MAX)]);
        let cap = MAX_TTL.as_secs();
        assert!(p.resolves_to_at(at(cap - 1), 1, "c.example", A));
        assert!(!p.resolves_to_at(at(cap), 1, "c.example", A));
    }

    #[test]
    fn expires_in_real_time() {
        let p = Pins::new(10, Duration::from_millis(20));
        p.record(1, "a.example", &[(A, 0)]);
        assert!(p.resolves_to(1, "a.example", A));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!p.resolves_to(1, "a.example", A));
    }

    #[test]
    fn sandboxes_are_isolated() {
        let p = pins();
        p.record(1, "a.example", &[(A, 300)]);
        p.record(2, "a.example", &[(B, 300)]);
        assert!(p.resolves_to(1, "a.example", A));
        assert!(!p.resolves_to(1, "a.example", B));
        assert!(p.resolves_to(2, "a.example", B));
        assert!(!p.resolves_to(2, "a.example", A));
        assert!(!p.resolves_to(3, "a.example", A));
        assert_eq!(p.len(), 2);

        p.remove_sandbox(1);
        assert!(!p.resolves_to(1, "a.example", A));
        assert!(p.resolves_to(2, "a.example", B));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn capacity_evicts_least_recently_recorded() {
        let p = Pins::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            p.record_at(t0 + Duration::from_secs(i as u64), 1, n, &[(A, 300)]);
        }
        // Re-recording "a" makes "b" the oldest.
        p.record_at(t0 + Duration::from_secs(3), 1, "a", &[(A, 300)]);
        p.record_at(t0 + Duration::from_secs(4), 2, "d", &[(A, 300)]);
        let now = t0 + Duration::from_secs(5);
        assert_eq!(p.len(), 3);
        assert!(p.resolves_to_at(now, 1, "a", A));
        assert!(!p.resolves_to_at(now, 1, "b", A));
        assert!(p.resolves_to_at(now, 1, "c", A));
        assert!(p.resolves_to_at(now, 2, "d", A));
    }

    #[test]
    fn capacity_evicts_expired_first() {
        let p = Pins::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        p.record_at(t0, 1, "old-long", &[(A, 1000)]);
        p.record_at(t0, 1, "short", &[(A, 0)]);
        p.record_at(t0, 1, "newer", &[(A, 1000)]);
        // "short" expired at t0+10 s: it goes, not the least recently recorded "old-long".
        p.record_at(t0 + Duration::from_secs(20), 1, "new", &[(A, 1000)]);
        let now = t0 + Duration::from_secs(21);
        assert_eq!(p.len(), 3);
        assert!(p.resolves_to_at(now, 1, "old-long", A));
        assert!(p.resolves_to_at(now, 1, "newer", A));
        assert!(p.resolves_to_at(now, 1, "new", A));
    }

    #[test]
    fn capacity_bound_holds_under_churn() {
        let p = Pins::new(50, Duration::from_secs(60));
        for i in 0..1000u32 {
            p.record(i % 7, &format!("host{i}.example"), &[(A, 30)]);
            assert!(p.len() <= 50);
        }
        assert_eq!(p.len(), 50);
        assert!(p.resolves_to(999 % 7, "host999.example", A));
        assert!(!p.resolves_to(0, "host0.example", A));
    }

    #[test]
    fn addresses_per_name_are_bounded() {
        let p = pins();
        let many: Vec<(IpAddr, u32)> = (0..200u32)
            .map(|i| (IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 100 + i))
            .collect();
        p.record(1, "big.example", &many);
        let kept = many
            .iter()
            .filter(|(ip, _)| p.resolves_to(1, "big.example", *ip))
            .count();
        assert_eq!(kept, MAX_ADDRS_PER_NAME);
        // The longest-lived ones stay.
        assert!(p.resolves_to(1, "big.example", many[199].0));
    }
}
