//! A minimal protobuf wire-format reader and writer.
//!
//! tailweave does not decode what no one reads: the receivers walk an OTLP request with this reader,
//! slice each span's encoded bytes out of the request buffer, and parse only the few fields routing,
//! join and policies need. The writer re-frames those slices into a new request without re-encoding.

use bytes::{BufMut, Bytes};

/// Why a byte string is not valid protobuf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated varint at byte {0}")]
    TruncatedVarint(usize),
    #[error("varint at byte {0} overflows 64 bits")]
    VarintOverflow(usize),
    #[error("field {field} at byte {at}: length {len} runs past the end of the message ({remaining} bytes left)")]
    TruncatedField {
        field: u32,
        at: usize,
        len: u64,
        remaining: usize,
    },
    #[error("invalid wire type {wire_type} for field {field} at byte {at}")]
    BadWireType {
        field: u32,
        wire_type: u8,
        at: usize,
    },
    #[error("field number 0 at byte {0}")]
    ZeroField(usize),
    #[error("message nested deeper than {0} levels")]
    TooDeep(usize),
}

/// One field's value as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    /// Length-delimited: bytes, string, embedded message or packed repeated field.
    Len(&'a [u8]),
}

impl<'a> Value<'a> {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Varint(v) | Value::Fixed64(v) => Some(v),
            Value::Fixed32(v) => Some(v as u64),
            Value::Len(_) => None,
        }
    }
    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Value::Len(b) => Some(b),
            _ => None,
        }
    }
}

/// Iterates over the fields of one message. Yields `(field_number, value, offset_of_value)`.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            failed: false,
        }
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, WireError> {
        // Tags, lengths of short fields and small enums are one byte: the common case.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(b as u64);
            }
        }
        self.varint_slow()
    }

    #[inline(never)]
    fn varint_slow(&mut self) -> Result<u64, WireError> {
        let start = self.pos;
        let mut out: u64 = 0;
        for shift in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(WireError::TruncatedVarint(start));
            };
            self.pos += 1;
            // The tenth byte holds bit 63 alone; more is an overflow, which decoders refuse.
            if shift == 9 && b > 1 {
                return Err(WireError::VarintOverflow(start));
            }
            out |= ((b & 0x7f) as u64) << (shift * 7);
            if b < 0x80 {
                return Ok(out);
            }
        }
        Err(WireError::TruncatedVarint(start))
    }

    /// The next field, `None` at the end, `Some(Err)` once on malformed input (then `None`).
    #[inline]
    pub fn next_field(&mut self) -> Option<Result<(u32, Value<'a>, usize), WireError>> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let r = self.read_field();
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }

    #[inline]
    fn read_field(&mut self) -> Result<(u32, Value<'a>, usize), WireError> {
        let at = self.pos;
        let key = self.varint()?;
        let field = (key >> 3) as u32;
        let wt = (key & 7) as u8;
        if field == 0 {
            return Err(WireError::ZeroField(at));
        }
        match wt {
            0 => {
                let off = self.pos;
                Ok((field, Value::Varint(self.varint()?), off))
            }
            1 => {
                let off = self.pos;
                let b = self.take(field, 8)?;
                Ok((
                    field,
                    Value::Fixed64(u64::from_le_bytes(b.try_into().expect("8 bytes"))),
                    off,
                ))
            }
            5 => {
                let off = self.pos;
                let b = self.take(field, 4)?;
                Ok((
                    field,
                    Value::Fixed32(u32::from_le_bytes(b.try_into().expect("4 bytes"))),
                    off,
                ))
            }
            2 => {
                let len = self.varint()?;
                let off = self.pos;
                let b = self.take(field, len)?;
                Ok((field, Value::Len(b), off))
            }
            _ => Err(WireError::BadWireType {
                field,
                wire_type: wt,
                at,
            }),
        }
    }

    #[inline]
    fn take(&mut self, field: u32, len: u64) -> Result<&'a [u8], WireError> {
        let remaining = self.buf.len() - self.pos;
        if len > remaining as u64 {
            return Err(WireError::TruncatedField {
                field,
                at: self.pos,
                len,
                remaining,
            });
        }
        let s = &self.buf[self.pos..self.pos + len as usize];
        self.pos += len as usize;
        Ok(s)
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<(u32, Value<'a>, usize), WireError>;
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.next_field()
    }
}

/// Returns the sub-slice of `parent` that `child` points into, without copying.
pub fn slice_ref(parent: &Bytes, child: &[u8]) -> Bytes {
    if child.is_empty() {
        return Bytes::new();
    }
    parent.slice_ref(child)
}

pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

pub fn put_varint(buf: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// Writes a length-delimited field header (tag + length).
pub fn put_len_header(buf: &mut impl BufMut, field: u32, len: usize) {
    put_varint(buf, ((field as u64) << 3) | 2);
    put_varint(buf, len as u64);
}

/// Writes a whole length-delimited field.
pub fn put_len_field(buf: &mut impl BufMut, field: u32, bytes: &[u8]) {
    put_len_header(buf, field, bytes.len());
    buf.put_slice(bytes);
}

/// Size of a length-delimited field with a body of `len` bytes.
pub fn len_field_size(field: u32, len: usize) -> usize {
    varint_len(((field as u64) << 3) | 2) + varint_len(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_roundtrip_and_len() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "len of {v}");
            let mut r = Reader::new(&[]);
            r.buf = &b;
            assert_eq!(r.varint().unwrap(), v);
        }
    }

    #[test]
    fn truncated_inputs_are_errors_not_panics() {
        // field 1, len 10, only 2 bytes
        let b = [0x0a, 10, 1, 2];
        let mut r = Reader::new(&b);
        assert!(matches!(
            r.next_field(),
            Some(Err(WireError::TruncatedField { .. }))
        ));
        assert!(r.next_field().is_none());
        let b = [0x08, 0xff];
        assert!(matches!(
            Reader::new(&b).next_field(),
            Some(Err(WireError::TruncatedVarint(_)))
        ));
        let b = [0x0b];
        assert!(matches!(
            Reader::new(&b).next_field(),
            Some(Err(WireError::BadWireType { .. }))
        ));
        // Ten bytes whose last sets bits past 63.
        let mut b = vec![0x08];
        b.extend([0xff; 9]);
        b.push(0x02);
        assert!(matches!(
            Reader::new(&b).next_field(),
            Some(Err(WireError::VarintOverflow(1)))
        ));
        b[10] = 0x01;
        assert_eq!(
            Reader::new(&b).next_field().map(|r| r.map(|(_, v, _)| v)),
            Some(Ok(Value::Varint(u64::MAX)))
        );
    }
}
