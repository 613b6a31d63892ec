//! What Azure says one workspace needs, imported as rules (`catalog.import`). Two shapes,
//! told apart by their content:
//!
//! - the answer of `Workspaces_ListOutboundNetworkDependenciesEndpoints` (`az rest` on
//!   `.../workspaces/{name}/outboundNetworkDependenciesEndpoints`): `value[].properties`
//!   with a `category` and `endpoints[]` of `domainName` and `endpointDetails[].port`;
//! - a managed network's outbound rules, as `az ml workspace outbound-rule list` prints them
//!   (an array) or as ARM resources (the fields under `properties`): `name`, `category`,
//!   `type` (`FQDN`, `ServiceTag`, `PrivateEndpoint`, compared without case or `_`) and
//!   `destination`.
//!
//! Unknown fields are ignored; a wrong shape is an error naming the JSON path.

use ipnet::IpNet;
use serde_json::Value;

use super::ServiceTags;
use crate::policy::{Action, Matchable, PortSet, RuleSpec, Source, parse_pattern};

/// What a file yields: rules, entries no proxy enforces, and notes.
#[derive(Debug, Default)]
pub struct Imported {
    pub rules: Vec<RuleSpec>,
    /// Private endpoints and the like: `(what, why)`.
    pub not_enforced: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

/// A wrong shape: where in the JSON, and what is wrong there.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct ImportError {
    pub path: String,
    pub problem: String,
}

fn bad(path: impl Into<String>, problem: impl Into<String>) -> ImportError {
    ImportError {
        path: path.into(),
        problem: problem.into(),
    }
}

fn source(file: &str, what: String) -> Source {
    Source::Imported {
        file: file.to_owned(),
        what,
    }
}

/// Import one file's text; `file` names it in sources and errors.
pub fn import(text: &str, file: &str, tags: Option<&ServiceTags>) -> Result<Imported, ImportError> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad("$", format!("not JSON: {e}")))?;
    let mut out = Imported::default();
    if let Some(values) = v.get("value").and_then(Value::as_array) {
        for (i, item) in values.iter().enumerate() {
            let path = format!("$.value[{i}]");
            let props = item.get("properties").unwrap_or(item);
            if props.get("endpoints").is_some() {
                dependencies(props, &path, file, &mut out)?;
            } else {
                outbound_rule(props, &path, file, tags, &mut out)?;
            }
        }
        return Ok(out);
    }
    let Some(items) = v.as_array() else {
        return Err(bad(
            "$",
            "neither a list of outbound rules nor an object with a `value` array",
        ));
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("$[{i}]");
        let props = item.get("properties").unwrap_or(item);
        outbound_rule(props, &path, file, tags, &mut out)?;
    }
    Ok(out)
}

/// One `properties` of the outbound network dependencies answer.
fn dependencies(
    props: &Value,
    path: &str,
    file: &str,
    out: &mut Imported,
) -> Result<(), ImportError> {
    let category = props
        .get("category")
        .and_then(Value::as_str)
        .unwrap_or("(no category)");
    let endpoints = props
        .get("endpoints")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("{path}.properties.endpoints"), "expected an array"))?;
    for (j, e) in endpoints.iter().enumerate() {
        let epath = format!("{path}.properties.endpoints[{j}]");
        let domain = e
            .get("domainName")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("{epath}.domainName"), "expected a string"))?;
        let mut ports = Vec::new();
        for (k, d) in e
            .get("endpointDetails")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let port = d
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    bad(
                        format!("{epath}.endpointDetails[{k}].port"),
                        "expected a port",
                    )
                })?;
            ports.push((port, port));
        }
        if ports.is_empty() {
            ports.push((443, 443));
        }
        host_rule(
            domain,
            PortSet::from_ranges(ports),
            source(file, format!("category {category}")),
            &epath,
            out,
        )?;
    }
    Ok(())
}

fn host_rule(
    name: &str,
    ports: PortSet,
    source: Source,
    path: &str,
    out: &mut Imported,
) -> Result<(), ImportError> {
    let (host, rule_path) =
        parse_pattern(name).map_err(|e| bad(path, format!("{name:?} is not a host name: {e}")))?;
    out.rules.push(RuleSpec {
        action: Action::Allow,
        what: Matchable::Host(host, rule_path),
        ports,
        source,
    });
    Ok(())
}

/// `"80, 8080-8089"` as ports.
fn port_ranges(text: &str, path: &str) -> Result<PortSet, ImportError> {
    let mut ranges = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p > 0);
        match (parse(lo), parse(hi)) {
            (Some(lo), Some(hi)) if lo <= hi => ranges.push((lo, hi)),
            _ => return Err(bad(path, format!("{part:?} is not a port or range"))),
        }
    }
    if ranges.is_empty() {
        return Err(bad(path, "no ports"));
    }
    Ok(PortSet::from_ranges(ranges))
}

