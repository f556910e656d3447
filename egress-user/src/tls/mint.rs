//! Leaf certificates for intercepted hosts, and the cache that owns them.
//!
//! [`LeafCache`] is the one place that signs leaves. Every leaf shares one key pair made when
//! the cache is built, so a new host costs one ECDSA signature rather than a key generation.
//! Minting is single-flight per host and never happens under a lock that other hosts need.
//! [`server_config`] turns a leaf into the rustls configuration for one client-side handshake.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock, PoisonError, RwLock,
    },
};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::{CertifiedKey, SigningKey},
    ServerConfig,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use tracing::warn;

use super::{ca::CertificateAuthority, provider, random_serial};

/// A capacity that holds every host a busy sandbox fleet talks to.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Long enough that a leaf is minted once per process lifetime in practice, short enough to
/// stay under the 825 days Apple clients accept from private CAs.
const LEAF_VALIDITY: Duration = Duration::days(365);
/// Re-mint this long before a cached leaf expires, so no client ever sees it expire.
const RENEW_BEFORE: Duration = Duration::days(1);
/// RFC 5280's upper bound for a commonName.
const MAX_COMMON_NAME: usize = 64;

/// The name a leaf certificate is minted for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeafId {
    /// A DNS name, lowercase, without a trailing dot: build it with [`LeafId::from_host`].
    Dns(String),
    /// An IP address, for clients that connect without SNI.
    Ip(IpAddr),
}

impl LeafId {
    /// The id for a host as a client named it (SNI, `Host`, an address): IP literals
    /// (bracketed or not) become [`LeafId::Ip`], names are lowercased and lose a trailing dot,
    /// so `Example.COM.` and `example.com` share one leaf.
    pub fn from_host(host: &str) -> Self {
        let unbracketed = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Self::Ip(ip);
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        Self::Dns(name.to_ascii_lowercase())
    }
}

impl From<IpAddr> for LeafId {
    fn from(ip: IpAddr) -> Self {
        Self::Ip(ip)
    }
}

impl fmt::Display for LeafId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => f.write_str(name),
            Self::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Why a leaf could not be minted. The handshake that asked for it is aborted; these are
/// internal errors (our CA or our code), never the client's or the upstream's.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("cannot generate the shared leaf key")]
    KeyGen {
        #[source]
        source: rcgen::Error,
    },
    #[error("rustls rejected the shared leaf key")]
    LoadKey {
        #[source]
        source: rustls::Error,
    },
    #[error("an empty name cannot be put in a certificate")]
    EmptyName,
    #[error("{id:?} cannot be put in a certificate")]
    InvalidName {
        id: LeafId,
        #[source]
        source: rcgen::Error,
    },
    #[error("the CA expired at {not_after}; no leaf can be minted")]
    CaExpired { not_after: OffsetDateTime },
    #[error("signing the leaf for {id} failed")]
    Sign {
        id: LeafId,
        #[source]
        source: rcgen::Error,
    },
    #[error("the system random number generator failed")]
    Random,
}

/// Minted leaves by host, bounded, each minted at most once at a time.
pub struct LeafCache {
    ca: Arc<CertificateAuthority>,
    key: KeyPair,
    signing_key: Arc<dyn SigningKey>,
    capacity: usize,
    slots: RwLock<HashMap<LeafId, Arc<Slot>>>,
    /// Logical time for eviction: bumped on every lookup, so "oldest" means least recently used.
    clock: AtomicU64,
    minted: AtomicU64,
    failures: AtomicU64,
    hits: AtomicU64,
}

/// One host's entry. Its mutex is what makes minting single-flight: the first caller mints
/// while holding it, later callers for the same host wait and then find the result, and
/// callers for other hosts never touch it.
struct Slot {
    leaf: Mutex<Option<Leaf>>,
    last_used: AtomicU64,
}

