//! Encoded ResourceSpans, the unit the sender batches.

use bytes::Bytes;
use prost::Message;
use tailweave_core::proto::tonic::trace::v1::ResourceSpans;

use super::scenario::span_count;

/// One ResourceSpans, encoded as a `resource_spans` field of `ExportTraceServiceRequest`
/// (tag, length, message), so that a request body is a concatenation of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub(crate) field: Bytes,
    pub(crate) spans: u64,
}

impl Encoded {
    /// From bytes that already hold one `resource_spans` field (tag 1, length, message) with
    /// `spans` spans.
    pub fn from_field(field: Bytes, spans: u64) -> Encoded {
        Encoded { field, spans }
    }

    pub fn new(rs: &ResourceSpans) -> Encoded {
        let len = rs.encoded_len();
        let mut buf = Vec::with_capacity(len + 11);
        // Field 1, wire type 2 (length-delimited).
        buf.push(0x0a);
        prost::encoding::encode_varint(len as u64, &mut buf);
        rs.encode_raw(&mut buf);
        Encoded {
            field: Bytes::from(buf),
            spans: span_count(std::slice::from_ref(rs)) as u64,
        }
    }

    /// The field bytes: tag, length, ResourceSpans.
    pub fn field(&self) -> &Bytes {
        &self.field
    }

    pub fn spans(&self) -> u64 {
        self.spans
    }

    /// Decodes the ResourceSpans back (tests, tools).
    pub fn decode(&self) -> Result<ResourceSpans, prost::DecodeError> {
        let mut b = self.field.clone();
        let _tag = prost::encoding::decode_varint(&mut b)?;
        let _len = prost::encoding::decode_varint(&mut b)?;
        ResourceSpans::decode(b)
    }
}

/// Bytes of `v` as a protobuf varint.
pub(crate) fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

pub(crate) fn put_varint(buf: &mut Vec<u8>, v: u64) {
    prost::encoding::encode_varint(v, buf);
}
