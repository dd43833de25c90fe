//! A request's id: lifeboat's own, made before the request is dispatched and used as the
//! response's `id`, in every log line of the request and on the engine thread; and the
//! client's `x-request-id`, when it sent a usable one, kept beside it.
//!
//! `x-request-id` is answered on every response of the generation endpoints and forwarded
//! to the gateway, so the client's, lifeboat's and the gateway's logs can be joined: it
//! carries the client's own id when it sent one (as vLLM and Portkey echo theirs), else
//! lifeboat's.

use std::{fmt, sync::Arc};

use rand::{Rng, distr::Alphanumeric};

/// The header a request id travels in, both ways.
pub const X_REQUEST_ID: &str = "x-request-id";

/// Longest client request id kept. A UUID takes 36 bytes, a W3C trace id 32; anything much
/// longer is not an id, and every log line of the request repeats it.
pub const MAX_CLIENT_REQUEST_ID_BYTES: usize = 128;

/// Random characters after the prefix (62^24 ≈ 2^143 ids: collisions never happen).
const RANDOM_CHARS: usize = 24;

/// The id of one request. Its `Display` is lifeboat's own id (`chatcmpl-…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    own: Arc<str>,
    client: Option<Arc<str>>,
}

impl RequestId {
    /// Prefix of a chat completion's id, as OpenAI's.
    pub const CHAT_PREFIX: &'static str = "chatcmpl-";
    /// Prefix of a legacy text completion's id, as OpenAI's.
    pub const COMPLETION_PREFIX: &'static str = "cmpl-";

    /// A fresh id: `prefix` and 24 random alphanumeric characters.
    pub fn generate(prefix: &str) -> RequestId {
        let mut own = String::with_capacity(prefix.len() + RANDOM_CHARS);
        own.push_str(prefix);
        own.extend(
            rand::rng()
                .sample_iter(&Alphanumeric)
                .take(RANDOM_CHARS)
                .map(char::from),
        );
        RequestId {
            own: own.into(),
            client: None,
        }
    }

    /// This id with the client's `x-request-id` header value beside it, if that value is
    /// usable (see [`client_request_id`]); an unusable one is ignored.
    pub fn with_client_header(self, value: Option<&[u8]>) -> RequestId {
        RequestId {
            client: value.and_then(client_request_id).map(Arc::from),
            ..self
        }
    }

    /// lifeboat's own id.
    pub fn as_str(&self) -> &str {
        &self.own
    }

    /// The client's own id, when it sent a usable `x-request-id`.
    pub fn client(&self) -> Option<&str> {
        self.client.as_deref()
    }

    /// What `x-request-id` carries on the response and to the gateway: the client's id
    /// when it sent one, else lifeboat's. Printable ASCII either way.
    pub fn header_value(&self) -> &str {
        self.client().unwrap_or(&self.own)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.own)
    }
}

/// A client's `x-request-id` value, if it is one lifeboat keeps: 1 to
/// [`MAX_CLIENT_REQUEST_ID_BYTES`] bytes of printable ASCII, not only spaces. Anything else
/// (control characters, bytes past ASCII, a page of text) would go verbatim into every log
/// line and upstream header of the request, so it is dropped rather than cleaned up.
pub fn client_request_id(value: &[u8]) -> Option<&str> {
    let printable = value.iter().all(|b| (b' '..=b'~').contains(b));
    let blank = value.iter().all(|&b| b == b' ');
    if value.len() > MAX_CLIENT_REQUEST_ID_BYTES || !printable || blank {
        return None;
    }
    std::str::from_utf8(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_carry_the_prefix_and_differ() {
        let a = RequestId::generate(RequestId::CHAT_PREFIX);
        let b = RequestId::generate(RequestId::CHAT_PREFIX);
        assert!(a.as_str().starts_with("chatcmpl-"), "{a}");
        assert_eq!(a.as_str().len(), "chatcmpl-".len() + RANDOM_CHARS);
        assert!(
            a.as_str()["chatcmpl-".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        );
        assert_ne!(a, b);
        assert_eq!(a.to_string(), a.as_str());
        assert!(
            RequestId::generate(RequestId::COMPLETION_PREFIX)
                .as_str()
                .starts_with("cmpl-")
        );
    }

    #[test]
    fn usable_client_ids_are_kept_as_they_are() {
        for id in [
            "trace-me-123",
            "7f3c2a9e-1b4d-4e6f-8a0b-2c3d4e5f6a7b",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "a b~!{}",
            "x",
        ] {
            assert_eq!(client_request_id(id.as_bytes()), Some(id));
        }
        let longest = "r".repeat(MAX_CLIENT_REQUEST_ID_BYTES);
        assert_eq!(client_request_id(longest.as_bytes()), Some(longest.as_str()));
    }

    #[test]
    fn hostile_client_ids_are_refused() {
        let too_long = "r".repeat(MAX_CLIENT_REQUEST_ID_BYTES + 1);
        for bad in [
            too_long.as_bytes(),
            b"",
            b"   ",
            b"two\tcolumns",
            b"line\nbreak",
            b"fake\r\nx-injected: 1",
            b"nul\0byte",
            b"bell\x07",
            b"del\x7f",
            "caf\u{e9}".as_bytes(),
            b"\xff\xfe",
        ] {
            assert_eq!(client_request_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_header_carries_the_clients_id_when_usable_else_lifeboats() {
        let own = RequestId::generate(RequestId::CHAT_PREFIX);
        assert_eq!(own.client(), None);
        assert_eq!(own.header_value(), own.as_str());

        let with_client = own.clone().with_client_header(Some(b"trace-me-123"));
        assert_eq!(with_client.client(), Some("trace-me-123"));
        assert_eq!(with_client.header_value(), "trace-me-123");
        assert_eq!(
            with_client.as_str(),
            own.as_str(),
            "lifeboat's id stays the request's id"
        );

        let hostile = own.clone().with_client_header(Some(b"evil\x01id"));
        assert_eq!(hostile.client(), None);
        assert_eq!(hostile.header_value(), own.as_str());
        assert_eq!(own.clone().with_client_header(None), own);
    }
}
