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

/// Envoy's SDS and the parts of its API SDS uses (`envoy.*`, field numbers as Envoy's).
pub mod envoy {
    /// `envoy.config.core.v3`.
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.service.*.v3`.
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        pub mod secret {
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
    /// `envoy.extensions.transport_sockets.tls.v3`.
    pub mod extensions {
        pub mod transport_sockets {
            pub mod tls {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
}

/// `google.rpc.Status`, as xDS carries a NACK's reason.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
