//! The engine session's side of [`crate::auth`]: connect, publish and play are decided
//! before they are served.
//!
//! The protocol ([`crate::rtmp::session::ServerSession`]) raises each as a request; rules
//! that need no I/O (addresses, keys, tokens) decide it inline. A callback is waited for by
//! this session's task alone: the request stays pending, the protocol decodes no more of
//! the client's messages until the decision (bounded by the callback timeout), and every
//! other session carries on. Names the protocol refuses (no app, empty, too long) never
//! get here, so they are refused without a callback. A denial sends the client the protocol's status (`_error`
//! NetConnection.Connect.Rejected, `onStatus` NetStream.Publish.BadName or
//! NetStream.Play.Failed) and closes the connection once it is written.

use std::net::IpAddr;

use super::{EngineConnection, SessionError};
use crate::auth::{Action, AuthRequest, Decision};
use crate::rtmp::amf0::Amf0Value;
use crate::rtmp::session::{ConnectRequest, RequestId, StreamRequest};

/// A request waiting for its decision.
enum Held {
    Connect(RequestId),
    Stream(Box<StreamRequest>),
}

/// Held boxed, and only by the sessions of an engine with `[auth]` configured: four
/// requests' fields inline are about 1 KiB, which every idle connection would carry.
pub(super) struct AuthState {
    /// The client's address.
    peer: IpAddr,
    /// connect's fields: each publish and play request starts from them.
    base: Option<AuthRequest>,
    held: Option<(Held, AuthRequest)>,
    /// The publish and play in progress, for their `on_done` notice.
    publish_done: Option<AuthRequest>,
    play_done: Option<AuthRequest>,
}

impl AuthState {
    pub(super) fn new(peer: IpAddr) -> Self {
        AuthState {
            peer,
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

/// A name as the client sent it: the name, then `?query` when there was one.
fn with_query(name: &str, query: &str) -> String {
    if query.is_empty() {
        name.to_owned()
    } else {
        format!("{name}?{query}")
    }
}

impl EngineConnection {
    /// `connect`, through `[auth]` when it is configured.
    pub(super) fn authorize_connect(&mut self, c: &ConnectRequest) -> Result<(), SessionError> {
        let (Some(auth), Some(state)) = (self.engine.config().auth.clone(), self.authz.as_mut())
        else {
            self.proto.accept(c.request_id);
            return Ok(());
        };
        // The fields the rules and callbacks read, as the client sent them.
        let mut fields = vec![("app", Amf0Value::string(with_query(&c.app, &c.query)))];
        for (k, v) in [
            ("tcUrl", &c.tc_url),
            ("swfUrl", &c.swf_url),
            ("pageUrl", &c.page_url),
            ("flashVer", &c.flash_ver),
        ] {
            if let Some(v) = v {
                fields.push((k, Amf0Value::string(v.clone())));
            }
        }
        let object = Amf0Value::object(fields);
        let max = self.engine.limits().max_name_len;
        let req = AuthRequest::connect_bounded(state.peer, self.id, Some(&object), max);
        state.base = Some(req.clone());
        let held = Held::Connect(c.request_id);
        if auth.needs_callback(Action::Connect, &req.app) {
            state.held = Some((held, req));
            return Ok(());
        }
        let d = auth.decide_local(&req);
        self.decided(held, req, d)
    }

    /// `publish` or `play` (the protocol checked the name), through `[auth]`.
    pub(super) fn authorize_stream(
        &mut self,
        action: Action,
        request: &StreamRequest,
    ) -> Result<(), SessionError> {
        let auth = self.engine.config().auth.clone();
        let base = self.authz.as_ref().and_then(|a| a.base.as_ref());
        let (Some(auth), Some(base)) = (auth, base) else {
            self.serve_stream(action, request, None);
            return Ok(());
        };
        let req = base.for_stream(action, &with_query(&request.name, &request.query));
        // Held without its query (the AuthRequest keeps what the rules need of it, cut to
        // max_name_len): a waiting session holds a few times max_name_len at most.
        let held = Held::Stream(Box::new(StreamRequest {
            query: String::new(),
            ..request.clone()
        }));
        if auth.needs_callback(action, &req.app) {
            if let Some(state) = self.authz.as_mut() {
                state.held = Some((held, req));
            }
            return Ok(());
        }
        let d = auth.decide_local(&req);
        self.decided(held, req, d)
    }

    /// Waits for the held request's callback and acts on the answer.
    pub(super) async fn await_decision(&mut self) -> Result<(), SessionError> {
        let Some((held, req)) = self.authz.as_mut().and_then(|a| a.held.take()) else {
            return Ok(());
        };
        let d = match self.engine.config().auth.clone() {
            // Boxed: the callback's HTTP exchange is about 2 KiB of state, which inline
            // would be part of every session's future for its whole life.
            Some(auth) => Box::pin(auth.authorize(&req)).await,
            None => Decision::Allow,
        };
        self.decided(held, req, d)
    }

    fn decided(&mut self, held: Held, req: AuthRequest, d: Decision) -> Result<(), SessionError> {
        let reason = match (held, d) {
            (Held::Connect(id), Decision::Allow | Decision::Rename(_)) => {
                self.proto.accept(id);
                return Ok(());
            }
            (Held::Stream(request), Decision::Allow) => {
                self.serve_stream(req.action, &request, Some(req));
                return Ok(());
            }
            (Held::Stream(mut request), Decision::Rename(to)) => {
                // An invalid new name is refused by the protocol as the client's own would be.
                if let Some(name) = self.proto.rename(request.request_id, &to) {
                    request.name = name;
                    self.serve_stream(req.action, &request, Some(req));
                }
                return Ok(());
            }
            (held, Decision::Deny(reason)) => {
                let id = match held {
                    Held::Connect(id) => id,
                    Held::Stream(request) => request.request_id,
                };
                let description = reason.status_description(req.action);
                self.proto
                    .reject_with(id, req.action.denial_code(), &description);
                reason
            }
        };
        Err(SessionError::Denied {
            action: req.action,
            reason,
        })
    }

    /// Serves an allowed publish or play; `req` is kept for its `on_done`.
    fn serve_stream(&mut self, action: Action, request: &StreamRequest, req: Option<AuthRequest>) {
        match action {
            Action::Publish => {
                let was = self.publishing.is_some();
                self.on_publish(request);
                if !was && self.publishing.is_some() {
                    if let Some(state) = self.authz.as_mut() {
                        state.publish_done = req;
                    }
                }
            }
            _ => {
                // A new play replaces the one before: that one is done.
                self.notify_done(false, true);
                self.on_play(request);
                if self.playing.is_some() || self.vod.is_some() {
                    if let Some(state) = self.authz.as_mut() {
                        state.play_done = req;
                    }
                }
            }
        }
    }

    /// Sends `on_done` for the publish and/or play that ended (if they were authorized).
    pub(super) fn notify_done(&mut self, publish: bool, play: bool) {
        let (Some(auth), Some(state)) = (self.engine.config().auth.clone(), self.authz.as_mut())
        else {
            return;
        };
        let publish = publish.then(|| state.publish_done.take()).flatten();
        let play = play.then(|| state.play_done.take()).flatten();
        for req in publish.iter().chain(play.iter()) {
            auth.notify_done(req);
        }
    }
}
