//! The record the kernel side writes into the ring buffer (`struct event` in
//! `receivers/bpf/tailweave_socket.bpf.c`), decoded without copying its payload.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes before the payload in a record.
pub const HEADER_LEN: usize = 104;

/// Direction of a syscall relative to the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// write, writev, sendto, sendmsg.
    Egress = 0,
    /// read, readv, recvfrom, recvmsg.
    Ingress = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Data,
    Close,
}

/// One socket syscall as the kernel saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    /// CLOCK_MONOTONIC at syscall exit.
    pub mono_ns: u64,
    /// The socket's kernel address: its identity while it lives.
    pub sk: u64,
    pub trace_id: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    /// TCP sequence number of the first byte moved.
    pub seq: u32,
    /// Bytes the syscall moved.
    pub total_len: u32,
    pub kind: Kind,
    pub dir: Dir,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    /// The process name (thread group leader's comm).
    pub comm: &'a str,
    /// The captured prefix of the payload.
    pub data: &'a [u8],
}

/// Why a record could not be read (counted; never expected from a matching kernel object).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("record shorter than its header")]
    Short,
    #[error("payload length beyond the record")]
    Length,
    #[error("unknown kind or direction")]
    Enum,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(v)
}

fn addr(family: u8, b: &[u8]) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    if family == 2 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        let v6 = Ipv6Addr::from(a);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl<'a> Event<'a> {
    pub fn decode(b: &'a [u8]) -> Result<Event<'a>, EventError> {
        if b.len() < HEADER_LEN {
            return Err(EventError::Short);
        }
        let cap_len = u16_at(b, 44) as usize;
        let data = b
            .get(HEADER_LEN..HEADER_LEN + cap_len)
            .ok_or(EventError::Length)?;
        let kind = match b[46] {
            0 => Kind::Data,
            1 => Kind::Close,
            _ => return Err(EventError::Enum),
        };
        let dir = match b[47] {
            0 => Dir::Egress,
            1 => Dir::Ingress,
            _ => return Err(EventError::Enum),
        };
        let family = b[48];
        let comm = &b[88..104];
        let comm_len = comm.iter().position(|&c| c == 0).unwrap_or(16);
        Ok(Event {
            mono_ns: u64_at(b, 0),
            sk: u64_at(b, 8),
            trace_id: u64_at(b, 16),
            tgid: u32_at(b, 24),
            tid: u32_at(b, 28),
            fd: u32_at(b, 32),
            seq: u32_at(b, 36),
            total_len: u32_at(b, 40),
            kind,
            dir,
            local: (addr(family, &b[56..72]), u16_at(b, 50)),
            remote: (addr(family, &b[72..88]), u16_at(b, 52)),
            comm: std::str::from_utf8(&comm[..comm_len]).unwrap_or("?"),
            data,
        })
    }

    /// Encodes a record as the kernel would (tests and benches).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.mono_ns.to_le_bytes());
        b[8..16].copy_from_slice(&self.sk.to_le_bytes());
        b[16..24].copy_from_slice(&self.trace_id.to_le_bytes());
        b[24..28].copy_from_slice(&self.tgid.to_le_bytes());
        b[28..32].copy_from_slice(&self.tid.to_le_bytes());
        b[32..36].copy_from_slice(&self.fd.to_le_bytes());
        b[36..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..44].copy_from_slice(&self.total_len.to_le_bytes());
        b[44..46].copy_from_slice(&(self.data.len() as u16).to_le_bytes());
        b[46] = self.kind as u8;
        b[47] = self.dir as u8;
        let put = |b: &mut [u8], a: IpAddr| match a {
            IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
            IpAddr::V6(v) => b[..16].copy_from_slice(&v.octets()),
        };
        b[48] = if self.local.0.is_ipv4() { 2 } else { 10 };
        b[50..52].copy_from_slice(&self.local.1.to_le_bytes());
        b[52..54].copy_from_slice(&self.remote.1.to_le_bytes());
        put(&mut b[56..72], self.local.0);
        put(&mut b[72..88], self.remote.0);
        let c = self.comm.as_bytes();
        b[88..88 + c.len().min(15)].copy_from_slice(&c[..c.len().min(15)]);
        b.extend_from_slice(self.data);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_records() {
        let e = Event {
            mono_ns: 123,
            sk: 0xffff_8880_1234_5678,
            trace_id: 9,
            tgid: 10,
            tid: 11,
            fd: 5,
            seq: 0xfffffff0,
            total_len: 4000,
            kind: Kind::Data,
            dir: Dir::Ingress,
            local: ("127.0.0.1".parse().unwrap(), 8080),
            remote: ("10.1.2.3".parse().unwrap(), 40000),
            comm: "nginx",
            data: b"GET / HTTP/1.1\r\n",
        };
        let b = e.encode();
        assert_eq!(Event::decode(&b), Ok(e.clone()));
        assert_eq!(Event::decode(&b[..50]), Err(EventError::Short));
        assert_eq!(Event::decode(&b[..HEADER_LEN + 3]), Err(EventError::Length));
        let mut bad = b.clone();
        bad[47] = 9;
        assert_eq!(Event::decode(&bad), Err(EventError::Enum));
        let v6 = Event {
            local: ("::ffff:10.0.0.1".parse().unwrap(), 1),
            remote: ("fe80::1".parse().unwrap(), 2),
            ..e
        };
        let d = v6.encode();
        let back = Event::decode(&d).unwrap();
        assert_eq!(back.local.0, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(back.remote.0, "fe80::1".parse::<IpAddr>().unwrap());
    }
}
