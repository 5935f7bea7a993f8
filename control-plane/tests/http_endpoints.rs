//! `/live`, `/ready` and `/metrics` on the HTTP listener.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    assert!(http_get(running.http_addr, "/live")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(http_get(running.http_addr, "/ready")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(http_get(running.http_addr, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
    let metrics = http_get(running.http_addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for line in [
        "remora_control_proxies_connected 0",
        "remora_config_version 0",
        "remora_control_pushes_total 0",
        "remora_control_nacks_total 0",
        "# TYPE remora_control_pushes_total counter",
        "remora_control_certificates_issued_total 0",
        "remora_control_certificates_refused_total{reason=\"token_unknown\"} 0",
        "remora_control_ca_rotation_in_progress 0",
        "remora_control_ca_trusted_roots 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in {metrics}");
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn grpc_health_and_reflection_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut health = HealthClient::new(channel(&running).await);
    for service in [
        "",
        "remora.v1.Discovery",
        "remora.v1.Identity",
        "remora.v1.Admin",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }

    let mut reflection = ServerReflectionClient::new(channel(&running).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in [
        "remora.v1.Admin",
        "remora.v1.Discovery",
        "remora.v1.Identity",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing in {names:?}"
        );
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_exactly_the_served_services() {
    use tonic_reflection::pb::{v1, v1alpha};
    let served = [
        "grpc.health.v1.Health",
        "remora.v1.Admin",
        "remora.v1.Discovery",
        "remora.v1.Identity",
    ];
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;

    // v1: the list, and no descriptor of the examples' Echo.
    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(&running).await);
    let request = |message| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    use v1::server_reflection_request::MessageRequest as Request;
    use v1::server_reflection_response::MessageResponse as Response;
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([
            request(Request::ListServices(String::new())),
            request(Request::FileContainingSymbol("remora.v1.Admin".into())),
        ]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(Response::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    let mut expected: Vec<&str> = served.to_vec();
    expected.push("grpc.reflection.v1.ServerReflection");
    expected.sort();
    assert_eq!(names, expected);
    let response = responses.message().await.unwrap().unwrap();
    assert!(
        matches!(
            response.message_response,
            Some(Response::FileDescriptorResponse(_))
        ),
        "{response:?}"
    );
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request(
            Request::FileContainingSymbol("remora.examples.v1.Echo".into()),
        )]))
        .await
        .unwrap()
        .into_inner();
    let error = responses.message().await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");

    // v1alpha (older grpcurl releases): the same list.
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&running).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("not a service list: {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    let mut expected: Vec<&str> = served.to_vec();
    expected.push("grpc.reflection.v1alpha.ServerReflection");
    expected.sort();
    assert_eq!(names, expected);
    running.shutdown().await.unwrap();
}
