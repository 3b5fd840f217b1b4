//! JSON Schemas (draft 2020-12) of the wire contract, generated from the Rust types.
//!
//! The command and event enums derive `schemars::JsonSchema`; this module splits them into one
//! schema per command body and per event payload, so a client in any language can validate what
//! it sends and decode what it reads. `just schemas` writes them to `schemas/`, and a test fails
//! when the committed files differ from what the types generate.

use crate::aggregate::Aggregate;
use crate::command::{Accepted, Failure};
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

const DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";

/// The `$id` of a jetfn schema: `urn:jetfn:<path>` (stable names, not fetchable URLs).
pub fn schema_id(path: &str) -> String {
    format!("urn:jetfn:{path}")
}

/// One schema per command of `A`, by command name: the schema of its request body.
pub fn command_schemas<A: Aggregate>() -> BTreeMap<String, Value>
where
    A::Command: JsonSchema,
{
    split_variants(
        schemars::schema_for!(A::Command).to_value(),
        &format!("{}:command", A::NAME),
        &format!(
            "The body of command `{{name}}` on `cmd.{}.<id>.{{name}}`.",
            A::NAME
        ),
    )
}

/// One schema per command of atomic decision `D`, by command name: the schema of its body.
pub fn decision_command_schemas<D: crate::decision::Decision>() -> BTreeMap<String, Value> {
    split_variants(
        schemars::schema_for!(D::Command).to_value(),
        &format!("{}:command", D::NAME),
        &format!(
            "The body of command `{{name}}` on `cmd.{}.<id>.{{name}}` (an atomic decision).",
            D::NAME
        ),
    )
}

/// One schema per event type of `A`: the schema of its stored JSON payload.
pub fn event_schemas<A: Aggregate>() -> BTreeMap<String, Value>
where
    A::Event: JsonSchema,
{
    split_variants(
        schemars::schema_for!(A::Event).to_value(),
        &format!("{}:event", A::NAME),
        "The payload of event `{name}` (header `ce-type`).",
    )
}

/// One schema per event type of process manager `P`'s instances (on `pm.<name>.<id>`).
pub fn process_event_schemas<P: crate::process::ProcessManager>() -> BTreeMap<String, Value> {
    split_variants(
        schemars::schema_for!(P::Event).to_value(),
        &format!("pm.{}:event", P::NAME),
        "The payload of process manager event `{name}` (header `ce-type`).",
    )
}

/// The reply envelope of every command function.
pub fn reply_schema() -> Value {
    // Registers Accepted, Failure and ErrorKind (with its codes) under $defs.
    let mut generator = SchemaGenerator::default();
    generator.subschema_for::<Accepted>();
    generator.subschema_for::<Failure>();
    let defs: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    json!({
        "$schema": DRAFT,
        "$id": schema_id("reply"),
        "title": "Command reply",
        "description": "The reply to every command: `ok: true` with the aggregate's new version and the stream sequence (a consistency token), or `ok: false` with an error whose kind and code also travel in the Nats-Service-Error-Code and Nats-Service-Error headers.",
        "oneOf": [
            {
                "title": "Accepted",
                "allOf": [{"$ref": "#/$defs/Accepted"}],
                "properties": {"ok": {"const": true}},
                "required": ["ok"]
            },
            {
                "title": "Failed",
                "type": "object",
                "properties": {
                    "ok": {"const": false},
                    "error": {"$ref": "#/$defs/Failure"}
                },
                "required": ["ok", "error"],
                "additionalProperties": false
            }
        ],
        "$defs": defs,
    })
}

/// A standalone schema of any type, e.g. a read-model record, with `$id` and title.
pub fn schema_of<T: JsonSchema>(path: &str, title: &str) -> Value {
    let mut schema = schemars::schema_for!(T).to_value();
    if let Value::Object(map) = &mut schema {
        map.insert("$id".into(), schema_id(path).into());
        map.insert("title".into(), title.into());
    }
    schema
}

