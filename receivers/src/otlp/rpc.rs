//! The few `google.rpc` messages the receivers write: `Status` (the OTLP/HTTP error body and the
//! gRPC `grpc-status-details-bin`) and `RetryInfo` (how long a refused client should wait).

use std::time::Duration;

use bytes::Bytes;
use prost::Message;

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<RpcAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcAny {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<RpcDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

pub const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// A retryable gRPC refusal whose details carry `RetryInfo`, so OTLP exporters (ours, the
/// Collector's, the SDKs') wait `delay` before retrying.
pub fn retryable_status(code: tonic::Code, message: String, delay: Duration) -> tonic::Status {
    let info = RetryInfo {
        retry_delay: Some(RpcDuration {
            seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(delay.subsec_nanos()).unwrap_or(0),
        }),
    };
    let details = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![RpcAny {
            type_url: RETRY_INFO_TYPE_URL.to_string(),
            value: info.encode_to_vec(),
        }],
    };
    tonic::Status::with_details(code, message, Bytes::from(details.encode_to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_info_round_trips() {
        let s = retryable_status(
            tonic::Code::Unavailable,
            "full".into(),
            Duration::from_millis(1500),
        );
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let d = RpcStatus::decode(s.details()).unwrap();
        assert_eq!(d.code, tonic::Code::Unavailable as i32);
        assert_eq!(d.details[0].type_url, RETRY_INFO_TYPE_URL);
        let info = RetryInfo::decode(d.details[0].value.as_slice()).unwrap();
        assert_eq!(
            info.retry_delay,
            Some(RpcDuration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
    }
}
