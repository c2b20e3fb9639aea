//! The gRPC wire formats of ca-server, generated from `proto/` at build time.

/// Every message and service above, as an encoded `FileDescriptorSet` (for server
/// reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ca_descriptor.bin"));

/// `istio.v1.auth`: Istio's certificate service, field for field.
pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

/// `ca.v1`: ca-server's own services.
pub mod ca {
    pub mod v1 {
        tonic::include_proto!("ca.v1");
    }
}

/// The SPIFFE Workload API (`/SpiffeWorkloadAPI/...`: its proto declares no package).
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}
