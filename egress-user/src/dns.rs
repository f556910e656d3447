//! DNS building blocks: the wire format (hickory-proto), forwarding to the host's
//! resolvers, tunnelling heuristics and the DNS-pinning store. The listener comes next.

pub mod message;
pub mod pins;
pub mod tunnel;
pub mod upstream;
