//! The tower layer in front of every gRPC server of a node: finds who sent a request (a bearer
//! token, else the connection's certificate), applies the method's row of [`rules::GRPC`],
//! and hands the request on with its [`Caller`] in its extensions, or answers it with
//! `UNAUTHENTICATED` or `PERMISSION_DENIED` itself.

use std::sync::Arc;
use std::task::Context;
use std::task::Poll;

use futures::future::BoxFuture;
use tonic::Status;
use tracing::info;

use super::AuthFailure;
use super::AuthMethod;
use super::Caller;
use super::Security;
use super::acl::Principal;
use super::acl::ResourceType;
use super::rules;
use super::rules::Rule;
use super::tls::CertIdentity;
use crate::env::PeerInfo;
use crate::error::BrokerError;

#[derive(Clone)]
pub struct AuthLayer {
    security: Arc<Security>,
    /// `client` or `raft`, for logs and metrics.
    listener: &'static str,
    /// Whether requests must authenticate and are authorized. When false every request gets an
    /// unrestricted caller (a listener without authentication).
    enforce: bool,
    /// Only the cluster's nodes, whatever the method (the Raft listener).
    nodes_only: bool,
}

impl AuthLayer {
    pub fn new(security: Arc<Security>, listener: &'static str, enforce: bool) -> Self {
        Self { security, listener, enforce, nodes_only: false }
    }

    /// A layer for a listener that only the cluster's nodes may use.
    pub fn nodes_only(security: Arc<Security>, listener: &'static str, enforce: bool) -> Self {
        Self { security, listener, enforce, nodes_only: true }
    }

    fn fail(&self, f: AuthFailure, status: Status) -> Status {
        self.security.metrics.auth_failure(self.listener, f.reason());
        info!(listener = self.listener, reason = f.reason(), "refused a request: {}", status.message());
        status
    }

    fn unauthenticated(&self, f: AuthFailure, message: &str) -> Status {
        self.fail(f, BrokerError::Unauthenticated(message.to_owned()).into())
    }

    fn denied(&self, f: AuthFailure, message: String) -> Status {
        self.fail(f, BrokerError::PermissionDenied(message).into())
    }

    /// The caller of a request, or the status that refuses it.
    pub fn decide<B>(&self, req: &http::Request<B>) -> Result<Caller, Status> {
        let path = req.uri().path();
        let Some(rule) = rules::grpc(path) else {
            return Err(BrokerError::PermissionDenied(format!("{path}: no access rule; refused")).into());
        };
        let rule = if self.nodes_only { Rule::Node } else { rule };
        let peer = req.extensions().get::<PeerInfo>();
        let bearer = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let (principal, via) = match (bearer, peer.and_then(|p| p.cert.as_ref())) {
            (Some(token), _) => match self.security.authenticate_token(token.trim()) {
                Ok(user) => (Principal::User(user), AuthMethod::Token),
                Err(f) if self.enforce => {
                    return Err(
                        self.unauthenticated(f, "the token is not valid: unknown user or wrong secret")
                    );
                }
                Err(_) => (Principal::Anonymous, AuthMethod::None),
            },
            (None, Some(CertIdentity::Node(id))) => (Principal::Node(*id), AuthMethod::Certificate),
            (None, Some(CertIdentity::User(name))) => {
                (Principal::User(name.clone()), AuthMethod::Certificate)
            }
            (None, None) => (Principal::Anonymous, AuthMethod::None),
        };
        let caller = self.security.caller(principal, via, self.enforce, self.listener);
        if !self.enforce {
            return Ok(caller);
        }
        let no_credentials = || {
            self.unauthenticated(
                AuthFailure::NoCredentials,
                "no credentials: this node needs a token (authorization: Bearer …; eddyctl --token) or a client certificate",
            )
        };
        match (rule, &caller.principal) {
            (Rule::Public, _) => Ok(caller),
            (Rule::Node, Principal::Node(id)) | (Rule::NodeOrCluster(_), Principal::Node(id)) => {
                if self.security.node_is_member(*id) {
                    Ok(caller)
                } else {
                    Err(self.denied(
                        AuthFailure::NodeNotMember,
                        format!("node {id} is not a member of this cluster"),
                    ))
                }
            }
            (Rule::Node, p) => Err(self.denied(
                AuthFailure::NotANode,
                format!("{path} is for the cluster's nodes only (a node certificate); refused for {p}"),
            )),
            (Rule::JoiningNode, Principal::Node(_)) => Ok(caller),
            (Rule::JoiningNode, p) => Err(self.denied(
                AuthFailure::NotANode,
                format!("only a node (by its node certificate) may join; refused for {p}"),
            )),
            (_, Principal::Anonymous) => Err(no_credentials()),
            (_, Principal::Node(id)) => Err(self.denied(
                AuthFailure::NodeAsUser,
                format!("Node:{id} is a node identity and has no user rights; {path} is refused"),
            )),
            (Rule::NodeOrCluster(op) | Rule::Cluster(op), Principal::User(_)) => {
                caller.check(op, ResourceType::Cluster, "").map_err(Status::from)?;
                Ok(caller)
            }
            (Rule::PerResource(_) | Rule::Filtered(_), Principal::User(_)) => Ok(caller),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.layer.decide(&req) {
            // Between nodes, abandoned calls are the normal end of a vote whose deadline
            // passed; a client that abandons hundreds a second is flooding.
            Ok(caller)
                if !self.layer.nodes_only
                    && let Some(peer) = req.extensions().get::<PeerInfo>() =>
            {
                let conn = peer.conn.clone();
                req.extensions_mut().insert(caller);
                let fut = self.inner.call(req);
                let (security, listener) = (self.layer.security.clone(), self.layer.listener);
                Box::pin(async move {
                    let mut watch = Abandoned { conn, done: false, security, listener };
                    let r = fut.await;
                    watch.done = true;
                    r
                })
            }
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// Counts a request whose future is dropped before it produced a response (its stream was
/// reset), and closes the connection past [`crate::env::ABANDONED_PER_SECOND_MAX`] a second.
struct Abandoned {
    conn: Arc<crate::env::ConnGuard>,
    done: bool,
    security: Arc<Security>,
    listener: &'static str,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if !self.done && self.conn.abandoned() {
            self.security.metrics.auth_failure(self.listener, "rapid_reset");
            tracing::warn!(
                listener = self.listener,
                "closed a connection that abandoned over {} requests in a second (rapid reset)",
                crate::env::ABANDONED_PER_SECOND_MAX
            );
        }
    }
}
