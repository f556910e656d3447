//! DNS messages as the listener handles them: parsing what a sandbox asks, building the
//! replies egress writes itself (refusals, error replies, truncated UDP replies), and reading
//! from an upstream reply what egress audits and pins.
//!
//! All wire decoding and encoding goes through `hickory-proto`. The few header bits read by
//! hand (QR, opcode, QDCOUNT) are read before decoding so that a reply or an UPDATE aimed at
//! the listener is classified even when the rest of it does not decode.

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, OpCode, Query as Question, ResponseCode},
    rr::{rdata::opt::EdnsOption, DNSClass, Name, RData, RecordType},
    serialize::binary::{BinDecodable, BinDecoder},
};

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;

/// EDNS option code of an Extended DNS Error (RFC 8914).
pub const EDE_OPTION_CODE: u16 = 15;

/// The UDP payload size egress advertises in the OPT records it writes: the DNS Flag Day 2020
/// value, small enough to avoid IP fragmentation on any common path.
pub const ADVERTISED_UDP_SIZE: u16 = 1232;

/// A UDP reply may always be this long (RFC 1035), whatever the client says.
const MIN_UDP_LIMIT: usize = 512;
/// Larger EDNS sizes are clamped: bigger datagrams fragment, and fragments can be spoofed.
const MAX_UDP_LIMIT: usize = 4096;

/// EDE text is informational (the reason and what would allow the name); it is shortened
/// further whenever the refusal would not fit the client's UDP limit.
const MAX_EDE_TEXT: usize = 300;

/// A standard query from a sandbox, with exactly one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Lowercased, no trailing dot ("" for the root). Bytes that are not plain hostname
    /// characters appear escaped (`\.`, `\000`), so they never match a policy pattern.
    pub name: String,
    pub qtype: u16,
    /// "A", "AAAA", "HTTPS", "TYPE65534"...
    pub qtype_name: String,
    /// The client's EDNS UDP payload size, if it sent an OPT record.
    pub edns_udp_size: Option<u16>,
    /// The query exactly as received.
    pub raw: Vec<u8>,
}

/// Why bytes sent to the listener are not a query egress answers. All of these are the
/// client's doing.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The QR bit is set: a reply, perhaps reflected or spoofed. Drop it silently; answering
    /// a reply invites loops.
    #[error("message is a reply, not a query")]
    NotAQuery,
    /// Answer with FORMERR.
    #[error("malformed query: {0}")]
    Malformed(String),
    /// Any opcode but QUERY (UPDATE, NOTIFY, STATUS...). Answer with NOTIMP.
    #[error("unsupported opcode {opcode}")]
    Unsupported { opcode: u8 },
    /// Not exactly one question. Answer with FORMERR.
    #[error("query has {0} questions, not 1")]
    QuestionCount(u16),
}

/// Parses a query from a sandbox.
pub fn parse_query(buf: &[u8]) -> Result<Query, ParseError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Err(ParseError::Malformed(format!(
            "{} bytes, shorter than a DNS header",
            buf.len()
        )));
    };
    if header[2] & 0x80 != 0 {
        return Err(ParseError::NotAQuery);
    }
    let opcode = (header[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Err(ParseError::Unsupported { opcode });
    }
    let qdcount = u16::from_be_bytes([header[4], header[5]]);
    if qdcount != 1 {
        return Err(ParseError::QuestionCount(qdcount));
    }
    let msg = Message::from_vec(buf).map_err(|e| ParseError::Malformed(e.to_string()))?;
    // Records in these sections of a standard query have no meaning (RFC 1035 §4.1.1), and
    // they would travel upstream with the raw query.
    if !msg.answers.is_empty() || !msg.authorities.is_empty() {
        return Err(ParseError::Malformed(
            "records in the answer or authority section of a query".into(),
        ));
    }
    let question = msg
        .queries
        .first()
        .ok_or_else(|| ParseError::Malformed("question missing".into()))?;
    Ok(Query {
        id: msg.id,
        name: name_string(&question.name),
        qtype: u16::from(question.query_type),
        qtype_name: type_name(question.query_type),
        edns_udp_size: msg.edns.as_ref().map(Edns::max_payload),
        raw: buf.to_vec(),
    })
}

