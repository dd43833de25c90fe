//! The HTTP server's own limits over real sockets: slowloris clients are closed by the
//! header timeout and never starve a real client, a body that stops coming is refused,
//! idle connections are closed, the connection cap holds, the peer address reaches the
//! handlers, and `/metrics`, `/health`, `/ready` can sit behind an admin key.

use crate::common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{extract::ConnectInfo, routing::get};
use common::{TestApp, chat_body, spawn_app, spawn_app_limited};
use lifeboat::{
    http_server::{self, ServerLimits},
    mock_upstream::MockSettings,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Upper bounds only, generous for a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(15);

fn limits(tweak: impl FnOnce(&mut ServerLimits)) -> ServerLimits {
    let mut limits = ServerLimits {
        grace: Duration::from_secs(2),
        ..ServerLimits::default()
    };
    tweak(&mut limits);
    limits
}

async fn limited_app(tweak: impl FnOnce(&mut ServerLimits)) -> TestApp {
    spawn_app_limited(MockSettings::default(), |_| {}, HashMap::new(), limits(tweak)).await
}

/// A client that sends `request` one byte a second and never finishes; returns how long
/// the server took to close the connection (read EOF or reset), or `None` if it did not
/// within `give_up`.
async fn slowloris(addr: SocketAddr, request: &'static [u8], give_up: Duration) -> Option<Duration> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let start = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let mut sent = 0;
    let mut buf = [0u8; 512];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < give_up {
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(start.elapsed()),
                Ok(_) => {} // a response (hyper's 408 or similar): keep reading to the close
            },
            _ = tick.tick() => {
                let byte = request.get(sent % request.len()).copied().unwrap_or(b'a');
                sent += 1;
                if writer.write_all(&[byte]).await.is_err() {
                    return Some(start.elapsed());
                }
            }
        }
    }
    None
}

/// Everything the server sends on a fresh connection after `request`, until it closes.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut response = Vec::new();
    let read = tokio::time::timeout(SLACK, stream.read_to_end(&mut response)).await;
    assert!(read.is_ok(), "the server kept the connection open: {response:?}");
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn slowloris_connections_are_closed_and_never_starve_a_real_client() {
    let header_timeout = Duration::from_secs(2);
    let app = limited_app(|l| l.header_read_timeout = header_timeout).await;
    let addr = app.addr;
    let clients: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(slowloris(
                addr,
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                header_timeout + SLACK,
            ))
        })
        .collect();
    // While all 200 dribble their headers, a real client is answered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(response.status(), 200);
    for client in clients {
        let closed = client.await.expect("client task");
        assert!(
            closed.is_some(),
            "a slowloris connection outlived the header timeout by {SLACK:?}"
        );
    }
}

#[tokio::test]
async fn the_connection_cap_holds_and_frees_slots_as_stalled_clients_time_out() {
    let app = limited_app(|l| {
        l.max_connections = 2;
        l.header_read_timeout = Duration::from_secs(2);
    })
    .await;
    // Two silent connections take both slots.
    let _held: Vec<TcpStream> = vec![
        TcpStream::connect(app.addr).await.expect("connect"),
        TcpStream::connect(app.addr).await.expect("connect"),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let waiting = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/health");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served past max_connections = 2"
    );
    // The header timeout closes the silent two; the waiting client then gets its slot.
    let status = tokio::time::timeout(SLACK, waiting)
        .await
        .expect("served once a slot freed")
        .expect("task")
        .expect("request");
    assert_eq!(status, 200, "after {:?}", start.elapsed());
}

#[tokio::test]
async fn a_body_that_stops_coming_is_refused_with_an_openai_error() {
    let app = limited_app(|l| l.body_read_timeout = Duration::from_secs(1)).await;
    // Content-Length promises 100 bytes; 10 arrive and the client goes quiet.
    let response = raw_exchange(
        app.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .await;
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 400"), "{response}");
    let body = body
        .find('{')
        .map(|start| &body[start..=body.rfind('}').unwrap_or(start)])
        .unwrap_or_default();
    let error: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"));
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("did not arrive within 1s"), "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = limited_app(|l| {
        l.idle_timeout = Duration::from_secs(1);
        l.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let n = stream.read(&mut buf).await.expect("response");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Kept alive, then idle: the server closes it (the header timer is a minute here).
    let closed = tokio::time::timeout(SLACK, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection stayed open");
}

#[tokio::test]
async fn malformed_http_gets_hypers_bare_400_and_a_closed_connection() {
    let app = spawn_app().await;
    // hyper answers what it cannot parse itself, before any request reaches the app, so
    // the body cannot be an OpenAI error (see `http_server`'s module doc).
    let response = raw_exchange(app.addr, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response:?}");
    // What does parse gets the OpenAI shape, whatever the path.
    let response = app.get("/no/such/path").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn handlers_see_the_peer_address_as_connect_info() {
    let app = axum::Router::new().route(
        "/peer",
        get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http_server::serve(
        listener,
        app,
        async {
            let _ = rx.await;
        },
        limits(|_| {}),
    ));
    let socket = TcpStream::connect(addr).await.expect("connect");
    let local = socket.local_addr().expect("local addr");
    let response = raw_exchange_on(
        socket,
        b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.ends_with(&local.to_string()), "{response}");
    let _ = tx.send(());
    let stopped = tokio::time::timeout(SLACK, server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "the server drains and returns");
}

async fn raw_exchange_on(mut stream: TcpStream, request: &[u8]) -> String {
    stream.write_all(request).await.expect("write");
    let mut response = Vec::new();
    let read = tokio::time::timeout(SLACK, stream.read_to_end(&mut response)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn operational_endpoints_are_open_by_default_and_behind_the_admin_key_when_set() {
    let open = spawn_app().await;
    for path in ["/metrics", "/health", "/ready"] {
        assert_eq!(open.get(path).await.status(), 200, "{path} is open by default");
    }
    let env = HashMap::from([("LIFEBOAT_ADMIN_KEY".to_string(), "admin-s3cret".to_string())]);
    let app = spawn_app_limited(
        MockSettings::default(),
        |c| c.server.admin_api_key_envs = vec!["LIFEBOAT_ADMIN_KEY".into()],
        env,
        limits(|_| {}),
    )
    .await;
    for path in ["/metrics", "/health", "/ready"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 401, "{path} without a key");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        let wrong = app
            .client
            .get(app.url(path))
            .bearer_auth("guess")
            .send()
            .await
            .expect("sent");
        assert_eq!(wrong.status(), 401, "{path} with a wrong key");
        let right = app
            .client
            .get(app.url(path))
            .bearer_auth("admin-s3cret")
            .send()
            .await
            .expect("sent");
        assert_eq!(right.status(), 200, "{path} with the admin key");
    }
    // Client endpoints follow the client keys (none here), not the admin key.
    assert_eq!(app.get("/v1/models").await.status(), 200);
}
