//! `aml-egress nva-rules`: a complete, commented nftables rule set for a network virtual
//! appliance VM. Compute's TCP to the ports the host rules name is redirected to the
//! transparent listeners (decided there by name); the catalog's network rules (service-tag
//! prefixes on their ports, TCP and UDP) and the other CIDR rules (TCP, denials first) are
//! forwarded with source NAT; everything else from
//! the compute subnets is counted and dropped. `nft -f` loads it; loading it again replaces
//! the previous version. With `[[client_policy]]` policies, each policy's network rules
//! are forwarded for the addresses it serves only (see [`rules`]).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use ipnet::IpNet;

use crate::catalog::Protocol;
use crate::config::{Built, Compiled, UnmatchedClients};
use crate::policy::{Action, Matchable, PortSet, Source};

/// Where a redirected port goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tls,
    Http,
    /// Not redirected: left to the network rules (protocols that are neither TLS nor HTTP).
    None,
}

/// Ports the host rules name that never carry TLS or HTTP: SMB (445) to storage goes by
/// the network rules (`Storage.<region>`), not through the proxy.
const NOT_REDIRECTED: [u16; 1] = [445];

/// Why no rule set can be printed.
#[derive(Debug, thiserror::Error)]
pub enum NvaError {
    #[error("--from: give the compute subnets, for example --from 10.0.1.0/24 (repeatable)")]
    NoSubnets,
    #[error(
        "transparent.tls_listen and transparent.http_listen are both needed in the configuration: the rules redirect compute's traffic to them; add for example\n[transparent]\ntls_listen = [\"0.0.0.0:15443\"]\nhttp_listen = [\"0.0.0.0:15080\"]"
    )]
    NoListeners,
}

/// One policy's network rules as the rule set writes them: a comment naming it, the
/// sets of its clients' addresses, the prefix of its tag sets, and its compiled policy.
struct Block<'a> {
    comment: String,
    /// The rules' comment prefix (`team-a: `), empty for a configuration of one policy.
    label: String,
    src4: String,
    src6: String,
    tags: String,
    built: &'a Built,
}