/// Best-effort error reply to bytes that did not parse: needs a 12-byte header; echoes the id
/// (and the first question if it can be read); `None` if not even a header.
pub fn error_response(buf: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut decoder = BinDecoder::new(buf);
    let header = Header::read(&mut decoder).ok()?;
    let mut reply = Message::error_msg(header.metadata.id, header.metadata.op_code, rcode);
    reply.metadata.recursion_desired = header.metadata.recursion_desired;
    reply.metadata.checking_disabled = header.metadata.checking_disabled;
    reply.metadata.recursion_available = true;
    if header.counts.queries >= 1 {
        if let Ok(q) = Question::read(&mut decoder) {
            reply.add_query(q);
        }
    }
    match reply.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(_) => Some(bare_header(
            header.metadata.id,
            header.metadata.recursion_desired,
            rcode,
        )),
    }
}

/// A refusal for a parsed query: same id, question echoed as the client wrote it, QR+RA set,
/// RD and CD copied, the given rcode, no answers. If the query carried EDNS, the reply has an
/// OPT record and, when `ede` is given, an Extended DNS Error (RFC 8914) with that info-code
/// and text. The reply always fits the client's UDP limit (the EDE text is shortened if not).
pub fn refuse(q: &Query, rcode: ResponseCode, ede: Option<(u16, &str)>) -> Vec<u8> {
    let parsed = Message::from_vec(&q.raw).ok();
    let mut reply = Message::error_msg(q.id, OpCode::Query, rcode);
    reply.metadata.recursion_available = true;
    let mut dnssec_ok = false;
    let mut has_edns = q.edns_udp_size.is_some();
    match &parsed {
        Some(m) => {
            reply.metadata.recursion_desired = m.recursion_desired;
            reply.metadata.checking_disabled = m.checking_disabled;
            reply.add_queries(m.queries.iter().take(1).cloned());
            if let Some(edns) = &m.edns {
                has_edns = true;
                dnssec_ok = edns.flags().dnssec_ok;
            }
        }
        // A `Query` built by hand rather than parsed: rebuild the question from its fields.
        None => {
            if let Ok(mut name) = Name::from_ascii(&q.name) {
                name.set_fqdn(true);
                reply.add_query(Question::query(name, RecordType::from(q.qtype)));
            }
        }
    }
    let limit = udp_limit(q);
    let with_text = |text: &str| {
        let mut reply = reply.clone();
        if has_edns {
            let mut edns = Edns::new();
            edns.set_max_payload(ADVERTISED_UDP_SIZE);
            edns.set_dnssec_ok(dnssec_ok);
            if let Some((code, _)) = ede {
                let mut data = code.to_be_bytes().to_vec();
                data.extend_from_slice(text.as_bytes());
                edns.options_mut()
                    .insert(EdnsOption::Unknown(EDE_OPTION_CODE, data));
            }
            reply.set_edns(edns);
        }
        reply.to_vec().ok()
    };
    let text = clip(ede.map_or("", |(_, t)| t), MAX_EDE_TEXT);
    match with_text(text) {
        Some(bytes) if bytes.len() <= limit => bytes,
        Some(bytes) => {
            let room = text.len().saturating_sub(bytes.len() - limit);
            with_text(clip(text, room)).unwrap_or(bytes)
        }
        None => bare_header(q.id, reply.recursion_desired, rcode),
    }
}

/// What egress audits and pins from an upstream reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// "NOERROR", "NXDOMAIN", "SERVFAIL", ...
    pub rcode: String,
    /// Every A/AAAA record in the answer section owned by the question's name or by a name
    /// the CNAME chain from it reaches, with its TTL.
    pub addrs: Vec<(IpAddr, u32)>,
    pub truncated: bool,
}

