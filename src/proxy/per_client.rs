//! `proxy.max_connections_per_client`: open connections per client address, so that one
//! client cannot hold every place under `proxy.max_connections`. IPv6 clients count by
//! their /64, the smallest network one host is usually given.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Shards of the table, so that accepts from different clients rarely wait on each other.
const SHARDS: usize = 16;

/// A client as the limit counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    /// The upper 64 bits of the address.
    V6(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(v4.to_bits()),
            IpAddr::V6(v6) => ClientKey::V6((v6.to_bits() >> 64) as u64),
        }
    }

    fn shard(self) -> usize {
        let x = match self {
            ClientKey::V4(a) => a as u64,
            ClientKey::V6(p) => p ^ (p >> 32),
        };
        (x ^ (x >> 8) ^ (x >> 16)) as usize % SHARDS
    }
}

/// Open connections by client. Reload never touches it; the limit is read per accept.
#[derive(Debug, Default)]
pub struct PerClient {
    shards: [Mutex<HashMap<ClientKey, u32>>; SHARDS],
}

/// One client connection's place; given back when dropped.
#[derive(Debug)]
pub struct ClientPlace {
    table: Arc<PerClient>,
    key: ClientKey,
}

impl PerClient {
    /// Take a place for `ip` if it has fewer than `limit` open connections.
    pub fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientPlace> {
        let key = ClientKey::of(ip);
        let mut shard = self.shards[key.shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = shard.entry(key).or_insert(0);
        if *n as usize >= limit {
            return None;
        }
        *n += 1;
        Some(ClientPlace {
            table: self.clone(),
            key,
        })
    }

    /// Open connections counted for `ip` now.
    pub fn open(&self, ip: IpAddr) -> usize {
        let key = ClientKey::of(ip);
        let shard = self.shards[key.shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        shard.get(&key).map_or(0, |n| *n as usize)
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut shard = self.table.shards[self.key.shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = shard.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                shard.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_address_and_ipv6_by_64() {
        let t = Arc::new(PerClient::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let p1 = t.take(a, 2).unwrap();
        let _p2 = t.take(mapped, 2).unwrap();
        assert!(t.take(a, 2).is_none());
        drop(p1);
        assert!(t.take(a, 2).is_some());
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _px = t.take(x, 1).unwrap();
        assert!(t.take(y, 1).is_none());
        assert!(t.take(z, 1).is_some());
        assert_eq!(t.open(y), 1);
    }
}
