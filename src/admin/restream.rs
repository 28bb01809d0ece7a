//! The admin API's restream endpoints: `GET /api/v1/restream` (every destination),
//! `POST /api/v1/restream` (add one for a stream) and `DELETE /api/v1/restream/{id}`.
//!
//! The POST is the only admin request with a body: it is read here, before routing,
//! bounded by [`MAX_BODY`] and [`super::HEAD_TIMEOUT`], and only once the token checked out
//! (an unauthorized client gets its 401 without a byte of its body being read).
//! No answer ever repeats the URL given: it holds the destination's stream key.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, LOCATION};
use hyper::{Request, StatusCode};
use serde_json::{json, Value};

use super::{error, json as reply_json, Reply, State};
use crate::engine::restream::AddError;

/// Largest `POST /api/v1/restream` body (an app, a stream name and a URL fit many times).
pub const MAX_BODY: usize = 8 * 1024;

/// The fields a POST body has.
const FIELDS: &str = r#"{"app": "live", "stream": "NAME", "url": "rtmp[s]://HOST[:PORT]/APP/KEY"}"#;

/// The engine, or why this gateway cannot take API destinations (answered with 409).
fn engine_or_refusal(
    state: &State,
) -> Result<&std::sync::Arc<crate::engine::Engine>, &'static str> {
    let Some(engine) = &state.engine else {
        return Err("restream needs the built-in engine; this gateway relays to an upstream");
    };
    if engine.edge().is_some() {
        return Err("this node is an edge: its publishers are forwarded to their origin and nothing is pushed from here; add the destination on the origin");
    }
    Ok(engine)
}

/// `GET /api/v1/restream`.
pub fn list(state: &State) -> Reply {
    let api = state.engine.as_ref().map(|e| e.api_pushes().as_ref());
    reply_json(StatusCode::OK, &crate::engine::restream::snapshot(api))
}

/// `POST /api/v1/restream` (the caller checked the token).
pub async fn add(req: Request<Incoming>, state: &State, peer: SocketAddr) -> Reply {
    let engine = match engine_or_refusal(state) {
        Ok(e) => e,
        Err(why) => return error(StatusCode::CONFLICT, why),
    };
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(super::HEAD_TIMEOUT, body).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body is larger than {MAX_BODY} bytes; send {FIELDS}"),
            )
        }
        Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "reading the body failed"),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the body did not arrive within {} s",
                    super::HEAD_TIMEOUT.as_secs()
                ),
            )
        }
    };
    let fields = match parse(&body, engine.limits().max_name_len) {
        Ok(f) => f,
        Err((status, why)) => return error(status, &why),
    };
    let (app, stream, url) = fields;
    match engine
        .api_pushes()
        .add(&app, &stream, &url, &peer.to_string())
    {
        Ok(v) => {
            let mut r = reply_json(StatusCode::CREATED, &v);
            let at = v
                .get("id")
                .and_then(Value::as_u64)
                .map(|id| format!("/api/v1/restream/{id}"));
            if let Some(at) = at.and_then(|a| HeaderValue::from_str(&a).ok()) {
                r.headers_mut().insert(LOCATION, at);
            }
            r
        }
        Err(e @ AddError::Invalid(_)) => error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
        Err(e @ (AddError::Full(_) | AddError::Duplicate(_))) => {
            error(StatusCode::CONFLICT, &e.to_string())
        }
    }
}

/// The body's app, stream and url, or the status and what to fix (never the values given:
/// the url holds a key, and a misplaced key could be in any field).
fn parse(body: &[u8], max_name: usize) -> Result<(String, String, String), (StatusCode, String)> {
    let unprocessable = |why: String| (StatusCode::UNPROCESSABLE_ENTITY, why);
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            // Line and column only: serde's own text may quote the input.
            format!(
                "the body is not JSON (line {}, column {}); send {FIELDS}",
                e.line(),
                e.column()
            ),
        )
    })?;
    let Some(obj) = v.as_object() else {
        return Err(unprocessable(format!(
            "the body must be a JSON object: {FIELDS}"
        )));
    };
    if obj
        .keys()
        .any(|k| !matches!(k.as_str(), "app" | "stream" | "url"))
    {
        return Err(unprocessable(format!(
            "unknown field in the body; the fields are app, stream and url: {FIELDS}"
        )));
    }
    let field = |name: &str| -> Result<String, (StatusCode, String)> {
        match obj.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(unprocessable(format!(
                "`{name}` must be a string: {FIELDS}"
            ))),
            None => Err(unprocessable(format!("`{name}` is missing: {FIELDS}"))),
        }
    };
    let (app, stream, url) = (field("app")?, field("stream")?, field("url")?);
    for (name, value) in [("app", &app), ("stream", &stream)] {
        if value.is_empty() {
            return Err(unprocessable(format!("`{name}` is empty")));
        }
        if value.len() > max_name {
            return Err(unprocessable(format!(
                "`{name}` is longer than {max_name} bytes (limits.max_name_len)"
            )));
        }
        if value.chars().any(char::is_control) {
            return Err(unprocessable(format!("`{name}` holds a control character")));
        }
    }
    if app.contains('*') {
        return Err(unprocessable(
            "`app` is one app's exact name; globs are for [[engine.push]] in the configuration file"
                .into(),
        ));
    }
    if url.len() > MAX_BODY {
        return Err(unprocessable(format!(
            "`url` is longer than {MAX_BODY} bytes"
        )));
    }
    Ok((app, stream, url))
}

/// `DELETE /api/v1/restream/{id}`.
pub fn remove(state: &State, id: &str, peer: SocketAddr) -> Reply {
    let engine = match engine_or_refusal(state) {
        Ok(e) => e,
        Err(why) => return error(StatusCode::CONFLICT, why),
    };
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "the destination id is a number, as POST /api/v1/restream answered and GET /api/v1/restream lists",
        );
    };
    match engine.api_pushes().remove(id, &peer.to_string()) {
        Some(v) => reply_json(StatusCode::OK, &v),
        None => reply_json(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no destination {id} added through the API (configured ones are removed from the configuration file)")}),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked_and_never_echoed() {
        let ok = parse(
            br#"{"app":"live","stream":"cam1","url":"rtmp://h/app/KEY"}"#,
            64,
        )
        .unwrap();
        assert_eq!(
            ok,
            ("live".into(), "cam1".into(), "rtmp://h/app/KEY".into())
        );
        for (body, status) in [
            (&br#"{"app":"live","stream":"cam1","url":"rtmp://h/app/SECRET""#[..], 400),
            (br#"["SECRET"]"#, 422),
            (br#"{"app":"live","stream":"cam1","url":"x","SECRET":1}"#, 422),
            (br#"{"app":"live","stream":"cam1","url":["SECRET"]}"#, 422),
            (br#"{"app":"live","stream":"SECRET"}"#, 422),
            (br#"{"app":"","stream":"cam1","url":"rtmp://h/a/SECRET"}"#, 422),
            (br#"{"app":"li*","stream":"cam1","url":"rtmp://h/a/SECRET"}"#, 422),
            (br#"{"app":"live","stream":"c\nSECRET","url":"rtmp://h/a/SECRET"}"#, 422),
            (br#"{"app":"live","stream":"SECRETSECRETSECRETSECRETSECRETSECRETSECRETSECRETSECRETSECRET1234567","url":"rtmp://h/a/SECRET"}"#, 422),
        ] {
            let (s, why) = parse(body, 64).expect_err(std::str::from_utf8(body).unwrap());
            assert_eq!(s.as_u16(), status, "{why}");
            assert!(!why.contains("SECRET"), "{why}");
        }
    }
}