/// Checks an upstream reply belongs to `q` (QR set, one question equal to q's name
/// case-insensitively and of the same type) and extracts what egress audits and pins.
pub fn inspect_response(resp: &[u8], q: &Query) -> Result<Answer, String> {
    let msg = Message::from_vec(resp).map_err(|e| format!("undecodable reply: {e}"))?;
    if msg.message_type != MessageType::Response {
        return Err("reply has the QR bit clear".into());
    }
    let [question] = msg.queries.as_slice() else {
        return Err(format!("reply has {} questions, not 1", msg.queries.len()));
    };
    let (name, qtype) = (name_string(&question.name), u16::from(question.query_type));
    if name != q.name || qtype != q.qtype {
        return Err(format!(
            "reply is for {name:?} {}, not {:?} {}",
            type_name(question.query_type),
            q.name,
            q.qtype_name
        ));
    }

    // Follow the CNAME chain from the question. Each pass adds at least one name or stops,
    // so a hostile reply (loops, long chains) costs at most one pass per answer record.
    let mut chain = vec![question.name.clone()];
    for _ in 0..msg.answers.len() {
        let before = chain.len();
        for r in &msg.answers {
            if let RData::CNAME(target) = &r.data {
                if in_chain(&chain, &r.name) && !in_chain(&chain, &target.0) {
                    chain.push(target.0.clone());
                }
            }
        }
        if chain.len() == before {
            break;
        }
    }
    let addrs = msg
        .answers
        .iter()
        .filter(|r| r.dns_class == DNSClass::IN && in_chain(&chain, &r.name))
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })
        .collect();
    Ok(Answer {
        rcode: rcode_name(msg.response_code),
        addrs,
        truncated: msg.truncation,
    })
}

/// For a UDP client: if `resp` is longer than `max` bytes, a reply with the header and
/// question only (plus the OPT record, without its options, when there is one and it fits)
/// and the TC bit set, so the client retries over TCP; otherwise `resp` unchanged.
pub fn truncate_for_udp(resp: &[u8], max: usize) -> Vec<u8> {
    if resp.len() <= max {
        return resp.to_vec();
    }
    if let Ok(msg) = Message::from_vec(resp) {
        let mut short = msg.truncate();
        if let Some(edns) = &msg.edns {
            // Options (padding, cookies, upstream EDE) describe the full reply, not this one.
            let mut bare = Edns::new();
            bare.set_max_payload(edns.max_payload());
            bare.set_version(edns.version());
            bare.set_dnssec_ok(edns.flags().dnssec_ok);
            short.set_edns(bare);
        }
        if let Ok(bytes) = short.to_vec() {
            if bytes.len() <= max {
                return bytes;
            }
        }
        short.edns = None;
        if let Ok(bytes) = short.to_vec() {
            return bytes;
        }
    }
    // The reply does not decode as a whole: keep what can be read of its start.
    let mut decoder = BinDecoder::new(resp);
    let Ok(header) = Header::read(&mut decoder) else {
        return resp.get(..max).unwrap_or(resp).to_vec();
    };
    let mut short = Message::new(
        header.metadata.id,
        header.metadata.message_type,
        header.metadata.op_code,
    );
    short.metadata = header.metadata;
    short.metadata.truncation = true;
    if header.counts.queries >= 1 {
        if let Ok(q) = Question::read(&mut decoder) {
            short.add_query(q);
        }
    }
    short.to_vec().unwrap_or_else(|_| {
        let mut bytes = bare_header(
            header.metadata.id,
            header.metadata.recursion_desired,
            header.metadata.response_code,
        );
        bytes[2] |= 0x02;
        bytes
    })
}

/// The largest reply a UDP client accepts: its EDNS size clamped to 512..=4096, or 512
/// without EDNS.
pub fn udp_limit(q: &Query) -> usize {
    q.edns_udp_size.map_or(MIN_UDP_LIMIT, |s| {
        usize::from(s).clamp(MIN_UDP_LIMIT, MAX_UDP_LIMIT)
    })
}

