//! With the `otlp` feature and an OTLP endpoint configured, command spans are exported with the
//! client's trace id.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::HeaderMap;
use jetfn_tests::{FunctionProcess, NatsServer};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

/// A minimal OTLP/HTTP collector: keeps every request body it receives.
async fn collector() -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    kept.lock().unwrap().push(body);
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, bodies)
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_spans_are_exported_over_otlp_with_the_clients_trace_id() {
    let nats = NatsServer::start().await.unwrap();
    let (port, bodies) = collector().await;
    let mut function = FunctionProcess::spawn(
        "account",
        &[
            ("NATS_URL", nats.url()),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_SERVICE_NAME", "account".into()),
        ],
    )
    .unwrap();
    function
        .wait_for_log("command function ready", Duration::from_secs(30))
        .await
        .unwrap();
    let client = nats.connect().await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{TRACE_ID}-b7ad6b7169203331-01").as_str(),
    );
    client
        .request_with_headers("cmd.account.otel.open", headers, r#"{"owner":"Ot"}"#.into())
        .await
        .unwrap();

    let trace_id = hex(TRACE_ID);
    let exported =
        jetfn_tests::workload::poll("the command span exported", Duration::from_secs(30), || {
            let bodies = bodies.clone();
            let trace_id = trace_id.clone();
            async move {
                let found = bodies
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|body| contains(body, &trace_id))
                    .cloned();
                Ok(found)
            }
        })
        .await
        .unwrap();
    assert!(contains(&exported, b"command"), "the span is named command");
    assert!(
        contains(&exported, b"account"),
        "the service name is exported"
    );
    function.terminate().unwrap();
    assert!(
        function
            .wait(Duration::from_secs(30))
            .await
            .unwrap()
            .success()
    );
}
