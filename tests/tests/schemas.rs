//! The committed schemas are what the Rust types generate, and every one is self-describing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use jetfn_tests::schemas::{generated, json_files, schemas_dir};

#[test]
fn committed_schemas_match_the_rust_types() {
    let dir = schemas_dir();
    let generated = generated();
    for (path, text) in &generated {
        let committed = std::fs::read_to_string(dir.join(path)).unwrap_or_default();
        assert!(
            committed == *text,
            "schemas/{} differs from what the types generate: run `just schemas` and commit",
            path.display()
        );
    }
    let expected: Vec<_> = generated.iter().map(|(path, _)| dir.join(path)).collect();
    for file in json_files(&dir).unwrap() {
        assert!(
            expected.contains(&file),
            "{} is stale: run `just schemas`",
            file.display()
        );
    }
}

#[test]
fn every_schema_has_an_id_a_title_and_descriptions() {
    for (path, text) in generated() {
        let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{path:?}"
        );
        assert!(
            schema["$id"]
                .as_str()
                .is_some_and(|id| id.starts_with("urn:jetfn:")),
            "{path:?}"
        );
        assert!(schema["title"].is_string(), "{path:?}");
        assert!(schema["description"].is_string(), "{path:?}");
    }
}

#[test]
fn command_schemas_state_the_account_rules() {
    let files = generated();
    let deposit = files
        .iter()
        .find(|(p, _)| p.ends_with("commands/deposit.json"))
        .unwrap();
    let deposit: serde_json::Value = serde_json::from_str(&deposit.1).unwrap();
    assert_eq!(deposit["required"], serde_json::json!(["amount"]));
    assert_eq!(deposit["additionalProperties"], false);
    assert_eq!(deposit["$defs"]["Amount"]["minimum"], 1);
    let open = files
        .iter()
        .find(|(p, _)| p.ends_with("commands/open.json"))
        .unwrap();
    let open: serde_json::Value = serde_json::from_str(&open.1).unwrap();
    assert_eq!(open["$defs"]["Owner"]["maxLength"], 200);
}