/// The rule set for `c`, with compute in `from` (by default, with client policies, their
/// sources) and `redirect` overriding where a port goes.
///
/// With `[[client_policy]]` policies the redirected ports are those of every policy's host
/// rules (the proxy decides each client under its own policy), and each policy's network
/// rules are forwarded for its own clients alone: a set of the addresses it serves (its
/// sources less the more specific prefixes of other policies, so no two sets overlap) and
/// its rules matched on it. The default policy's apply to the `--from` addresses that no
/// client policy claims, when `policy.unmatched_clients = "default"`.
pub fn rules(c: &Compiled, from: &[IpNet], redirect: &[(u16, Via)]) -> Result<String, NvaError> {
    let clients = &c.clients;
    let from: Vec<IpNet> = if from.is_empty() {
        clients.claimed()
    } else {
        from.to_vec()
    };
    if from.is_empty() {
        return Err(NvaError::NoSubnets);
    }
    let (Some(tls), Some(http)) = (
        c.transparent.tls_listen.first(),
        c.transparent.http_listen.first(),
    ) else {
        return Err(NvaError::NoListeners);
    };
    let every: Vec<&Built> = std::iter::once(&c.built)
        .chain(clients.policies.iter().map(|p| &*p.built))
        .collect();
    // The ports the host rules name (of every policy): 80 to HTTP, the rest to TLS, unless
    // overridden.
    let mut ports: BTreeSet<(u16, u16)> = BTreeSet::new();
    for b in &every {
        for r in b.policy.rules() {
            if let (Action::Allow, Matchable::Host(..)) = (r.action, &r.what) {
                ports.extend(r.ports.ranges().iter().copied());
            }
        }
    }
    let mut to_http = vec![(80u16, 80u16)];
    let mut to_tls: Vec<(u16, u16)> = ports
        .into_iter()
        .filter(|&(lo, hi)| !(lo == 80 && hi == 80))
        .filter(|&(lo, hi)| !(lo == hi && NOT_REDIRECTED.contains(&lo)))
        .collect();
    for &(port, via) in redirect {
        to_tls.retain(|&(lo, hi)| !(lo == port && hi == port));
        to_http.retain(|&(lo, hi)| !(lo == port && hi == port));
        match via {
            Via::Tls => to_tls.push((port, port)),
            Via::Http => to_http.push((port, port)),
            Via::None => {}
        }
    }
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = from.iter().partition(|n| n.addr().is_ipv4());
    let region = c.built.region.as_deref().unwrap_or("<region>");
    let cloud = c.built.cloud;
    let admin = c.admin.listen.map(|a| a.port());
    // Every region the policies render, for the Batch routes.
    let mut regions: Vec<&str> = vec![region];
    for p in &clients.policies {
        if let Some(r) = p.built.region.as_deref()
            && !regions.contains(&r)
        {
            regions.push(r);
        }
    }
    let batch: String = regions
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let name = if i == 0 { "batch".to_owned() } else { format!("batch-{r}") };
            format!("#   az network route-table route create -g RG --route-table-name COMPUTE_RT -n {name} \\\n#     --address-prefix BatchNodeManagement.{r} --next-hop-type Internet\n")
        })
        .collect();

    let mut o = String::new();
    let w = &mut o;
    let _ = write!(
        w,
        "#!/usr/sbin/nft -f\n# aml-egress network virtual appliance rules ({cloud} cloud, region {region}, catalog {}).\n# Generated by `aml-egress nva-rules`; load with `nft -f FILE`. Loading again replaces it.\n#\n# Azure side, once (names in capitals are yours):\n#   az network route-table route create -g RG --route-table-name COMPUTE_RT -n default \\\n#     --address-prefix 0.0.0.0/0 --next-hop-type VirtualAppliance --next-hop-ip-address NVA_IP\n#   az network route-table route create -g RG --route-table-name COMPUTE_RT -n aml \\\n#     --address-prefix AzureMachineLearning --next-hop-type Internet\n{batch}#   az network nic update -g RG -n NVA_NIC --ip-forwarding true\n# On this VM:\n#   sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1\n#   (and the same in /etc/sysctl.d/90-aml-egress.conf)\n",
        c.built.revision
    );
    // The blocks of network rules: one per policy that serves anyone.
    let mut blocks = Vec::new();
    let mut sets = String::new();
    if clients.policies.is_empty() {
        blocks.push(Block {
            comment: String::new(),
            label: String::new(),
            src4: "compute4".into(),
            src6: "compute6".into(),
            tags: "tag".into(),
            built: &c.built,
        });
    } else {
        let _ = writeln!(
            w,
            "#\n# Policies per client: each policy's network rules are forwarded for its own clients only."
        );
        for (i, p) in clients.policies.iter().enumerate() {
            let served = clients.served(i);
            let shown: Vec<String> = served.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                w,
                "#   policy {} (set p{n}_src4, p{n}_src6): {}; catalog {} for region {}",
                p.name,
                if shown.is_empty() {
                    "no address of its own".to_owned()
                } else {
                    shown.join(", ")
                },
                p.built.revision,
                p.built.region.as_deref().unwrap_or("<region>"),
                n = i + 1
            );
            for s in &p.sources {
                if !from.iter().any(|f| f.contains(s)) {
                    let _ = writeln!(
                        w,
                        "#   note: policy {}'s source {s} is not within --from: its traffic is neither redirected, nor forwarded with source NAT, nor dropped here",
                        p.name
                    );
                }
            }
            if served.is_empty() {
                continue;
            }
            let (s4, s6): (Vec<IpNet>, Vec<IpNet>) =
                served.iter().partition(|n| n.addr().is_ipv4());
            let _ = writeln!(sets, "  # policy {}: the addresses it serves", p.name);
            set(&mut sets, &format!("p{}_src4", i + 1), "ipv4_addr", &s4);
            set(&mut sets, &format!("p{}_src6", i + 1), "ipv6_addr", &s6);
            // Policies compiled once share their tag sets.
            let owner = clients
                .policies
                .iter()
                .position(|q| std::sync::Arc::ptr_eq(&q.built, &p.built))
                .unwrap_or(i);
            blocks.push(Block {
                comment: format!("policy {}: its clients only", p.name),
                label: format!("{}: ", p.name),
                src4: format!("p{}_src4", i + 1),
                src6: format!("p{}_src6", i + 1),
                tags: format!("p{}_tag", owner + 1),
                built: &p.built,
            });
        }
        match clients.unmatched {
            UnmatchedClients::Default => {
                let rest = crate::config::carve(&from, &clients.claimed());
                let (u4, u6): (Vec<IpNet>, Vec<IpNet>) =
                    rest.iter().partition(|n| n.addr().is_ipv4());
                let _ = writeln!(
                    w,
                    "#   policy default (set unclaimed4, unclaimed6): the --from addresses no policy claims"
                );
                let _ = writeln!(
                    sets,
                    "  # policy default: the --from addresses no client policy claims"
                );
                set(&mut sets, "unclaimed4", "ipv4_addr", &u4);
                set(&mut sets, "unclaimed6", "ipv6_addr", &u6);
                blocks.push(Block {
                    comment: "policy default: the --from addresses no client policy claims".into(),
                    label: "default: ".into(),
                    src4: "unclaimed4".into(),
                    src6: "unclaimed6".into(),
                    tags: "tag".into(),
                    built: &c.built,
                });
            }
            UnmatchedClients::Refuse => {
                let _ = writeln!(
                    w,
                    "#   policy default: serves no client (policy.unmatched_clients = \"refuse\"), so none of its network rules is forwarded"
                );
            }
        }
    }
    let _ = writeln!(
        w,
        "\ntable inet aml_egress {{}}\ndelete table inet aml_egress\n"
    );
    let _ = writeln!(w, "table inet aml_egress {{");
    set(w, "compute4", "ipv4_addr", &v4);
    set(w, "compute6", "ipv6_addr", &v6);
    w.push_str(&sets);
    // One pair of sets per network rule (of each policy compiled apart).
    let mut written: BTreeSet<&str> = BTreeSet::new();
    for b in &blocks {
        if !written.insert(&b.tags) {
            continue;
        }
        for (i, n) in b.built.network.iter().enumerate() {
            let (t4, t6): (Vec<IpNet>, Vec<IpNet>) =
                n.prefixes.iter().partition(|p| p.addr().is_ipv4());
            let _ = writeln!(w, "  # {}{} ({})", b.label, n.tag, n.source);
            set(w, &format!("{}{i}_4", b.tags), "ipv4_addr", &t4);
            set(w, &format!("{}{i}_6", b.tags), "ipv6_addr", &t6);
        }
    }
    let _ = writeln!(
        w,
        "  chain to_proxy {{\n    # Compute's web traffic goes to the proxy's transparent listeners, decided by name.\n    type nat hook prerouting priority dstnat; policy accept;"
    );
    for (family, set) in [("ip", "compute4"), ("ip6", "compute6")] {
        let _ = writeln!(
            w,
            "    {family} saddr @{set} tcp dport {{ {} }} redirect to :{}",
            ports_text(&to_http),
            http.port()
        );
        if !to_tls.is_empty() {
            let _ = writeln!(
                w,
                "    {family} saddr @{set} tcp dport {{ {} }} redirect to :{}",
                ports_text(&to_tls),
                tls.port()
            );
        }
    }
    let _ = writeln!(w, "  }}\n");
    let _ = writeln!(
        w,
        "  chain network_rules {{\n    # The catalog's network rules, forwarded; everything else from compute is counted and dropped.\n    type filter hook forward priority filter; policy accept;\n    ct state established,related accept"
    );
    for b in &blocks {
        network_block(w, b);
    }
    let _ = writeln!(
        w,
        "    ip saddr @compute4 counter drop comment \"not in the aml-egress catalog\"\n    ip6 saddr @compute6 counter drop comment \"not in the aml-egress catalog\"\n  }}\n"
    );
    let _ = writeln!(
        w,
        "  chain source_nat {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr @compute4 masquerade\n    ip6 saddr @compute6 masquerade\n  }}\n"
    );
    let _ = writeln!(
        w,
        "  chain health_probe {{\n    # The load balancer's health probe comes from Azure's platform address.\n    type filter hook input priority filter; policy accept;"
    );
    if let Some(port) = admin {
        let _ = writeln!(
            w,
            "    ip saddr 168.63.129.16 tcp dport {port} accept comment \"health probe to /readyz\""
        );
    }
    let _ = writeln!(w, "  }}\n}}");
    Ok(o)
}

