//! Shared helpers: a real control plane on 127.0.0.1:0 over a temporary data
//! directory, and clients for it.
#![allow(dead_code)]

use remora_control::server::{start, Running, ServeConfig};
use remora_proto::v1::admin_client::AdminClient;
use remora_proto::v1::discovery_client::DiscoveryClient;
use remora_proto::v1::SourceFile;
use std::path::Path;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

pub const SERVICE: &str = "apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
";

pub const ROUTE: &str = "apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - backends: [{service: backend, weight: 90}, {service: backend, weight: 10}]
      timeout: 2s
";

pub async fn start_in(dir: &Path) -> Running {
    start(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        trust_domain: "cluster.local".into(),
    })
    .await
    .unwrap()
}

pub fn url(running: &Running) -> String {
    format!("http://{}", running.grpc_addr)
}

/// Adds `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::AsciiMetadataValue);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

pub async fn admin(running: &Running, token: &str) -> Admin {
    let channel = Channel::from_shared(url(running))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let value = format!("Bearer {token}").parse().unwrap();
    AdminClient::with_interceptor(channel, Bearer(value))
}

pub async fn discovery(running: &Running) -> DiscoveryClient<Channel> {
    DiscoveryClient::connect(url(running)).await.unwrap()
}

pub fn file(name: &str, content: &str) -> SourceFile {
    SourceFile {
        name: name.into(),
        content: content.into(),
    }
}
