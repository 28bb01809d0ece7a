//! The relay's single authorization hook: what it asks before a client's `connect`,
//! `publish` or `play` reaches a backend.
//!
//! The connect-aware relay parses those commands and calls [`RelayGuard::check`] with the
//! parsed request; the client's bytes for that command are held until the verdict (the
//! backend never sees a denied command). [`AllowAll`] is used until an authorization
//! policy is configured; the `[auth]` design implements this trait.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

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
    /// The whole command, for fields a policy may want (flashVer, pageUrl...).
    pub command: Command,
}

/// The guard's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused: the client is closed; `reason` is logged.
    Deny {
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