struct Leaf {
    key: Arc<CertifiedKey>,
    renew_after: OffsetDateTime,
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCache")
            .field("ca", &self.ca)
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .field("minted", &self.minted())
            .field("failures", &self.failures())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache of at most `capacity` leaves (at least one) signed by `ca`.
    pub fn new(ca: Arc<CertificateAuthority>, capacity: usize) -> Result<Self, MintError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|source| MintError::KeyGen { source })?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = provider()
            .key_provider
            .load_private_key(der)
            .map_err(|source| MintError::LoadKey { source })?;
        Ok(Self {
            ca,
            key,
            signing_key,
            capacity: capacity.max(1),
            slots: RwLock::new(HashMap::new()),
            clock: AtomicU64::new(0),
            minted: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })
    }

    /// The leaf for `id`, from the cache or freshly minted.
    ///
    /// Concurrent first requests for one host mint once; a failure is returned to the callers
    /// that were waiting on it but not remembered, so the next request tries again.
    pub fn get(&self, id: &LeafId) -> Result<Arc<CertifiedKey>, MintError> {
        let slot = self.slot(id);
        let mut leaf = slot.leaf.lock().unwrap_or_else(PoisonError::into_inner);
        let now = OffsetDateTime::now_utc();
        if let Some(current) = leaf.as_ref() {
            if now < current.renew_after {
                self.hits.fetch_add(1, Relaxed);
                return Ok(current.key.clone());
            }
        }
        match self.mint(id, now) {
            Ok(fresh) => {
                self.minted.fetch_add(1, Relaxed);
                let key = fresh.key.clone();
                *leaf = Some(fresh);
                Ok(key)
            }
            Err(e) => {
                self.failures.fetch_add(1, Relaxed);
                warn!(host = %id, error = %crate::error_chain(&e), "cannot mint a leaf certificate");
                Err(e)
            }
        }
    }

    /// Leaves minted so far (renewals included).
    pub fn minted(&self) -> u64 {
        self.minted.load(Relaxed)
    }

    /// Handshakes served from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Relaxed)
    }

    /// Mint attempts that failed.
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// Hosts currently cached.
    pub fn len(&self) -> usize {
        self.slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// Finds or creates `id`'s slot. The map lock is held only for the lookup or insert.
    fn slot(&self, id: &LeafId) -> Arc<Slot> {
        let tick = self.clock.fetch_add(1, Relaxed);
        if let Some(slot) = self
            .slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
        {
            slot.last_used.store(tick, Relaxed);
            return slot.clone();
        }
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(id) {
            slot.last_used.store(tick, Relaxed);
            return slot.clone();
        }
        if slots.len() >= self.capacity {
            evict_oldest(&mut slots, self.capacity);
        }
        let slot = Arc::new(Slot {
            leaf: Mutex::new(None),
            last_used: AtomicU64::new(tick),
        });
        slots.insert(id.clone(), slot.clone());
        slot
    }

    fn mint(&self, id: &LeafId, now: OffsetDateTime) -> Result<Leaf, MintError> {
        let ca_not_after = self.ca.not_after();
        if ca_not_after <= now {
            return Err(MintError::CaExpired {
                not_after: ca_not_after,
            });
        }
        // A leaf that outlives its CA is rejected by strict clients, so cap it at the CA's end.
        let not_after = (now + LEAF_VALIDITY).min(ca_not_after);
        let not_before = (now - super::ca::BACKDATE).max(self.ca.not_before());

        let (san, common_name) = match id {
            LeafId::Dns(name) if name.is_empty() => return Err(MintError::EmptyName),
            LeafId::Dns(name) => {
                let ia5 = name
                    .as_str()
                    .try_into()
                    .map_err(|source| MintError::InvalidName {
                        id: id.clone(),
                        source,
                    })?;
                (SanType::DnsName(ia5), name.clone())
            }
            LeafId::Ip(ip) => (SanType::IpAddress(*ip), ip.to_string()),
        };

        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        // Clients match the SAN, not the CN; a CN is there for humans and old tools, and is
        // dropped rather than truncated when the name is too long to be a valid one.
        if common_name.len() <= MAX_COMMON_NAME {
            subject.push(DnType::CommonName, common_name);
        } else {
            subject.push(DnType::OrganizationName, "egress");
        }
        params.distinguished_name = subject;
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial().map_err(|_| MintError::Random)?);
        params.not_before = not_before;
        params.not_after = not_after;

        let cert = params
            .signed_by(&self.key, self.ca.issuer())
            .map_err(|source| MintError::Sign {
                id: id.clone(),
                source,
            })?;
        let chain = vec![cert.der().clone(), self.ca.cert_der().clone()];
        // Renew a day early, or halfway through what is left when the CA itself ends sooner,
        // so a nearly expired CA does not turn every lookup into a mint.
        let margin = RENEW_BEFORE.min((not_after - now) / 2);
        Ok(Leaf {
            key: Arc::new(CertifiedKey::new(chain, self.signing_key.clone())),
            renew_after: not_after - margin,
        })
    }
}

