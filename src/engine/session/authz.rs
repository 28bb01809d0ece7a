//! The engine session's side of [`crate::auth`]: connect, publish and play are decided
//! before they are served.
//!
//! Rules that need no I/O (addresses, keys, tokens) are decided inline. A callback is
//! waited for by this session's task alone: the command is held, the session decodes no
//! more of the client's messages until the decision (bounded by the callback timeout),
//! and every other session carries on. A denial sends the client the protocol's status
//! (`_error` NetConnection.Connect.Rejected, `onStatus` NetStream.Publish.BadName or
//! NetStream.Play.Failed) and closes the connection once it is written.

use std::net::{IpAddr, Ipv4Addr};

use super::{cmd, Amf0Value, Session, SessionError, CSID_COMMAND};
use crate::auth::{Action, AuthRequest, Decision};
use crate::rtmp::message;

/// A command waiting for its decision.
enum Held {
    Connect { txn: f64, object: Amf0Value },
    Stream { stream_id: u32, raw: String },
}

pub(super) struct AuthState {
    /// The client's address.
    pub(super) peer: IpAddr,
    /// connect's fields: each publish and play request starts from them.
    base: Option<AuthRequest>,
    held: Option<(Held, AuthRequest)>,
    /// The publish and play in progress, for their `on_done` notice.
    publish_done: Option<AuthRequest>,
    play_done: Option<AuthRequest>,
}

impl Default for AuthState {
    fn default() -> Self {
        AuthState {
            peer: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            base: None,
            held: None,
            publish_done: None,
            play_done: None,
        }
    }
}

impl AuthState {
    /// A decision is being waited for: decode nothing more until it comes.
    pub(super) fn waiting(&self) -> bool {
        self.held.is_some()
    }
}

impl Session {
    /// `connect`, through `[auth]` when it is configured.
    pub(super) fn authorize_connect(
        &mut self,
        txn: f64,
        object: Option<&Amf0Value>,
    ) -> Result<(), SessionError> {
        let Some(auth) = self.engine.config().auth.clone() else {
            return self.on_connect(txn, object);
        };
        let max = self.engine.limits().max_name_len;
        let raw_app = object
            .and_then(|o| o.get("app"))
            .and_then(Amf0Value::as_str)
            .unwrap_or_default();
        // A name the engine refuses anyway is refused without asking (or holding) anything.
        let Some(app) = cmd::clean_name(raw_app, max) else {
            return self.on_connect(txn, object);
        };
        let req = AuthRequest::connect_bounded(self.authz.peer, self.id, object, max);
        // What on_connect reads (the app without its query, which may be long), not the
        // client's whole object: a held connect keeps at most a few times max_name_len.
        let mut kept = vec![("app", Amf0Value::string(app))];
        if let Some(enc) = object.and_then(|o| o.get("objectEncoding")).cloned() {
            kept.push(("objectEncoding", enc));
        }
        let held = Held::Connect {
            txn,
            object: Amf0Value::object(kept),
        };
        self.authz.base = Some(req.clone());
        if auth.needs_callback(Action::Connect, &req.app) {
            self.authz.held = Some((held, req));
            return Ok(());
        }
        let d = auth.decide_local(&req);
        self.decided(held, req, d)
    }

    /// `publish` or `play` of `raw` (the name with its query), through `[auth]`.
    pub(super) fn authorize_stream(
        &mut self,
        action: Action,
        stream_id: u32,
        raw: &str,
    ) -> Result<(), SessionError> {
        let auth = self.engine.config().auth.clone();
        // Without auth, or before a connect (which the command then refuses), as before.
        let (Some(auth), Some(base)) = (auth, &self.authz.base) else {
            self.serve_stream(action, stream_id, raw, None);
            return Ok(());
        };
        // As for connect: a refused name is refused at once, a held one is kept without its
        // query.
        let max = self.engine.limits().max_name_len;
        let Some(name) = cmd::clean_name(raw, max) else {
            self.serve_stream(action, stream_id, raw, None);
            return Ok(());
        };
        let req = base.for_stream(action, raw);
        let held = Held::Stream {
            stream_id,
            raw: name,
        };
        if auth.needs_callback(action, &req.app) {
            self.authz.held = Some((held, req));
            return Ok(());
        }
        let d = auth.decide_local(&req);
        self.decided(held, req, d)
    }

    /// Waits for the held command's callback and acts on the answer.
    pub(super) async fn await_decision(&mut self) -> Result<(), SessionError> {
        let Some((held, req)) = self.authz.held.take() else {
            return Ok(());
        };
        let d = match self.engine.config().auth.clone() {
            Some(auth) => auth.authorize(&req).await,
            None => Decision::Allow,
        };
        self.decided(held, req, d)
    }

    fn decided(&mut self, held: Held, req: AuthRequest, d: Decision) -> Result<(), SessionError> {
        let reason = match (&held, d) {
            (Held::Connect { txn, object }, Decision::Allow | Decision::Rename(_)) => {
                return self.on_connect(*txn, Some(object));
            }
            (Held::Stream { stream_id, raw }, Decision::Allow) => {
                self.serve_stream(req.action, *stream_id, raw, Some(req.clone()));
                return Ok(());
            }
            (Held::Stream { stream_id, .. }, Decision::Rename(to)) => {
                self.serve_stream(req.action, *stream_id, &to, Some(req.clone()));
                return Ok(());
            }
            (_, Decision::Deny(reason)) => reason,
        };
        let code = req.action.denial_code();
        let description = format!(
            "{code}: {} denied ({reason}): {}.",
            req.action,
            reason.description()
        );
        match held {
            Held::Connect { txn, .. } => {
                // FMS answers a refused connect with _error carrying Connect.Rejected.
                let info = Amf0Value::object(vec![
                    ("level", Amf0Value::string("error")),
                    ("code", Amf0Value::string(code)),
                    ("description", Amf0Value::string(description)),
                ]);
                let m = message::command_message(0, "_error", txn, &[Amf0Value::Null, info]);
                self.send(CSID_COMMAND, &m);
            }
            Held::Stream { stream_id, .. } => {
                let m = cmd::on_status(stream_id, "error", code, &description, Some(&req.name));
                self.send(CSID_COMMAND, &m);
            }
        }
        Err(SessionError::Denied {
            action: req.action,
            reason,
        })
    }

    /// Serves an allowed publish or play; `req` is kept for its `on_done`.
    fn serve_stream(
        &mut self,
        action: Action,
        stream_id: u32,
        name: &str,
        req: Option<AuthRequest>,
    ) {
        match action {
            Action::Publish => {
                let was = self.publishing.is_some();
                self.on_publish(stream_id, name);
                if !was && self.publishing.is_some() {
                    self.authz.publish_done = req;
                }
            }
            _ => {
                // A new play replaces the one before: that one is done.
                self.notify_done(false, true);
                self.on_play(stream_id, name);
                if self.playing.is_some() {
                    self.authz.play_done = req;
                }
            }
        }
    }

    /// Sends `on_done` for the publish and/or play that ended (if they were authorized).
    pub(super) fn notify_done(&mut self, publish: bool, play: bool) {
        let Some(auth) = self.engine.config().auth.clone() else {
            return;
        };
        let publish = publish.then(|| self.authz.publish_done.take()).flatten();
        let play = play.then(|| self.authz.play_done.take()).flatten();
        for req in publish.iter().chain(play.iter()) {
            auth.notify_done(req);
        }
    }
}
