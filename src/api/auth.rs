//! Client and admin authentication: optional sets of accepted API keys, compared in
//! constant time.

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::{app::AppState, backend::ClientId, config::Secret};

/// Accepted client keys, kept only as SHA-256 digests so comparison time does not depend
/// on the key length or on where a guess first differs.
#[derive(Debug, Clone, Default)]
pub struct ClientKeys {
    digests: Vec<[u8; 32]>,
}

impl ClientKeys {
    pub fn new(keys: &[Secret]) -> ClientKeys {
        ClientKeys {
            digests: keys.iter().map(|k| digest(k.expose())).collect(),
        }
    }

    /// No keys configured: every client is accepted.
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys; every key is compared, match or not.
    pub fn accepts(&self, presented: &str) -> bool {
        self.accepts_digest(&digest(presented))
    }

    /// [`ClientKeys::accepts`] for a key already hashed.
    fn accepts_digest(&self, presented: &[u8; 32]) -> bool {
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, key| found | key.ct_eq(presented))
            .into()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Middleware for `/v1/*`: `Authorization: Bearer KEY` (or `x-api-key: KEY`). It also
/// names the client for the local engine's fair admission (a [`ClientId`] extension): by
/// its key when keys are configured, else by its address (an unchecked key would let one
/// client pose as many).
pub(crate) async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = state.live().client_keys.clone();
    check(&keys, request, next).await
}

/// Middleware for `/metrics`, `/health` and `/ready`: an admin key, sent the same way,
/// when `server.admin_api_key_envs` lists any; open otherwise.
pub(crate) async fn require_admin_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let keys = state.live().admin_keys.clone();
    check(&keys, request, next).await
}

async fn check(keys: &ClientKeys, mut request: Request, next: Next) -> Response {
    if keys.is_open() {
        // Requests built in-process (`oneshot` in tests) have no peer: the anonymous client.
        let client = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| ClientId::from_ip(peer.ip()))
            .unwrap_or_default();
        request.extensions_mut().insert(client);
        return next.run(request).await;
    }
    let client = match presented_key(&request) {
        None => {
            return ApiError::Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            )
            .into_response();
        }
        Some(key) => {
            // Hashed once: for the comparison and for the client's name.
            let presented = digest(key);
            if !keys.accepts_digest(&presented) {
                return ApiError::Unauthorized("Incorrect API key provided.").into_response();
            }
            ClientId::from_key_digest(&presented)
        }
    };
    // With keys, the key (by its hash) names the client for the local model's fairness.
    request.extensions_mut().insert(client);
    next.run(request).await
}

/// The key in `Authorization: Bearer KEY`, else in `x-api-key`.
fn presented_key(request: &Request) -> Option<&str> {
    let headers = request.headers();
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        })
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_keys() {
        let keys = ClientKeys::new(&[Secret::new("alpha"), Secret::new("beta")]);
        assert!(keys.accepts("alpha") && keys.accepts("beta"));
        assert!(!keys.accepts("alph") && !keys.accepts("") && !keys.accepts("alphaa"));
        assert!(!keys.is_open());
        assert!(ClientKeys::default().is_open());
    }

    #[test]
    fn client_ids_are_short_stable_and_never_the_key() {
        let id = ClientId::from_api_key("sk-secret-alpha");
        assert_eq!(id, ClientId::from_api_key("sk-secret-alpha"));
        assert_ne!(id, ClientId::from_api_key("sk-secret-beta"));
        assert!(
            !id.as_str().contains("secret") && id.as_str().len() == "key:".len() + 16,
            "{id}"
        );
        let ip = ClientId::from_ip(std::net::IpAddr::from([127, 0, 0, 2]));
        assert_eq!(ip.as_str(), "ip:127.0.0.2");
        assert_eq!(ClientId::default().as_str(), "anonymous");
    }
}
