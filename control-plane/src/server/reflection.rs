//! What gRPC server reflection describes: the services this server answers and
//! nothing else. `remora-proto`'s descriptor set holds every proto file of the
//! workspace, the examples' `remora.examples.v1.Echo` too, which the control
//! plane does not serve: registered whole, reflection would list Echo and a
//! client calling it would get UNIMPLEMENTED.
//!
//! The files are picked from the encoded set by reading only their name,
//! package, imports and service names; each kept file is passed on byte for
//! byte, so nothing (custom options included) is lost in a decode/re-encode.

use anyhow::bail;
use prost::Message;
use std::collections::BTreeSet;

/// A `google.protobuf.FileDescriptorSet` with its files left encoded.
#[derive(Clone, PartialEq, Message)]
struct EncodedFileSet {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

/// The fields of a `google.protobuf.FileDescriptorProto` needed to pick it.
#[derive(Clone, PartialEq, Message)]
struct FileHeader {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(string, repeated, tag = "3")]
    dependency: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceHeader>,
}

/// The name of a `google.protobuf.ServiceDescriptorProto`.
#[derive(Clone, PartialEq, Message)]
struct ServiceHeader {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

struct File {
    raw: Vec<u8>,
    name: String,
    dependency: Vec<String>,
    /// Full names (`package.Service`).
    services: Vec<String>,
}

/// From the encoded `FileDescriptorSet` `encoded`, the files that declare one
/// of `served` (full service names) and every file they import, directly or
/// not: an encoded `FileDescriptorSet` again. Errors if a served service is
/// declared nowhere, or if a kept file also declares a service that is not
/// served (reflection would list it).
pub fn served_descriptors(encoded: &[u8], served: &[&str]) -> anyhow::Result<Vec<u8>> {
    let set = EncodedFileSet::decode(encoded)?;
    let mut files = Vec::with_capacity(set.file.len());
    for raw in set.file {
        let header = FileHeader::decode(raw.as_slice())?;
        let package = header.package.unwrap_or_default();
        let services = header
            .service
            .into_iter()
            .map(|s| {
                let name = s.name.unwrap_or_default();
                if package.is_empty() {
                    name
                } else {
                    format!("{package}.{name}")
                }
            })
            .collect();
        files.push(File {
            raw,
            name: header.name.unwrap_or_default(),
            dependency: header.dependency,
            services,
        });
    }

    for service in served {
        if !files
            .iter()
            .any(|f| f.services.iter().any(|s| s == service))
        {
            bail!("the served service {service} is in no proto file");
        }
    }
    // The files declaring a served service, then what they import.
    let mut keep: BTreeSet<String> = files
        .iter()
        .filter(|f| f.services.iter().any(|s| served.contains(&s.as_str())))
        .map(|f| f.name.clone())
        .collect();
    let mut todo: Vec<String> = keep.iter().cloned().collect();
    while let Some(name) = todo.pop() {
        for file in files.iter().filter(|f| f.name == name) {
            for dep in &file.dependency {
                if keep.insert(dep.clone()) {
                    todo.push(dep.clone());
                }
            }
        }
    }

    let mut kept = Vec::new();
    for file in files {
        if !keep.contains(&file.name) {
            continue;
        }
        if let Some(extra) = file.services.iter().find(|s| !served.contains(&s.as_str())) {
            bail!(
                "{} declares {extra}, which is not served, beside served services",
                file.name
            );
        }
        kept.push(file.raw);
    }
    Ok(EncodedFileSet { file: kept }.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, package: &str, deps: &[&str], services: &[&str]) -> Vec<u8> {
        FileHeader {
            name: Some(name.into()),
            package: Some(package.into()),
            dependency: deps.iter().map(|d| d.to_string()).collect(),
            service: services
                .iter()
                .map(|s| ServiceHeader {
                    name: Some(s.to_string()),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    fn names(encoded: &[u8]) -> Vec<String> {
        EncodedFileSet::decode(encoded)
            .unwrap()
            .file
            .iter()
            .map(|f| FileHeader::decode(f.as_slice()).unwrap().name.unwrap())
            .collect()
    }

    #[test]
    fn keeps_the_served_files_and_their_imports_only() {
        let set = EncodedFileSet {
            file: vec![
                file("common.proto", "a", &[], &[]),
                file("a.proto", "a", &["common.proto"], &["A"]),
                file("b.proto", "b", &["common.proto"], &["B"]),
                file("unused.proto", "c", &[], &[]),
            ],
        }
        .encode_to_vec();
        let kept = served_descriptors(&set, &["a.A"]).unwrap();
        assert_eq!(names(&kept), ["common.proto", "a.proto"]);
        assert!(served_descriptors(&set, &["a.Nope"]).is_err());
    }

    #[test]
    fn a_file_with_an_unserved_service_beside_a_served_one_is_an_error() {
        let set = EncodedFileSet {
            file: vec![file("a.proto", "a", &[], &["A", "Other"])],
        }
        .encode_to_vec();
        let err = served_descriptors(&set, &["a.A"]).unwrap_err();
        assert!(err.to_string().contains("a.Other"), "{err}");
    }

    #[test]
    fn the_remora_set_keeps_remora_v1_and_drops_the_examples() {
        let kept = served_descriptors(
            remora_proto::FILE_DESCRIPTOR_SET,
            &[
                "remora.v1.Discovery",
                "remora.v1.Identity",
                "remora.v1.Admin",
            ],
        )
        .unwrap();
        assert_eq!(names(&kept), ["remora/v1/remora.proto"]);
        // Byte for byte: the kept file is the one in remora-proto's set.
        let all = EncodedFileSet::decode(remora_proto::FILE_DESCRIPTOR_SET).unwrap();
        let kept = EncodedFileSet::decode(kept.as_slice()).unwrap();
        assert!(all.file.contains(&kept.file[0]));
    }
}
