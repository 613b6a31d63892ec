//! The embedded catalog covers the article: every host, service tag and port of every table,
//! in each of the three clouds, and both revisions load.

mod support;

use aml_egress::catalog::{Catalog, Cloud, EntryKind, REVISIONS, port_set, regions};
use aml_egress::policy::PathView;
use support::TempFile;

fn has(c: &Catalog, cloud: Cloud, pattern: &str, port: u16) -> bool {
    c.entries.iter().any(|e| {
        e.clouds.contains(&cloud)
            && e.patterns.iter().any(|p| p == pattern)
            && port_set(&e.ports).unwrap().contains(port)
    })
}

fn missing(c: &Catalog, cloud: Cloud, want: &[(&str, u16)]) -> Vec<String> {
    want.iter()
        .filter(|(p, port)| !has(c, cloud, p, *port))
        .map(|(p, port)| format!("{cloud} {p}:{port}"))
        .collect()
}

#[test]
fn every_embedded_revision_loads() {
    for (rev, _) in REVISIONS {
        let c = Catalog::embedded(rev).unwrap();
        assert_eq!(c.revision, *rev);
        assert!(c.entries.len() > 50);
        for cloud in Cloud::ALL {
            assert!(
                c.entries.iter().any(|e| e.clouds.contains(&cloud)),
                "{rev} {cloud}"
            );
        }
    }
}

#[test]
fn the_2021_11_catalog_holds_every_host_and_port_of_the_article() {
    let c = Catalog::embedded("2021-11").unwrap();
    let shared: &[(&str, u16)] = &[
        ("graph.windows.net", 443),
        ("anaconda.com", 443),
        ("*.anaconda.com", 443),
        ("*.anaconda.org", 443),
        ("pypi.org", 443),
        ("*.pythonhosted.org", 443),
        ("cloud.r-project.org", 443),
        ("*pytorch.org", 443),
        ("*.tensorflow.org", 443),
        ("update.code.visualstudio.com", 443),
        ("*.vo.msecnd.net", 443),
        (
            "raw.githubusercontent.com/microsoft/vscode-tools-for-ai/master/azureml_remote_websocket_server/*",
            443,
        ),
        ("dc.applicationinsights.azure.com", 443),
        ("dc.applicationinsights.microsoft.com", 443),
        ("dc.services.visualstudio.com", 443),
        ("mcr.microsoft.com", 443),
        ("viennaglobal.azurecr.io", 443),
        ("*.aznbcontent.net", 443),
        ("*.instances.azureml.ms", 443),
        ("*.instances.azureml.ms", 8787),
        ("*.instances.azureml.ms", 18881),
        ("*.data.mcr.microsoft.com", 443),
        ("quay.io", 443),
        ("*.quay.io", 443),
        ("gcr.io", 443),
        ("storage.googleapis.com", 443),
        ("registry-1.docker.io", 443),
        ("production.cloudflare.docker.com", 443),
        ("auth.docker.io", 443),
        ("*.kusto.windows.net", 443),
        ("archive.ubuntu.com", 80),
        ("security.ubuntu.com", 80),
        ("ppa.launchpad.net", 80),
        ("*.azurecr.io", 443),
        ("*.workspace.<region>.api.azureml.ms", 443),
        ("<region>.experiments.azureml.net", 443),
        ("<region>.api.azureml.ms", 443),
    ];
    let public: &[(&str, u16)] = &[
        ("login.microsoftonline.com", 80),
        ("login.microsoftonline.com", 443),
        ("management.azure.com", 443),
        ("ml.azure.com", 443),
        ("*.azureml.ms", 443),
        ("*.notebooks.azure.net", 443),
        ("<storage>.file.core.windows.net", 445),
        ("<storage>.dfs.core.windows.net", 443),
        ("<storage>.blob.core.windows.net", 443),
        ("graph.microsoft.com", 443),
        ("*.instances.azureml.net", 443),
        ("*.blob.core.windows.net", 443),
        ("*.table.core.windows.net", 443),
        ("*.queue.core.windows.net", 443),
        ("*.vault.azure.net", 443),
    ];
    let usgov: &[(&str, u16)] = &[
        ("login.microsoftonline.us", 443),
        ("management.azure.us", 443),
        ("management.usgovcloudapi.net", 443),
        ("ml.azure.us", 443),
        ("*.ml.azure.us", 443),
        ("*.notebooks.usgovcloudapi.net", 443),
        ("<storage>.file.core.usgovcloudapi.net", 445),
        ("<storage>.dfs.core.usgovcloudapi.net", 443),
        ("<storage>.blob.core.usgovcloudapi.net", 443),
        ("graph.microsoft.us", 443),
        ("*.instances.azureml.us", 443),
        ("*.blob.core.usgovcloudapi.net", 443),
        ("*.table.core.usgovcloudapi.net", 443),
        ("*.queue.core.usgovcloudapi.net", 443),
        ("*.vault.usgovcloudapi.net", 443),
    ];
    let china: &[(&str, u16)] = &[
        ("login.chinacloudapi.cn", 80),
        ("management.azure.cn", 443),
        ("management.chinacloudapi.cn", 443),
        ("studio.ml.azure.cn", 443),
        ("*.ml.azure.cn", 443),
        ("*.notebooks.chinacloudapi.cn", 443),
        ("<storage>.file.core.chinacloudapi.cn", 445),
        ("<storage>.dfs.core.chinacloudapi.cn", 443),
        ("<storage>.blob.core.chinacloudapi.cn", 443),
        ("graph.chinacloudapi.cn", 443),
        ("*.instances.azureml.cn", 443),
        ("*blob.core.chinacloudapi.cn", 443),
        ("*.table.core.chinacloudapi.cn", 443),
        ("*.queue.core.chinacloudapi.cn", 443),
        ("*.vault.azure.cn", 443),
    ];
    let mut gaps = Vec::new();
    for (cloud, own) in [
        (Cloud::Public, public),
        (Cloud::Usgov, usgov),
        (Cloud::China, china),
    ] {
        gaps.extend(missing(&c, cloud, shared));
        gaps.extend(missing(&c, cloud, own));
    }
    assert!(
        gaps.is_empty(),
        "missing from the 2021-11 catalog: {gaps:#?}"
    );
}

