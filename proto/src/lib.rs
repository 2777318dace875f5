//! Generated protocol code for KeelMQ.
//!
//! * [`admin`]: the broker administration API (`keelmq.admin.v1`).

/// The broker administration API (`keelmq.admin.v1`).
pub mod admin {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keelmq.admin.v1");
}

#[cfg(test)]
mod tests {
    use super::admin::{EpochEntry, Role, StatusResponse};
    use prost::Message;

    #[test]
    fn admin_status_round_trips_through_the_wire_format() {
        let status = StatusResponse {
            broker_name: "broker-a".into(),
            role: Role::Slave as i32,
            epoch: 3,
            epochs: vec![EpochEntry {
                epoch: 3,
                start_offset: 4096,
            }],
            max_offset: 8192,
            ..Default::default()
        };
        let bytes = status.encode_to_vec();
        let back = StatusResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, status);
        assert_eq!(back.role(), Role::Slave);
    }
}
