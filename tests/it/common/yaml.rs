//! Reading the repository's YAML files (compose, Kubernetes, Prometheus) in
//! tests that check them against the service. Shared by the `compose`
//! and `deploy` modules.
#![allow(dead_code)]

use std::path::PathBuf;

use yaml_rust2::{Yaml, YamlLoader};

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every document of a YAML file under the root.
pub fn load_all(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A scalar as the text a program would read from it.
pub fn str_of(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Real(r) => r.clone(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}