#[test]
fn service_tags_keep_their_ports_and_front_door_is_not_in_china() {
    let c = Catalog::embedded("2021-11").unwrap();
    let tags: &[(&str, u16)] = &[
        ("AzureActiveDirectory", 80),
        ("AzureActiveDirectory", 443),
        ("AzureMachineLearning", 443),
        ("AzureResourceManager", 443),
        ("Storage.<region>", 443),
        ("ContainerRegistry.<region>", 443),
        ("MicrosoftContainerRegistry.<region>", 443),
        ("Keyvault.<region>", 443),
        ("BatchNodeManagement", 29876),
        ("BatchNodeManagement", 29877),
        ("AzureMachineLearning", 44224),
    ];
    for cloud in Cloud::ALL {
        let gaps = missing(&c, cloud, tags);
        assert!(gaps.is_empty(), "{gaps:?}");
    }
    assert!(has(&c, Cloud::Public, "AzureFrontDoor.FrontEnd", 443));
    assert!(!has(&c, Cloud::China, "AzureFrontDoor.FrontEnd", 443));
    assert!(
        c.entries
            .iter()
            .filter(|e| e.patterns.iter().any(|p| p.starts_with("Storage.")))
            .all(|e| e.kind == EntryKind::ServiceTag)
    );
}