/// Drops the least recently used sixteenth of the map, so that eviction's full scan is paid
/// once per many inserts rather than on each.
fn evict_oldest(slots: &mut HashMap<LeafId, Arc<Slot>>, capacity: usize) {
    let count = (capacity / 16).clamp(1, slots.len().max(1));
    let mut ages: Vec<u64> = slots
        .values()
        .map(|slot| slot.last_used.load(Relaxed))
        .collect();
    if ages.is_empty() {
        return;
    }
    let (_, &mut cutoff, _) = ages.select_nth_unstable(count - 1);
    slots.retain(|_, slot| slot.last_used.load(Relaxed) > cutoff);
}

/// A rustls server configuration that presents `cert` to every client, for one intercepted
/// connection, offering `alpn` (the proxy passes `h2` and `http/1.1`). TLS 1.2 and 1.3.
///
/// All configurations share one session cache: resumption is keyed by SNI, and a client only
/// offers a ticket to the name it got it from, so sharing is safe and lets clients resume.
pub fn server_config(cert: Arc<CertifiedKey>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let mut config = template().clone();
    config.cert_resolver = Arc::new(FixedCert(cert));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn template() -> &'static ServerConfig {
    static TEMPLATE: OnceLock<ServerConfig> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            // Fails only if the provider has no suite for these versions; ring's default
            // provider has several for each, so this is a fixed property of the build, and
            // the tests below exercise it.
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCert))
    })
}

/// Serves one certificate whatever the client asks for: the proxy has already chosen it
/// from the connection's SNI or original destination.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The template's placeholder; every real configuration replaces it.
#[derive(Debug)]
struct NoCert;

