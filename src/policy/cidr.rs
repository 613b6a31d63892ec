//! CIDR rules for IP-literal destinations, filed by prefix length.
//!
//! One hash table per distinct prefix length, longest first: a look-up costs one probe per
//! length that the rule set uses (a handful), whatever the number of rules.

use std::net::IpAddr;

use ipnet::IpNet;

use super::RuleId;
use super::hash::FxMap;

/// Compiled CIDR rules of one action (allow or deny).
#[derive(Debug, Default)]
pub struct CidrTable {
    v4: Vec<(u8, FxMap<u32, Vec<RuleId>>)>,
    v6: Vec<(u8, FxMap<u128, Vec<RuleId>>)>,
}

fn mask4(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    }
}

impl CidrTable {
    /// File a rule under its network.
    pub fn insert(&mut self, net: IpNet, id: RuleId) {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = u32::from(n.network()) & mask4(len);
                slot(&mut self.v4, len).entry(key).or_default().push(id);
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                let key = u128::from(n.network()) & mask6(len);
                slot(&mut self.v6, len).entry(key).or_default().push(id);
            }
        }
    }

    /// Rules whose network holds `ip`, most specific first. IPv4-mapped IPv6 addresses
    /// (`::ffff:a.b.c.d`) are looked up as the IPv4 address they carry.
    pub fn lookup(&self, ip: IpAddr) -> impl Iterator<Item = RuleId> + '_ {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (v4, v6) = match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                (
                    Some(
                        self.v4
                            .iter()
                            .filter_map(move |(len, t)| t.get(&(bits & mask4(*len)))),
                    ),
                    None,
                )
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                (
                    None,
                    Some(
                        self.v6
                            .iter()
                            .filter_map(move |(len, t)| t.get(&(bits & mask6(*len)))),
                    ),
                )
            }
        };
        v4.into_iter()
            .flatten()
            .chain(v6.into_iter().flatten())
            .flat_map(|ids| ids.iter().copied())
    }
}

/// The table for one prefix length, kept sorted longest first.
fn slot<K, V>(tables: &mut Vec<(u8, FxMap<K, V>)>, len: u8) -> &mut FxMap<K, V> {
    let pos = match tables.iter().position(|(l, _)| *l <= len) {
        Some(p) if tables[p].0 == len => p,
        Some(p) => {
            tables.insert(p, (len, FxMap::default()));
            p
        }
        None => {
            tables.push((len, FxMap::default()));
            tables.len() - 1
        }
    };
    &mut tables[pos].1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(t: &CidrTable, ip: &str) -> Vec<u32> {
        t.lookup(ip.parse().unwrap()).map(|r| r.0).collect()
    }

    #[test]
    fn most_specific_first_and_mapped_addresses() {
        let mut t = CidrTable::default();
        t.insert("10.0.0.0/8".parse().unwrap(), RuleId(0));
        t.insert("10.1.0.0/16".parse().unwrap(), RuleId(1));
        t.insert("0.0.0.0/0".parse().unwrap(), RuleId(2));
        t.insert("2001:db8::/32".parse().unwrap(), RuleId(3));
        assert_eq!(ids(&t, "10.1.2.3"), vec![1, 0, 2]);
        assert_eq!(ids(&t, "10.2.2.3"), vec![0, 2]);
        assert_eq!(ids(&t, "::ffff:10.1.2.3"), vec![1, 0, 2]);
        assert_eq!(ids(&t, "2001:db8::1"), vec![3]);
        assert_eq!(ids(&t, "2001:db9::1"), Vec::<u32>::new());
    }
}