#[test]
fn the_2026_03_catalog_carries_the_newest_changes() {
    let c = Catalog::embedded("2026-03").unwrap();
    let want: &[(&str, u16)] = &[
        ("pytorch.org", 443),
        ("*.pytorch.org", 443),
        ("*.azureml.net", 443),
        ("*.modelmanagement.azureml.net", 443),
        ("*.<region>.batch.azure.com", 443),
        ("*.<region>.service.batch.azure.com", 443),
        ("*.data.mcr.microsoft.com", 443),
        ("ghcr.io", 443),
        ("pkg-containers.githubusercontent.com", 443),
        ("*.vscode.dev", 443),
        ("marketplace.visualstudio.com", 443),
        ("<acr>.azurecr.io", 443),
    ];
    let gaps = missing(&c, Cloud::Public, want);
    assert!(gaps.is_empty(), "{gaps:?}");
    assert!(!has(&c, Cloud::Public, "*pytorch.org", 443));
    assert!(!has(&c, Cloud::Public, "viennaglobal.azurecr.io", 443));
    assert!(has(&c, Cloud::China, "*.blob.core.chinacloudapi.cn", 443));
    assert!(!has(&c, Cloud::China, "*blob.core.chinacloudapi.cn", 443));
}

#[test]
fn region_lists_cover_each_cloud() {
    assert!(regions(Cloud::Public).iter().any(|r| r == "westus"));
    assert!(regions(Cloud::Public).iter().any(|r| r == "westeurope"));
    assert!(regions(Cloud::Usgov).iter().any(|r| r == "usgovvirginia"));
    assert!(regions(Cloud::China).iter().any(|r| r == "chinaeast2"));
}

/// A small Service Tags file in the real format (the weekly download's shape).
fn service_tags(cloud: &str) -> TempFile {
    TempFile::new(
        "ServiceTags.json",
        &format!(
            r#"{{"changeNumber":3,"cloud":"{cloud}","values":[
  {{"name":"Storage.WestEurope","id":"Storage.WestEurope","properties":{{"changeNumber":1,"region":"westeurope","regionId":18,"platform":"Azure","systemService":"AzureStorage","addressPrefixes":["20.38.108.0/23","2603:1020:206::/48"],"networkFeatures":["API","NSG"]}}}},
  {{"name":"AzureActiveDirectory","id":"AzureActiveDirectory","properties":{{"region":"","addressPrefixes":["20.190.128.0/18"],"networkFeatures":null}}}}
]}}"#
        ),
    )
}

#[test]
fn service_tags_become_cidr_rules_that_apply_to_addresses_only() {
    let tags = service_tags("Public");
    let b = support::built(&format!(
        "[catalog]\ncloud = \"public\"\nregion = \"westeurope\"\nservice_tags_file = {:?}\n",
        tags.0
    ));
    let check = |t: &str| {
        let d = b.policy.decide_str(t, PathView::Hidden);
        (d.is_allowed(), b.policy.explain(t, &d))
    };
    // On a TLS port an address carries no server name: the tag's prefix alone does not
    // allow it (catalog.service_tags_nameless_tls = "deny", the default).
    let (ok, why) = check("20.38.109.7:443");
    assert!(!ok, "{why}");
    let d = b.policy.decide_str("20.38.109.7:443", PathView::Hidden);
    assert_eq!(d.reason.code().as_str(), "service_tag_without_name");
    assert!(
        why.contains("Storage.WestEurope") && why.contains("service_tags_nameless_tls"),
        "{why}"
    );
    assert!(!check("[2603:1020:206::5]:443").0);
    // Other ports stay allowed by the tag.
    assert!(check("20.190.130.1:80").0, "AzureActiveDirectory on 80");
    assert!(!check("20.38.109.7:80").0, "Storage is 443 only");
    assert!(!check("20.38.110.7:443").0, "outside the tag");
    // A tag the file lacks is a warning that names it.
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("AzureResourceManager")
                && w.contains("not in the Service Tags file")),
        "{:?}",
        b.warnings
    );
    // "allow" restores the tag's allow on TLS ports; an operator CIDR rule allows in
    // either setting.
    let open = support::built(&format!(
        "[catalog]\ncloud = \"public\"\nregion = \"westeurope\"\nservice_tags_file = {:?}\nservice_tags_nameless_tls = \"allow\"\n",
        tags.0
    ));
    let d = open.policy.decide_str("20.38.109.7:443", PathView::Hidden);
    let why = open.policy.explain("20.38.109.7:443", &d);
    assert!(d.is_allowed(), "{why}");
    assert!(why.contains("service tag Storage.WestEurope"), "{why}");
    let own = support::built(&format!(
        "[catalog]\ncloud = \"public\"\nregion = \"westeurope\"\nservice_tags_file = {:?}\n\n[[allow]]\ncidr = \"20.38.109.0/24\"\nports = [443]\n",
        tags.0
    ));
    assert!(
        own.policy
            .decide_str("20.38.109.7:443", PathView::Hidden)
            .is_allowed()
    );
    let d = own.policy.decide_str("20.38.108.7:443", PathView::Hidden);
    assert_eq!(d.reason.code().as_str(), "service_tag_without_name");
    let err = support::build_error(&format!(
        "[catalog]\ncloud = \"china\"\nservice_tags_file = {:?}\n",
        tags.0
    ));
    assert!(
        err.contains("catalog.service_tags_file") && err.contains("cloud"),
        "{err}"
    );
    let broken = TempFile::new("broken.json", "{\"cloud\": \"Public\", \"values\": [");
    let err = support::build_error(&format!("[catalog]\nservice_tags_file = {:?}\n", broken.0));
    assert!(
        err.contains("broken.json") && err.contains("not a Service Tags file"),
        "{err}"
    );
}

