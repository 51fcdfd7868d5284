//! The OpenAPI documents as committed and served: poem-openapi's output,
//! with every optional property marked `nullable`.
//!
//! poem-openapi reads an optional field sent as `null` as absent, but its
//! schemas say nothing about `null`, so a client or fuzzer reading the spec
//! expected `"created_after": null` to be refused while the server took it.
//! The server's reading is the useful one (clients that serialize `None` as
//! `null` work), so the spec now says it: an optional property accepts
//! `null`, which means "not given". Required properties and `$ref`s are left
//! as they are.
use poem::http::header;
use poem::{IntoResponse, Response};
use serde_json::Value;

/// `spec` with its optional properties marked nullable; `spec` itself if it
/// is not JSON (never the case for poem-openapi's output).
pub fn with_nullable_optionals(spec: &str) -> String {
    let Ok(mut doc) = serde_json::from_str::<Value>(spec) else {
        return spec.to_string();
    };
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for schema in schemas.values_mut() {
            mark(schema);
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| spec.to_string())
}

fn mark(schema: &mut Value) {
    let required: Vec<String> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (name, prop) in props.iter_mut() {
        if required.contains(name) {
            continue;
        }
        if let Some(obj) = prop.as_object_mut()
            && obj.contains_key("type")
        {
            obj.insert("nullable".into(), Value::Bool(true));
        }
    }
}

/// The `/openapi.json` response for a document.
pub fn serve(doc: &'static str) -> Response {
    doc.with_content_type("application/json; charset=utf-8")
        .with_header(header::CACHE_CONTROL, "no-cache")
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_properties_become_nullable() {
        let spec = r##"{"components":{"schemas":{"F":{"type":"object","required":["a"],
            "properties":{"a":{"type":"string"},"b":{"type":"string"},"c":{"$ref":"#/x"}}}}}}"##;
        let out: Value = serde_json::from_str(&with_nullable_optionals(spec)).unwrap_or_default();
        let props = &out["components"]["schemas"]["F"]["properties"];
        assert_eq!(props["a"].get("nullable"), None);
        assert_eq!(props["b"]["nullable"], true);
        assert_eq!(props["c"].get("nullable"), None);
    }
}