/// Splits an externally tagged enum's schema (`oneOf` of `{variant: fields}`) into one document
/// per variant, each carrying the shared `$defs`.
fn split_variants(
    enum_schema: Value,
    id_prefix: &str,
    description: &str,
) -> BTreeMap<String, Value> {
    let defs = enum_schema.get("$defs").cloned();
    let variants = enum_schema
        .get("oneOf")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut schemas = BTreeMap::new();
    for variant in variants {
        for (name, mut body, doc) in variant_bodies(&variant) {
            if let Value::Object(map) = &mut body {
                let mut document = Map::new();
                document.insert("$schema".into(), DRAFT.into());
                document.insert(
                    "$id".into(),
                    schema_id(&format!("{id_prefix}:{name}")).into(),
                );
                document.insert("title".into(), name.clone().into());
                let described = description.replace("{name}", &name);
                let text = match doc {
                    Some(doc) => format!("{doc}\n\n{described}"),
                    None => described,
                };
                document.insert("description".into(), text.into());
                document.append(map);
                if let Some(defs) = &defs {
                    document.insert("$defs".into(), defs.clone());
                }
                schemas.insert(name, Value::Object(document));
            }
        }
    }
    schemas
}

/// (name, body schema, description) of one `oneOf` entry: `{properties: {name: body}}` for struct
/// variants, `{enum: [names]}` for unit variants (whose body is an empty object).
fn variant_bodies(variant: &Value) -> Vec<(String, Value, Option<String>)> {
    let doc = variant
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(properties) = variant.get("properties").and_then(Value::as_object) {
        return properties
            .iter()
            .map(|(name, body)| (name.clone(), body.clone(), doc.clone()))
            .collect();
    }
    let names = variant
        .get("enum")
        .and_then(Value::as_array)
        .cloned()
        .or_else(|| variant.get("const").map(|c| vec![c.clone()]))
        .unwrap_or_default();
    names
        .iter()
        .filter_map(Value::as_str)
        .map(|name| {
            let empty = json!({"type": "object", "additionalProperties": false});
            (name.to_owned(), empty, doc.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Default)]
    struct Lamp;

    /// Lamp commands.
    #[derive(Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    #[allow(dead_code)]
    enum Command {
        /// Turns it on at a brightness.
        TurnOn {
            /// Percent.
            #[schemars(range(min = 1, max = 100))]
            brightness: u8,
        },
        TurnOff,
    }

    #[derive(Serialize, Deserialize, JsonSchema)]
    enum Event {
        TurnedOn { brightness: u8 },
        TurnedOff {},
    }

    impl Aggregate for Lamp {
        const NAME: &'static str = "lamp";
        type Command = Command;
        type Event = Event;
        fn decide(&self, _: Command) -> Result<Vec<Event>, crate::Rejection> {
            Ok(vec![])
        }
        fn evolve(self, _: &Event) -> Self {
            self
        }
    }

    #[test]
    fn each_command_gets_a_body_schema_with_id_title_and_description() {
        let schemas = command_schemas::<Lamp>();
        assert_eq!(schemas.keys().collect::<Vec<_>>(), ["turn_off", "turn_on"]);
        let on = &schemas["turn_on"];
        assert_eq!(on["$id"], "urn:jetfn:lamp:command:turn_on");
        assert_eq!(on["title"], "turn_on");
        assert_eq!(on["type"], "object");
        assert_eq!(on["additionalProperties"], false);
        assert_eq!(on["properties"]["brightness"]["maximum"], 100);
        assert!(
            on["description"]
                .as_str()
                .unwrap()
                .starts_with("Turns it on")
        );
        assert_eq!(schemas["turn_off"]["additionalProperties"], false);
    }

    #[test]
    fn each_event_gets_a_payload_schema() {
        let schemas = event_schemas::<Lamp>();
        assert_eq!(
            schemas.keys().collect::<Vec<_>>(),
            ["TurnedOff", "TurnedOn"]
        );
        assert_eq!(schemas["TurnedOn"]["$id"], "urn:jetfn:lamp:event:TurnedOn");
    }

    #[test]
    fn the_reply_schema_covers_success_and_failure() {
        let schema = reply_schema();
        assert_eq!(schema["oneOf"].as_array().unwrap().len(), 2);
        assert!(schema["$defs"]["Accepted"]["properties"]["seq"].is_object());
        assert!(schema["$defs"]["Failure"]["properties"]["kind"].is_object());
    }
}
