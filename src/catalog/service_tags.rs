//! Microsoft's Service Tags files (the weekly `ServiceTags_<Cloud>_<date>.json` download, or
//! the discovery API's answer, which has the same shape): tag names to address prefixes,
//! IPv4 and IPv6.
//!
//! The article names some tags differently from the file (`Keyvault.<region>` is
//! `AzureKeyVault.<Region>`, `ContainerRegistry.<region>` is
//! `AzureContainerRegistry.<Region>`), and the file writes regions in PascalCase
//! (`Storage.WestUS2`) where configurations use lower case: names are compared without
//! case, through those aliases.

use std::collections::HashMap;

use ipnet::IpNet;
use serde::Deserialize;

use super::Cloud;

/// The tags of one Service Tags file.
#[derive(Debug, Clone, Default)]
pub struct ServiceTags {
    /// The file's `cloud` (`Public`, `AzureGovernment`, `China`).
    pub cloud: String,
    /// Lower-case tag name to the file's spelling and the prefixes.
    tags: HashMap<String, (String, Vec<IpNet>)>,
}

#[derive(Deserialize)]
struct File {
    cloud: String,
    values: Vec<Value>,
}

#[derive(Deserialize)]
struct Value {
    name: String,
    properties: Properties,
}

#[derive(Deserialize)]
struct Properties {
    #[serde(rename = "addressPrefixes", default)]
    address_prefixes: Vec<String>,
}

/// Why a Service Tags file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceTagsError {
    #[error("not a Service Tags file: {0}")]
    Json(#[from] serde_json::Error),
    #[error("tag {tag}: {prefix:?} is not an address prefix")]
    Prefix { tag: String, prefix: String },
    #[error("the file is for the {file} cloud, the configuration for {configured}")]
    Cloud { file: String, configured: Cloud },
}

impl ServiceTags {
    /// Parse a file's text and check that it is for `cloud`.
    pub fn parse(text: &str, cloud: Cloud) -> Result<Self, ServiceTagsError> {
        let file: File = serde_json::from_str(text)?;
        let expected = match cloud {
            Cloud::Public => "public",
            Cloud::Usgov => "azuregovernment",
            Cloud::China => "china",
        };
        let given = file.cloud.to_ascii_lowercase();
        if given != expected && !(cloud == Cloud::China && given == "azurechinacloud") {
            return Err(ServiceTagsError::Cloud {
                file: file.cloud,
                configured: cloud,
            });
        }
        let mut tags = HashMap::with_capacity(file.values.len());
        for v in file.values {
            let prefixes = v
                .properties
                .address_prefixes
                .iter()
                .map(|p| {
                    p.parse::<IpNet>()
                        .map(|n| n.trunc())
                        .map_err(|_| ServiceTagsError::Prefix {
                            tag: v.name.clone(),
                            prefix: p.clone(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            tags.insert(v.name.to_ascii_lowercase(), (v.name, prefixes));
        }
        Ok(ServiceTags {
            cloud: file.cloud,
            tags,
        })
    }

    /// The prefixes of a tag as the article names it, and the name the file uses.
    pub fn lookup(&self, article_name: &str) -> Option<(&str, &[IpNet])> {
        let lower = article_name.to_ascii_lowercase();
        let (base, region) = lower.split_once('.').unwrap_or((lower.as_str(), ""));
        let file_base = match base {
            "keyvault" => "azurekeyvault",
            "containerregistry" => "azurecontainerregistry",
            other => other,
        };
        let name = if region.is_empty() {
            file_base.to_owned()
        } else {
            format!("{file_base}.{region}")
        };
        self.tags
            .get(&name)
            .map(|(spelled, v)| (spelled.as_str(), v.as_slice()))
    }

    /// How many tags the file holds.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    /// Whether the file holds no tags.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{"changeNumber":1,"cloud":"Public","values":[
      {"name":"Storage.WestEurope","id":"Storage.WestEurope","properties":{"region":"westeurope","addressPrefixes":["20.38.108.0/23","2603:1020:206::/48"],"networkFeatures":null}},
      {"name":"AzureKeyVault.WestEurope","id":"AzureKeyVault.WestEurope","properties":{"addressPrefixes":["13.69.64.88/29"]}},
      {"name":"AzureFrontDoor.Frontend","id":"AzureFrontDoor.Frontend","properties":{"addressPrefixes":["13.107.246.0/24"]}}]}"#;

    #[test]
    fn names_match_without_case_and_through_the_articles_aliases() {
        let t = ServiceTags::parse(FILE, Cloud::Public).unwrap();
        assert_eq!(t.lookup("Storage.westeurope").unwrap().1.len(), 2);
        assert_eq!(
            t.lookup("Keyvault.westeurope").unwrap().0,
            "AzureKeyVault.WestEurope"
        );
        assert!(t.lookup("AzureFrontDoor.FrontEnd").is_some());
        assert!(t.lookup("Storage.westus").is_none());
    }

    #[test]
    fn the_wrong_cloud_and_bad_prefixes_are_errors() {
        assert!(matches!(
            ServiceTags::parse(FILE, Cloud::China),
            Err(ServiceTagsError::Cloud { .. })
        ));
        let bad = FILE.replace("13.69.64.88/29", "13.69.64.888/29");
        assert!(matches!(
            ServiceTags::parse(&bad, Cloud::Public),
            Err(ServiceTagsError::Prefix { .. })
        ));
        assert!(ServiceTags::parse("{", Cloud::Public).is_err());
    }
}