/// One managed-network outbound rule.
fn outbound_rule(
    props: &Value,
    path: &str,
    file: &str,
    tags: Option<&ServiceTags>,
    out: &mut Imported,
) -> Result<(), ImportError> {
    let name = props
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    let category = props
        .get("category")
        .and_then(Value::as_str)
        .unwrap_or("(no category)");
    let kind = props
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{path}.type"), "expected a string"))?
        .to_ascii_lowercase()
        .replace('_', "");
    let what = format!("outbound rule {name} ({category})");
    let destination = props
        .get("destination")
        .ok_or_else(|| bad(format!("{path}.destination"), "missing"))?;
    match kind.as_str() {
        "fqdn" => {
            let host = destination
                .as_str()
                .ok_or_else(|| bad(format!("{path}.destination"), "expected a string"))?;
            host_rule(
                host,
                PortSet::from_ranges([(80, 80), (443, 443)]),
                source(file, what),
                &format!("{path}.destination"),
                out,
            )
        }
        "servicetag" => {
            let dpath = format!("{path}.destination");
            let protocol = destination
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("TCP")
                .to_ascii_lowercase();
            let ports = match destination.get("portRanges").and_then(Value::as_str) {
                Some(text) => port_ranges(text, &format!("{dpath}.portRanges"))?,
                None => return Err(bad(format!("{dpath}.portRanges"), "expected a string")),
            };
            if protocol != "tcp" && protocol != "*" {
                out.not_enforced.push((
                    what,
                    format!("{protocol}, which an HTTP proxy does not carry"),
                ));
                return Ok(());
            }
            let mut nets: Vec<IpNet> = Vec::new();
            let mut tag_name = None;
            if let Some(tag) = destination.get("serviceTag").and_then(Value::as_str) {
                match tags.and_then(|t| t.lookup(tag)) {
                    Some((spelled, prefixes)) => {
                        tag_name = Some(spelled.to_owned());
                        nets.extend_from_slice(prefixes);
                    }
                    None => out.warnings.push(format!(
                        "{what} in {file}: service tag {tag} needs catalog.service_tags_file (with that tag) to be enforced"
                    )),
                }
            }
            for (k, p) in destination
                .get("addressPrefixes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let net = p
                    .as_str()
                    .and_then(crate::config::parse_cidr)
                    .ok_or_else(|| bad(format!("{dpath}.addressPrefixes[{k}]"), "not a network"))?;
                nets.push(net);
            }
            let what = match tag_name {
                Some(t) => format!("{what}, service tag {t}"),
                None => what,
            };
            out.rules.extend(nets.into_iter().map(|net| RuleSpec {
                action: Action::Allow,
                what: Matchable::Cidr(net),
                ports: ports.clone(),
                source: source(file, what.clone()),
            }));
            Ok(())
        }
        "privateendpoint" => {
            out.not_enforced.push((
                what,
                "a private endpoint: reached inside the virtual network, not through a proxy"
                    .into(),
            ));
            Ok(())
        }
        other => Err(bad(
            format!("{path}.type"),
            format!("{other:?} is not FQDN, ServiceTag or PrivateEndpoint"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_and_their_errors() {
        let deps = r#"{"value":[{"properties":{"category":"Azure Active Directory","endpoints":[{"domainName":"login.microsoftonline.com","endpointDetails":[{"port":443}]}]}}]}"#;
        let got = import(deps, "deps.json", None).unwrap();
        assert_eq!(got.rules.len(), 1);
        assert_eq!(got.rules[0].ports.to_string(), "443");
        let rules = r#"[
          {"name":"pypi","category":"UserDefined","status":"Active","type":"FQDN","destination":"pypi.org"},
          {"name":"st","category":"Required","type":"service_tag","destination":{"addressPrefixes":["20.1.2.0/24"],"protocol":"TCP","portRanges":"80, 8080-8089"}},
          {"name":"pe","category":"Required","type":"PrivateEndpoint","destination":{"serviceResourceId":"x"}}
        ]"#;
        let got = import(rules, "rules.json", None).unwrap();
        assert_eq!(got.rules.len(), 2);
        assert_eq!(got.rules[1].ports.to_string(), "80,8080-8089");
        assert_eq!(got.not_enforced.len(), 1);
        let broken = r#"[{"name":"x","type":"FQDN"}]"#;
        let e = import(broken, "b.json", None).unwrap_err();
        assert_eq!(e.path, "$[0].destination");
        let e = import(
            r#"{"value":[{"properties":{"endpoints":[{"domainName":7}]}}]}"#,
            "c.json",
            None,
        )
        .unwrap_err();
        assert_eq!(e.path, "$.value[0].properties.endpoints[0].domainName");
    }
}
