//! The relay's single authorization hook: what it asks before a client's `connect`,
//! `publish` or `play` reaches a backend.
//!
//! The connect-aware relay parses those commands and calls [`RelayGuard::check`] with the
//! parsed request; the client's bytes for that command are held until the verdict (the
//! backend never sees a denied command). [`AllowAll`] is used when `[auth]` sets no rule;
//! [`AuthGuard`] asks [`crate::auth::Auth`], the same decision the engine uses.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::rtmp::message::Command;
use crate::stream::Transport;

/// Which command is being checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Connect,
    Publish,
    Play,
}

impl Action {
    /// The action a command name asks for, if it is one the guard checks.
    pub fn of_command(name: &str) -> Option<Action> {
        match name {
            "connect" => Some(Action::Connect),
            "publish" => Some(Action::Publish),
            "play" | "play2" => Some(Action::Play),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Publish => "publish",
            Action::Play => "play",
        }
    }
}

/// One parsed request, as the guard sees it.
#[derive(Clone, Debug)]
pub struct Request {
    pub action: Action,
    pub peer: SocketAddr,
    pub transport: Transport,
    /// The app from `connect`, query included (`live?token=...`).
    pub app: String,
    pub tc_url: Option<String>,
    /// The stream name of a publish or play, query included.
    pub stream: Option<String>,
    /// The message stream the command came on (0 for connect).
    pub stream_id: u32,
    /// The whole command, for fields a policy may want.
    pub command: Command,
    /// The connection's `connect` (its object holds tcUrl, flashVer, pageUrl...).
    pub connect: Arc<Command>,
    /// The connection's number (nginx-rtmp's `clientid` in callbacks).
    pub client_id: u64,
}

/// Numbers for relayed connections, for [`Request::client_id`].
pub fn next_client_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

/// The guard's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused: the client gets `code` (an RTMP status code) with `reason`, then is closed.
    Deny {
        code: &'static str,
        reason: String,
    },
}

/// A verdict that may take time (an HTTP callback).
pub type VerdictFuture = Pin<Box<dyn Future<Output = Verdict> + Send + 'static>>;

/// The hook. `wants` lets the relay skip building a request (and holding bytes) for
/// actions no rule looks at.
pub trait RelayGuard: Send + Sync + 'static {
    fn wants(&self, action: Action) -> bool;
    fn check(&self, request: Request) -> VerdictFuture;
}

/// No authorization: every command passes without being held.
#[derive(Debug, Default)]
pub struct AllowAll;

impl RelayGuard for AllowAll {
    fn wants(&self, _: Action) -> bool {
        false
    }
    fn check(&self, _: Request) -> VerdictFuture {
        Box::pin(std::future::ready(Verdict::Allow))
    }
}

/// `[auth]` for the relay: each request becomes an [`crate::auth::AuthRequest`] and gets
/// [`crate::auth::Auth::authorize`]'s decision (counted and logged there).
pub struct AuthGuard {
    pub auth: Arc<crate::auth::Auth>,
    /// `limits.max_name_len`: each connect field is cut to it.
    pub max_name_len: usize,
}

impl RelayGuard for AuthGuard {
    fn wants(&self, _: Action) -> bool {
        true
    }

    fn check(&self, request: Request) -> VerdictFuture {
        use crate::auth::{Action as A, AuthRequest, Decision};
        let auth = self.auth.clone();
        let max_len = self.max_name_len;
        Box::pin(async move {
            let base = AuthRequest::connect_bounded(
                request.peer.ip(),
                request.client_id,
                request.connect.object(),
                max_len,
            );
            let name = request.stream.as_deref().unwrap_or_default();
            let (action, req) = match request.action {
                Action::Connect => (A::Connect, base),
                Action::Publish => (A::Publish, base.for_stream(A::Publish, name)),
                Action::Play => (A::Play, base.for_stream(A::Play, name)),
            };
            // The relay forwards the client's bytes unchanged, so a callback's rename is a
            // denial (counted as one); the client gets the engine's wording.
            match auth.authorize_unrenamed(&req).await {
                // (authorize_unrenamed turns every rename into a denial.)
                Decision::Allow | Decision::Rename(_) => Verdict::Allow,
                Decision::Deny(r) => Verdict::Deny {
                    code: action.denial_code(),
                    reason: r.status_description(action),
                },
            }
        })
    }
}