/// The forward rules of one block: each network rule of its policy, from its clients'
/// sets to the rule's tag sets on the rule's ports.
fn network_block(w: &mut String, b: &Block<'_>) {
    let network = &b.built.network;
    if !b.comment.is_empty() {
        let _ = writeln!(w, "    # {}", b.comment);
    }
    let nameless = &b.built.policy.options().nameless_tls_ports;
    // CIDR rules other than a service tag's prefixes (operator's, imported): denials
    // first, as the policy applies them, then allows. Ports the proxy's listeners take
    // are redirected before this chain and never reach these rules.
    let cidrs: Vec<_> = b
        .built
        .policy
        .rules()
        .iter()
        .filter(|r| matches!(r.what, Matchable::Cidr(_)))
        .filter(|r| {
            !matches!(
                r.source,
                Source::Catalog {
                    service_tag: Some(_),
                    ..
                }
            )
        })
        .collect();
    let denials = cidrs.iter().filter(|r| r.action == Action::Deny);
    let allows = cidrs.iter().filter(|r| r.action == Action::Allow);
    for r in denials.chain(allows) {
        let Matchable::Cidr(net) = &r.what else {
            continue;
        };
        let ports = if r.action == Action::Allow
            && !matches!(r.source, Source::Operator { .. })
            && !nameless.is_empty()
        {
            match r.ports.without(nameless) {
                Some(p) => p,
                None => continue,
            }
        } else {
            r.ports.clone()
        };
        let l4 = match ports.is_any() {
            true => " meta l4proto tcp".to_owned(),
            false => format!(" tcp dport {{ {} }}", ports_text(ports.ranges())),
        };
        let (family, src) = match net {
            IpNet::V4(_) => ("ip", &b.src4),
            IpNet::V6(_) => ("ip6", &b.src6),
        };
        let (verdict, word) = match r.action {
            Action::Deny => ("counter drop", "deny"),
            Action::Allow => ("accept", "allow"),
        };
        let _ = writeln!(
            w,
            "    {family} saddr @{src} {family} daddr {}{l4} {verdict} comment \"{}{word} {}\"",
            net.trunc(),
            b.label,
            net.trunc()
        );
    }
    if network.is_empty() {
        let _ = writeln!(
            w,
            "    # No network rules: set catalog.service_tags_file to forward the catalog's service tags."
        );
    }
    for (i, n) in network.iter().enumerate() {
        let proto = match n.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        // Under catalog.service_tags_nameless_tls = "deny" a tag's prefix allows no TLS
        // port: that traffic is redirected to the proxy and decided there by name.
        let ports = match n.protocol {
            Protocol::Tcp if !nameless.is_empty() => match n.ports.without(nameless) {
                Some(p) => p,
                None => {
                    let _ = writeln!(
                        w,
                        "    # {}{}: TCP only on TLS ports, decided by name at the proxy (catalog.service_tags_nameless_tls = \"deny\")",
                        b.label, n.tag
                    );
                    continue;
                }
            },
            _ => n.ports.clone(),
        };
        let dport = match ports.is_any() {
            true => String::new(),
            false => format!(" {proto} dport {{ {} }}", ports_text(ports.ranges())),
        };
        let l4 = if dport.is_empty() {
            format!(" meta l4proto {proto}")
        } else {
            dport
        };
        // nftables keeps comments to 128 bytes.
        let mut comment = format!("{}{}", b.label, n.tag);
        if comment.len() > 120 {
            let mut end = 120;
            while !comment.is_char_boundary(end) {
                end -= 1;
            }
            comment.truncate(end);
        }
        for (family, src, tag) in [("ip", &b.src4, "4"), ("ip6", &b.src6, "6")] {
            let _ = writeln!(
                w,
                "    {family} saddr @{src} {family} daddr @{}{i}_{tag}{l4} accept comment \"{comment}\"",
                b.tags
            );
        }
    }
}