impl ResolvesServerCert for NoCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        sync::Barrier,
    };

    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
    use rustls_pki_types::ServerName;

    use super::*;

    fn test_ca() -> (tempfile::TempDir, Arc<CertificateAuthority>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertificateAuthority::load_or_create(dir.path()).expect("create CA");
        (dir, Arc::new(ca))
    }

    fn cache(capacity: usize) -> (tempfile::TempDir, LeafCache) {
        let (dir, ca) = test_ca();
        (dir, LeafCache::new(ca, capacity).expect("build cache"))
    }

    #[test]
    fn leaf_ids_are_normalized() {
        assert_eq!(
            LeafId::from_host("Example.COM."),
            LeafId::Dns("example.com".into())
        );
        assert_eq!(
            LeafId::from_host("10.0.0.1"),
            LeafId::Ip("10.0.0.1".parse().expect("ip"))
        );
        assert_eq!(
            LeafId::from_host("[::1]"),
            LeafId::Ip("::1".parse().expect("ip"))
        );
        assert_eq!(LeafId::from_host("::1").to_string(), "::1");
    }

    #[test]
    fn the_same_host_is_minted_once() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let id = LeafId::from_host("example.com");
        let a = cache.get(&id).expect("mint");
        let b = cache.get(&id).expect("cached");
        assert!(
            Arc::ptr_eq(&a, &b),
            "second get must return the cached leaf"
        );
        assert_eq!(cache.minted(), 1);
        assert_eq!(cache.failures(), 0);
        let c = cache
            .get(&LeafId::from_host("other.example"))
            .expect("mint");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(cache.minted(), 2);
    }

    #[test]
    fn concurrent_first_requests_mint_once() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let cache = Arc::new(cache);
        let barrier = Arc::new(Barrier::new(8));
        let leaves: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    cache.get(&LeafId::from_host("race.example")).expect("mint")
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread panicked"))
            .collect();
        assert_eq!(cache.minted(), 1, "8 concurrent requests must mint once");
        assert!(leaves.iter().all(|l| Arc::ptr_eq(l, &leaves[0])));
    }

    #[test]
    fn every_leaf_has_its_own_serial_and_shares_the_key() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let a = cache.get(&LeafId::from_host("a.example")).expect("mint");
        let b = cache.get(&LeafId::from_host("b.example")).expect("mint");
        let serial = |k: &CertifiedKey| {
            let (_, c) = x509_parser::parse_x509_certificate(k.cert[0].as_ref()).expect("parse");
            c.raw_serial().to_vec()
        };
        assert_ne!(serial(&a), serial(&b), "issuer+serial must be unique");
        assert!(Arc::ptr_eq(&a.key, &b.key), "leaves share one key pair");
        assert_eq!(a.cert.len(), 2, "chain is leaf + CA");
        assert_eq!(&a.cert[1], cache.ca().cert_der());
    }

    #[test]
    fn leaf_fields() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let leaf = cache
            .get(&LeafId::from_host("api.example.com"))
            .expect("mint");
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.cert[0].as_ref()).expect("parse");
        assert_eq!(cert.subject().to_string(), "CN=api.example.com");
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("eku present");
        assert!(eku.value.server_auth);
        assert!(!cert.is_ca());
        let now = OffsetDateTime::now_utc();
        let not_before = cert.validity().not_before.to_datetime();
        let not_after = cert.validity().not_after.to_datetime();
        assert!(not_before < now - Duration::hours(23), "backdated a day");
        assert!(not_after > now + Duration::days(360) && not_after <= cache.ca().not_after());
    }

    #[test]
    fn a_long_name_gets_no_common_name() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let name = format!("{}.example", "a".repeat(60));
        let leaf = cache.get(&LeafId::from_host(&name)).expect("mint");
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.cert[0].as_ref()).expect("parse");
        assert_eq!(cert.subject().iter_common_name().count(), 0);
        handshake(&cache, ServerName::try_from(name).expect("name"), &leaf);
    }

    #[test]
    fn failures_are_counted_and_not_cached() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let empty = LeafId::Dns(String::new());
        assert!(matches!(cache.get(&empty), Err(MintError::EmptyName)));
        assert!(matches!(cache.get(&empty), Err(MintError::EmptyName)));
        let bad = LeafId::Dns("caf\u{e9}.example".into());
        assert!(matches!(
            cache.get(&bad),
            Err(MintError::InvalidName { .. })
        ));
        assert_eq!(cache.failures(), 3, "each attempt is retried and counted");
        assert_eq!(cache.minted(), 0);
    }

    #[test]
    fn the_cache_is_bounded() {
        let (_dir, cache) = cache(32);
        for i in 0..100 {
            cache
                .get(&LeafId::from_host(&format!("h{i}.example")))
                .expect("mint");
            assert!(cache.len() <= 32, "len {} after {i}", cache.len());
        }
        // The most recent host survives eviction.
        cache
            .get(&LeafId::from_host("h99.example"))
            .expect("cached");
        assert_eq!(cache.minted(), 100);
    }

    #[test]
    fn recently_used_hosts_survive_eviction() {
        let (_dir, cache) = cache(16);
        let hot = LeafId::from_host("hot.example");
        cache.get(&hot).expect("mint");
        for i in 0..64 {
            cache
                .get(&LeafId::from_host(&format!("cold{i}.example")))
                .expect("mint");
            cache.get(&hot).expect("hot");
        }
        assert_eq!(cache.minted(), 65, "the hot host must never be re-minted");
    }

    fn client_config(
        cache: &LeafCache,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots
            .add(cache.ca().cert_der().clone())
            .expect("CA is a valid root");
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }

    /// Runs a full handshake in memory between a client that trusts only the test CA and a
    /// server presenting `leaf`, then sends application data through it.
    fn try_handshake(
        client_config: ClientConfig,
        name: ServerName<'static>,
        leaf: &Arc<CertifiedKey>,
    ) -> Result<ClientConnection, rustls::Error> {
        let mut client = ClientConnection::new(Arc::new(client_config), name)?;
        let mut server = ServerConnection::new(server_config(leaf.clone(), &[b"h2", b"http/1.1"]))?;
        let mut buf = Vec::new();
        // A handshake takes at most a few flights; the bound keeps a stuck one from hanging.
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            buf.clear();
            client.write_tls(&mut buf).expect("client write");
            server.read_tls(&mut buf.as_slice()).expect("server read");
            server.process_new_packets()?;
            buf.clear();
            server.write_tls(&mut buf).expect("server write");
            client.read_tls(&mut buf.as_slice()).expect("client read");
            client.process_new_packets()?;
        }
        assert!(
            !client.is_handshaking() && !server.is_handshaking(),
            "handshake did not finish"
        );
        client.writer().write_all(b"ping").expect("write");
        buf.clear();
        client.write_tls(&mut buf).expect("client write");
        server.read_tls(&mut buf.as_slice()).expect("server read");
        server.process_new_packets()?;
        let mut got = [0u8; 4];
        server.reader().read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");
        Ok(client)
    }

    fn handshake(cache: &LeafCache, name: ServerName<'static>, leaf: &Arc<CertifiedKey>) {
        let config = client_config(cache, rustls::DEFAULT_VERSIONS);
        let client = try_handshake(config, name.clone(), leaf)
            .unwrap_or_else(|e| panic!("handshake for {name:?} with a minted leaf failed: {e}"));
        assert_eq!(client.alpn_protocol(), Some(&b"h2"[..]));
    }

    #[test]
    fn a_dns_leaf_verifies_against_the_ca() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let leaf = cache.get(&LeafId::from_host("example.com")).expect("mint");
        handshake(
            &cache,
            ServerName::try_from("example.com").expect("name"),
            &leaf,
        );
    }

    #[test]
    fn an_ip_leaf_verifies_against_the_ca() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        for ip in ["192.0.2.7", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let leaf = cache.get(&LeafId::from(ip)).expect("mint");
            handshake(&cache, ServerName::from(ip), &leaf);
        }
    }

    #[test]
    fn a_leaf_for_another_name_is_rejected() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let leaf = cache.get(&LeafId::from_host("example.com")).expect("mint");
        let err = try_handshake(
            client_config(&cache, rustls::DEFAULT_VERSIONS),
            ServerName::try_from("example.org").expect("name"),
            &leaf,
        )
        .expect_err("a leaf for example.com must not verify as example.org");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "unexpected error: {err}"
        );
    }

    #[test]
    fn tls12_works_too() {
        let (_dir, cache) = cache(DEFAULT_CAPACITY);
        let leaf = cache.get(&LeafId::from_host("old.example")).expect("mint");
        let client = try_handshake(
            client_config(&cache, &[&rustls::version::TLS12]),
            ServerName::try_from("old.example").expect("name"),
            &leaf,
        )
        .unwrap_or_else(|e| panic!("TLS 1.2 handshake failed: {e}"));
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
    }
}