#[test]
fn a_workspaces_own_dependencies_are_imported_with_their_source() {
    let deps = TempFile::new(
        "dependencies.json",
        r#"{"value":[{"id":"x","properties":{"category":"Azure Container Registry","endpoints":[{"domainName":"myacr.azurecr.io","endpointDetails":[{"port":443}],"extra":1}]}}]}"#,
    );
    let rules = TempFile::new(
        "outbound-rules.json",
        r#"[
  {"name":"pypi-mirror","category":"UserDefined","status":"Active","type":"FQDN","destination":"mirror.example.org"},
  {"name":"corp-range","category":"UserDefined","type":"service_tag","destination":{"addressPrefixes":["203.0.113.0/24"],"protocol":"TCP","portRanges":"80, 8080-8089"}},
  {"name":"pe","category":"Required","type":"PrivateEndpoint","destination":{"serviceResourceId":"/subscriptions/x","subresourceTarget":"blob"}}
]"#,
    );
    let b = support::built(&format!(
        "[catalog]\nimport = [{:?}, {:?}]\n",
        deps.0, rules.0
    ));
    let check = |t: &str| {
        let d = b.policy.decide_str(t, PathView::Hidden);
        (d.is_allowed(), b.policy.explain(t, &d))
    };
    let (ok, why) = check("myacr.azurecr.io:443");
    assert!(
        ok && why.contains("imported from") && why.contains("Azure Container Registry"),
        "{why}"
    );
    let (ok, why) = check("mirror.example.org:80");
    assert!(
        ok && why.contains("outbound rule pypi-mirror (UserDefined)"),
        "{why}"
    );
    assert!(check("203.0.113.7:8085").0);
    assert!(!check("203.0.113.7:8090").0);
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("outbound rule pe") && w.contains("not enforced")),
        "{:?}",
        b.warnings
    );
    let broken = TempFile::new(
        "broken-rules.json",
        r#"[{"name":"a","type":"FQDN","destination":"ok.example"},{"name":"b","type":"FQDN"}]"#,
    );
    let err = support::build_error(&format!("[catalog]\nimport = [{:?}]\n", broken.0));
    assert!(
        err.contains("catalog.import")
            && err.contains("broken-rules.json")
            && err.contains("$[1].destination"),
        "{err}"
    );
}