/// The conventional mnemonic of a response code, as dig prints it: "NOERROR", "NXDOMAIN",
/// "RCODE3841" for unassigned ones.
pub fn rcode_name(code: ResponseCode) -> String {
    let n = u16::from(code);
    let name = match n {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADVERS",
        17 => "BADKEY",
        18 => "BADTIME",
        19 => "BADMODE",
        20 => "BADNAME",
        21 => "BADALG",
        22 => "BADTRUNC",
        23 => "BADCOOKIE",
        _ => return format!("RCODE{n}"),
    };
    name.to_owned()
}

/// The mnemonic of a record type, or RFC 3597's `TYPEnnn` for types hickory does not know.
fn type_name(t: RecordType) -> String {
    match t {
        RecordType::Unknown(n) => format!("TYPE{n}"),
        t => t.to_string(),
    }
}

/// A name as egress compares and logs it: escaped ASCII, lowercase, no trailing dot.
fn name_string(name: &Name) -> String {
    let mut s = name.to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s.make_ascii_lowercase();
    s
}

fn in_chain(chain: &[Name], name: &Name) -> bool {
    chain.iter().any(|c| c.eq_ignore_root(name))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A reply that is only a header: for when even hickory cannot encode one.
fn bare_header(id: u16, rd: bool, rcode: ResponseCode) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[..2].copy_from_slice(&id.to_be_bytes());
    h[2] = 0x80 | u8::from(rd);
    h[3] = 0x80 | rcode.low();
    h
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::rr::{
        rdata::{opt::EdnsCode, A, AAAA, CNAME},
        Record,
    };

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("test name")
    }

    fn query_msg(qname: &str, qtype: RecordType, edns: Option<u16>) -> Message {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Question::query(name(qname), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m
    }

    fn query_bytes(qname: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        query_msg(qname, qtype, edns)
            .to_vec()
            .expect("encode query")
    }

    fn parsed(qname: &str, qtype: RecordType, edns: Option<u16>) -> Query {
        parse_query(&query_bytes(qname, qtype, edns)).expect("test query parses")
    }

    fn reply_for(q: &Query) -> Message {
        let m = Message::from_vec(&q.raw).expect("raw query decodes");
        let mut r = Message::response(m.id, OpCode::Query);
        r.add_queries(m.queries.iter().cloned());
        r
    }

    #[test]
    fn parses_a_query() {
        let q = parsed("WWW.Example.COM.", RecordType::A, None);
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name, "www.example.com");
        assert_eq!(q.qtype, 1);
        assert_eq!(q.qtype_name, "A");
        assert_eq!(q.edns_udp_size, None);
        assert_eq!(q.raw, query_bytes("WWW.Example.COM.", RecordType::A, None));
    }

    #[test]
    fn parses_edns_and_type_names() {
        let q = parsed("example.com.", RecordType::HTTPS, Some(1400));
        assert_eq!(q.edns_udp_size, Some(1400));
        assert_eq!(q.qtype_name, "HTTPS");
        let q = parsed("example.com.", RecordType::Unknown(65534), None);
        assert_eq!((q.qtype, q.qtype_name.as_str()), (65534, "TYPE65534"));
        let q = parsed(".", RecordType::NS, None);
        assert_eq!(q.name, "");
    }

    #[test]
    fn classifies_what_is_not_a_plain_query() {
        let mut reply = query_msg("example.com.", RecordType::A, None);
        reply.metadata.message_type = MessageType::Response;
        let bytes = reply.to_vec().expect("encode");
        assert!(matches!(parse_query(&bytes), Err(ParseError::NotAQuery)));

        let mut two = query_msg("example.com.", RecordType::A, None);
        two.add_query(Question::query(name("example.org."), RecordType::A));
        let bytes = two.to_vec().expect("encode");
        assert!(matches!(
            parse_query(&bytes),
            Err(ParseError::QuestionCount(2))
        ));

        let mut none = query_msg("example.com.", RecordType::A, None);
        none.queries.clear();
        let bytes = none.to_vec().expect("encode");
        assert!(matches!(
            parse_query(&bytes),
            Err(ParseError::QuestionCount(0))
        ));

        for (op, code) in [
            (OpCode::Update, 5),
            (OpCode::Status, 2),
            (OpCode::Notify, 4),
        ] {
            let mut m = query_msg("example.com.", RecordType::SOA, None);
            m.metadata.op_code = op;
            let bytes = m.to_vec().expect("encode");
            match parse_query(&bytes) {
                Err(ParseError::Unsupported { opcode }) => assert_eq!(opcode, code),
                other => panic!("opcode {op:?} gave {other:?}"),
            }
        }

        let mut with_answer = query_msg("example.com.", RecordType::A, None);
        with_answer.add_answer(Record::from_rdata(
            name("example.com."),
            60,
            RData::A(A(Ipv4Addr::LOCALHOST)),
        ));
        let bytes = with_answer.to_vec().expect("encode");
        assert!(matches!(parse_query(&bytes), Err(ParseError::Malformed(_))));
    }

    #[test]
    fn never_panics_on_prefixes_or_garbage() {
        let full = query_bytes("www.example.com.", RecordType::AAAA, Some(4096));
        for len in 0..full.len() {
            let prefix = &full[..len];
            let r = parse_query(prefix);
            assert!(r.is_err(), "prefix of {len} bytes parsed: {r:?}");
            if len < HEADER_LEN {
                assert!(matches!(r, Err(ParseError::Malformed(_))));
                assert!(error_response(prefix, ResponseCode::FormErr).is_none());
            } else {
                let reply = error_response(prefix, ResponseCode::FormErr)
                    .expect("a header is enough for an error reply");
                let m = Message::from_vec(&reply).expect("error reply decodes");
                assert_eq!(m.id, 0x1234);
                assert_eq!(m.response_code, ResponseCode::FormErr);
            }
            let _ = truncate_for_udp(prefix, 5);
        }
        assert!(parse_query(&full).is_ok());

        // Deterministic pseudo-random garbage, with and without a plausible header.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let q = parsed("example.com.", RecordType::A, None);
        for i in 0..2000 {
            let len = (next() % 300) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && len >= HEADER_LEN {
                buf[2] &= 0x07;
                buf[4] = 0;
                buf[5] = 1;
            }
            let _ = parse_query(&buf);
            let _ = error_response(&buf, ResponseCode::ServFail);
            let _ = inspect_response(&buf, &q);
            let _ = truncate_for_udp(&buf, 64);
        }
    }

    #[test]
    fn error_response_echoes_id_and_question() {
        let mut m = query_msg("Example.com.", RecordType::A, None);
        m.metadata.op_code = OpCode::Update;
        let bytes = m.to_vec().expect("encode");
        let reply = error_response(&bytes, ResponseCode::NotImp).expect("reply");
        let r = Message::from_vec(&reply).expect("decodes");
        assert_eq!(r.id, 0x1234);
        assert_eq!(r.message_type, MessageType::Response);
        assert_eq!(r.op_code, OpCode::Update);
        assert_eq!(r.response_code, ResponseCode::NotImp);
        assert!(r.recursion_desired);
        assert_eq!(r.queries.len(), 1);
        assert_eq!(r.queries[0].name.to_ascii(), "Example.com.");
    }

    #[test]
    fn refusal_without_edns() {
        let q = parsed("Blocked.Example.", RecordType::A, None);
        let bytes = refuse(&q, ResponseCode::NXDomain, Some((15, "denied by policy")));
        let r = Message::from_vec(&bytes).expect("refusal decodes");
        assert_eq!(r.id, q.id);
        assert_eq!(r.message_type, MessageType::Response);
        assert!(r.recursion_available && r.recursion_desired);
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        assert_eq!(r.queries.len(), 1);
        // Echoed as sent: clients checking 0x20 case randomisation compare exactly.
        assert_eq!(r.queries[0].name.to_ascii(), "Blocked.Example.");
        assert!(r.answers.is_empty());
        assert!(r.edns.is_none());
    }

    #[test]
    fn refusal_with_edns_carries_extended_error() {
        let q = parsed("blocked.example.", RecordType::AAAA, Some(1232));
        let bytes = refuse(&q, ResponseCode::NXDomain, Some((15, "denied by policy")));
        let r = Message::from_vec(&bytes).expect("refusal decodes");
        assert_eq!(r.id, q.id);
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        assert_eq!(r.queries[0].query_type, RecordType::AAAA);
        let edns = r.edns.as_ref().expect("OPT record in reply");
        match edns.option(EdnsCode::Unknown(EDE_OPTION_CODE)) {
            Some(EdnsOption::Unknown(15, data)) => {
                assert_eq!(&data[..2], &15u16.to_be_bytes());
                assert_eq!(&data[2..], b"denied by policy");
            }
            other => panic!("no EDE option: {other:?}"),
        }

        // Without `ede`, the OPT record is still there, with no options.
        let bytes = refuse(&q, ResponseCode::Refused, None);
        let r = Message::from_vec(&bytes).expect("decodes");
        assert_eq!(r.response_code, ResponseCode::Refused);
        let edns = r.edns.as_ref().expect("OPT record");
        assert!(edns.options().as_ref().is_empty());
    }

    #[test]
    fn refusal_fits_the_udp_limit() {
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.{}.", "b".repeat(61));
        let q = parsed(&long, RecordType::A, Some(512));
        let text = "x".repeat(1000);
        let bytes = refuse(&q, ResponseCode::NXDomain, Some((18, &text)));
        assert!(bytes.len() <= 512, "refusal is {} bytes", bytes.len());
        let r = Message::from_vec(&bytes).expect("decodes");
        assert!(r.edns.is_some());
    }

    #[test]
    fn refusal_of_a_hand_built_query() {
        let q = Query {
            id: 7,
            name: "example.com".into(),
            qtype: 28,
            qtype_name: "AAAA".into(),
            edns_udp_size: None,
            raw: Vec::new(),
        };
        let r = Message::from_vec(&refuse(&q, ResponseCode::NXDomain, None)).expect("decodes");
        assert_eq!(r.id, 7);
        assert_eq!(r.queries[0].name.to_ascii(), "example.com.");
        assert_eq!(r.queries[0].query_type, RecordType::AAAA);
    }

    #[test]
    fn inspects_addresses_through_a_cname_chain() {
        let q = parsed("www.example.com.", RecordType::A, None);
        let mut r = reply_for(&q);
        r.add_answer(Record::from_rdata(
            name("WWW.example.com."),
            300,
            RData::CNAME(CNAME(name("edge.cdn.example."))),
        ));
        r.add_answer(Record::from_rdata(
            name("edge.cdn.example."),
            60,
            RData::CNAME(CNAME(name("e1.cdn.example."))),
        ));
        r.add_answer(Record::from_rdata(
            name("e1.cdn.example."),
            20,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        r.add_answer(Record::from_rdata(
            name("e1.cdn.example."),
            30,
            RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
        ));
        // Not reachable from the question: not pinned to it.
        r.add_answer(Record::from_rdata(
            name("elsewhere.example."),
            30,
            RData::A(A(Ipv4Addr::new(198, 51, 100, 9))),
        ));
        let a = inspect_response(&r.to_vec().expect("encode"), &q).expect("reply accepted");
        assert_eq!(a.rcode, "NOERROR");
        assert!(!a.truncated);
        assert_eq!(
            a.addrs,
            vec![
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 20),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 30),
            ]
        );
    }

    #[test]
    fn inspect_survives_a_cname_loop() {
        let q = parsed("a.example.", RecordType::A, None);
        let mut r = reply_for(&q);
        r.add_answer(Record::from_rdata(
            name("a.example."),
            1,
            RData::CNAME(CNAME(name("b.example."))),
        ));
        r.add_answer(Record::from_rdata(
            name("b.example."),
            1,
            RData::CNAME(CNAME(name("a.example."))),
        ));
        let a = inspect_response(&r.to_vec().expect("encode"), &q).expect("accepted");
        assert!(a.addrs.is_empty());
    }

    #[test]
    fn inspect_rejects_replies_for_other_questions() {
        let q = parsed("www.example.com.", RecordType::A, None);
        let other = parsed("www.example.org.", RecordType::A, None);
        let r = reply_for(&other);
        let err = inspect_response(&r.to_vec().expect("encode"), &q).expect_err("other name");
        assert!(err.contains("www.example.org"), "{err}");

        let aaaa = parsed("www.example.com.", RecordType::AAAA, None);
        let r = reply_for(&aaaa);
        assert!(inspect_response(&r.to_vec().expect("encode"), &q).is_err());

        let mut r = reply_for(&q);
        r.metadata.message_type = MessageType::Query;
        assert!(inspect_response(&r.to_vec().expect("encode"), &q).is_err());

        // Case differences (0x20 randomisation upstream) are fine.
        let upper = parsed("WWW.EXAMPLE.COM.", RecordType::A, None);
        let mut r = reply_for(&upper);
        r.metadata.response_code = ResponseCode::NXDomain;
        r.metadata.truncation = true;
        let a = inspect_response(&r.to_vec().expect("encode"), &q).expect("accepted");
        assert_eq!(a.rcode, "NXDOMAIN");
        assert!(a.truncated);
    }

    #[test]
    fn truncates_long_udp_replies() {
        let q = parsed("big.example.", RecordType::A, Some(4096));
        let mut r = reply_for(&q);
        r.metadata.recursion_desired = true;
        let mut e = Edns::new();
        e.set_max_payload(1232);
        r.set_edns(e);
        for i in 0..100u8 {
            r.add_answer(Record::from_rdata(
                name("big.example."),
                60,
                RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
            ));
        }
        let full = r.to_vec().expect("encode");
        assert!(full.len() > 512);
        assert_eq!(truncate_for_udp(&full, full.len()), full);

        let short = truncate_for_udp(&full, 512);
        assert!(short.len() <= 512);
        let t = Message::from_vec(&short).expect("truncated reply decodes");
        assert!(t.truncation);
        assert_eq!(t.id, q.id);
        assert!(t.recursion_desired);
        assert!(t.answers.is_empty());
        assert_eq!(t.queries, r.queries);
        assert!(t.edns.is_some());

        // A reply that does not decode past its question is cut to header + question.
        let mut broken = full.clone();
        broken.truncate(600);
        let t = Message::from_vec(&truncate_for_udp(&broken, 512)).expect("decodes");
        assert!(t.truncation);
        assert_eq!(t.queries, r.queries);
        assert!(t.answers.is_empty());
    }

    #[test]
    fn udp_limits() {
        assert_eq!(udp_limit(&parsed("a.example.", RecordType::A, None)), 512);
        assert_eq!(
            udp_limit(&parsed("a.example.", RecordType::A, Some(1232))),
            1232
        );
        assert_eq!(
            udp_limit(&parsed("a.example.", RecordType::A, Some(65000))),
            4096
        );
        let mut q = parsed("a.example.", RecordType::A, None);
        q.edns_udp_size = Some(100);
        assert_eq!(udp_limit(&q), 512);
    }

    #[test]
    fn rcode_names() {
        assert_eq!(rcode_name(ResponseCode::NoError), "NOERROR");
        assert_eq!(rcode_name(ResponseCode::ServFail), "SERVFAIL");
        assert_eq!(rcode_name(ResponseCode::NXDomain), "NXDOMAIN");
        assert_eq!(rcode_name(ResponseCode::Refused), "REFUSED");
        assert_eq!(rcode_name(ResponseCode::Unknown(3841)), "RCODE3841");
    }
}