/// A named interval set (overlapping prefixes merged by nftables' auto-merge).
fn set(w: &mut String, name: &str, kind: &str, nets: &[IpNet]) {
    let _ = write!(
        w,
        "  set {name} {{\n    type {kind}; flags interval; auto-merge;\n"
    );
    if !nets.is_empty() {
        let items: Vec<String> = nets.iter().map(|n| n.trunc().to_string()).collect();
        let _ = writeln!(w, "    elements = {{ {} }}", items.join(", "));
    }
    let _ = writeln!(w, "  }}");
}

fn ports_text(ranges: &[(u16, u16)]) -> String {
    let set = PortSet::from_ranges(ranges.iter().copied());
    set.range_texts()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `PORT=tls`, `PORT=http` or `PORT=none`, for `--redirect`.
pub fn parse_redirect(s: &str) -> Result<(u16, Via), String> {
    let (port, via) = s
        .split_once('=')
        .ok_or_else(|| format!("--redirect {s}: write PORT=tls or PORT=http"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("--redirect {s}: {port} is not a port"))?;
    let via = match via {
        "tls" => Via::Tls,
        "http" => Via::Http,
        "none" => Via::None,
        _ => return Err(format!("--redirect {s}: use tls, http or none after the =")),
    };
    Ok((port, via))
}
