//! MySQL client/server protocol framing for one direction of a socket.
//!
//! Every packet is a 3-byte little-endian payload length, a sequence id and the payload, so
//! packets are framed by count whether their bytes were captured or not. In the command phase
//! a client packet with sequence id 0 is a command; the server packet with sequence id 1 that
//! follows is the first packet of its response (OK, ERR, EOF or a result set header), and the
//! rest of the response (column definitions, rows) is framed and ignored. The connection phase
//! (greeting seq 0, authentication seq 1.., auth result seq 2..) is framed and not emitted.

use super::{text, Carries, Message, ParseStats, Parsed, Request, Response, SegMeta, MAX_FIELD};

/// Payload bytes kept per packet (enough for a statement prefix or an ERR message).
const KEEP: usize = MAX_FIELD + 1;

/// A MySQL command byte's name, and whether the server answers it.
fn command(b: u8) -> Option<(&'static str, bool)> {
    Some(match b {
        0x01 => ("COM_QUIT", false),
        0x02 => ("COM_INIT_DB", true),
        0x03 => ("COM_QUERY", true),
        0x04 => ("COM_FIELD_LIST", true),
        0x07 => ("COM_REFRESH", true),
        0x08 => ("COM_STATISTICS", true),
        0x0e => ("COM_PING", true),
        0x11 => ("COM_CHANGE_USER", true),
        0x16 => ("COM_STMT_PREPARE", true),
        0x17 => ("COM_STMT_EXECUTE", true),
        0x18 => ("COM_STMT_SEND_LONG_DATA", false),
        0x19 => ("COM_STMT_CLOSE", false),
        0x1a => ("COM_STMT_RESET", true),
        0x1b => ("COM_SET_OPTION", true),
        0x1c => ("COM_STMT_FETCH", true),
        0x1f => ("COM_RESET_CONNECTION", true),
        _ => return None,
    })
}

/// A confident guess from a socket's first bytes: a server greeting (protocol 10) or a command.
pub fn detect(data: &[u8]) -> Option<Carries> {
    if data.len() < 5 {
        return None;
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], 0]) as usize;
    let seq = data[3];
    let payload = &data[4..];
    if seq != 0 || len == 0 {
        return None;
    }
    if payload[0] == 0x0a && len > 20 {
        // Greeting: protocol 10, then a NUL-terminated printable server version.
        let v = &payload[1..];
        let nul = v.iter().position(|&b| b == 0)?;
        return (nul > 0 && v[..nul].iter().all(|b| b.is_ascii_graphic()))
            .then_some(Carries::Responses);
    }
    // A command that fills exactly the bytes the syscall moved (checked by the caller's data).
    if len == payload.len() && command(payload[0]).is_some() {
        if payload[0] == 0x03 || payload[0] == 0x16 {
            // A statement: printable text.
            let sql = &payload[1..];
            if sql.is_empty()
                || !sql
                    .iter()
                    .take(64)
                    .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
            {
                return None;
            }
        }
        return Some(Carries::Requests);
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting the 4-byte packet header.
    Header,
    /// In a payload: bytes left.
    Payload(u64),
    Lost,
}

#[derive(Debug)]
pub struct MysqlParser {
    carries: Carries,
    state: State,
    header: Vec<u8>,
    seq_id: u8,
    meta: SegMeta,
    payload: Vec<u8>,
    partial: bool,
    pub stats: ParseStats,
}

impl MysqlParser {
    pub fn new(carries: Carries) -> MysqlParser {
        MysqlParser {
            carries,
            state: State::Header,
            header: Vec::with_capacity(4),
            seq_id: 0,
            meta: SegMeta::default(),
            payload: Vec::new(),
            partial: false,
            stats: ParseStats::default(),
        }
    }

    pub fn feed(&mut self, meta: SegMeta, data: &[u8], missing: u64, out: &mut Vec<Parsed>) {
        if self.state == State::Lost {
            // Resynchronise on a segment that starts a command or a response's first packet.
            let ok = data.len() >= 5 && {
                let len = u32::from_le_bytes([data[0], data[1], data[2], 0]) as u64;
                let expect = match self.carries {
                    Carries::Requests => 0,
                    Carries::Responses => 1,
                };
                len > 0 && data[3] == expect && len + 4 <= data.len() as u64 + missing
            };
            if !ok {
                self.stats.garbage += 1;
                return;
            }
            self.state = State::Header;
        }
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Header => {
                    if self.header.is_empty() {
                        self.meta = meta.at(i);
                    }
                    let take = (4 - self.header.len()).min(data.len() - i);
                    self.header.extend_from_slice(&data[i..i + take]);
                    i += take;
                    if self.header.len() == 4 {
                        let h = &self.header;
                        let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as u64;
                        self.seq_id = h[3];
                        self.header.clear();
                        self.payload.clear();
                        self.partial = false;
                        if len == 0 {
                            self.packet(out);
                        } else {
                            self.state = State::Payload(len);
                        }
                    }
                }
                State::Payload(left) => {
                    let take = ((data.len() - i) as u64).min(left) as usize;
                    let room = KEEP.saturating_sub(self.payload.len());
                    self.payload.extend_from_slice(&data[i..i + take.min(room)]);
                    i += take;
                    if take as u64 == left {
                        self.state = State::Header;
                        self.packet(out);
                    } else {
                        self.state = State::Payload(left - take as u64);
                    }
                }
                State::Lost => return,
            }
        }
        if missing > 0 {
            match self.state {
                State::Payload(left) if missing <= left => {
                    self.partial = true;
                    if missing == left {
                        self.state = State::Header;
                        self.packet(out);
                    } else {
                        self.state = State::Payload(left - missing);
                    }
                }
                State::Lost => {}
                _ => {
                    self.stats.lost += 1;
                    self.header.clear();
                    self.state = State::Lost;
                }
            }
        }
    }

    /// A whole packet has been framed (payload possibly cut to its first bytes).
    fn packet(&mut self, out: &mut Vec<Parsed>) {
        let p = &self.payload;
        let msg = match self.carries {
            Carries::Requests if self.seq_id == 0 => {
                let Some(&cmd) = p.first() else {
                    self.stats.garbage += 1;
                    return;
                };
                let Some((name, answered)) = command(cmd) else {
                    self.stats.garbage += 1;
                    return;
                };
                let arg = match cmd {
                    0x02 | 0x03 | 0x16 => text(&p[1..]),
                    0x17 | 0x19 | 0x1a | 0x1c if p.len() >= 5 => {
                        u32::from_le_bytes([p[1], p[2], p[3], p[4]]).to_string()
                    }
                    _ => String::new(),
                };
                let truncated = self.partial && p.len() >= KEEP;
                let statement = if cmd == 0x03 || cmd == 0x16 {
                    arg.clone()
                } else {
                    String::new()
                };
                Message::Request(Request {
                    method: name.to_string(),
                    resource: arg,
                    statement,
                    one_way: !answered,
                    truncated,
                    ..Request::default()
                })
            }
            Carries::Responses if self.seq_id == 1 => {
                let mut r = Response::default();
                match p.first() {
                    Some(0x00) => r.affected_rows = p.get(1..).and_then(lenenc),
                    Some(0xff) => {
                        r.error = true;
                        if p.len() >= 3 {
                            r.code = Some(u16::from_le_bytes([p[1], p[2]]) as u32);
                        }
                        // `#` and a 5-byte SQL state precede the message (protocol 4.1).
                        let msg = match p.get(3) {
                            Some(b'#') => p.get(9..),
                            _ => p.get(3..),
                        };
                        r.message = msg.map(text).filter(|m| !m.is_empty());
                    }
                    Some(_) => {}
                    None => {
                        self.stats.garbage += 1;
                        return;
                    }
                }
                Message::Response(r)
            }
            // Handshake packets, and the rest of a multi-packet response.
            _ => return,
        };
        self.stats.messages += 1;
        if self.partial {
            self.stats.truncated += 1;
        }
        out.push(Parsed {
            meta: self.meta,
            msg,
        });
    }
}

/// A length-encoded integer.
fn lenenc(b: &[u8]) -> Option<u64> {
    let (&first, rest) = b.split_first()?;
    let n = match first {
        0..=0xfa => return Some(first as u64),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let bytes = rest.get(..n)?;
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(bytes);
    Some(u64::from_le_bytes(v))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::testutil::{requests, responses, run};
    use super::super::{Parser, L7};
    use super::*;

    pub fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = len.to_le_bytes()[..3].to_vec();
        v.push(seq);
        v.extend_from_slice(payload);
        v
    }

    /// The start of a MySQL 8 greeting.
    pub fn greeting() -> Vec<u8> {
        let mut p = vec![0x0a];
        p.extend_from_slice(b"8.0.36\0");
        p.extend_from_slice(&[0x08, 0, 0, 0]);
        p.extend_from_slice(b"abcdefgh\0");
        p.extend_from_slice(&[0xff, 0xf7, 0xff, 0x02, 0x00]);
        p.extend_from_slice(b"mysql_native_password\0");
        packet(0, &p)
    }

    fn ok_packet(seq: u8, rows: u8) -> Vec<u8> {
        packet(seq, &[0x00, rows, 0x00, 0x02, 0x00, 0x00, 0x00])
    }

    fn err_packet(seq: u8) -> Vec<u8> {
        let mut p = vec![0xff, 0x7a, 0x04, b'#'];
        p.extend_from_slice(b"42S02");
        p.extend_from_slice(b"Table 'shop.nope' doesn't exist");
        packet(seq, &p)
    }

    #[test]
    fn handshake_commands_and_responses() {
        let mut client = Parser::new(L7::Mysql, Carries::Requests);
        let mut server = Parser::new(L7::Mysql, Carries::Responses);
        let auth = packet(1, &[0x8d, 0xa6, 0xff, 0x01, 0, 0, 0, 1, 0x21]);
        let q1 = packet(
            0,
            &[&[0x03][..], b"SELECT id FROM orders WHERE id = 7"].concat(),
        );
        let close = packet(0, &[0x19, 1, 0, 0, 0]);
        let q2 = packet(0, &[&[0x03][..], b"INSERT INTO nope VALUES (1)"].concat());
        let reqs = run(
            &mut client,
            &[(&auth, 0), (&q1, 0), (&[close, q2].concat(), 0)],
        );
        let r = requests(&reqs);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].method, "COM_QUERY");
        assert_eq!(r[0].statement, "SELECT id FROM orders WHERE id = 7");
        assert!(!r[0].one_way);
        assert_eq!(r[1].method, "COM_STMT_CLOSE");
        assert_eq!(r[1].resource, "1");
        assert!(r[1].one_way);
        assert_eq!(r[2].method, "COM_QUERY");

        // Greeting and auth OK are not responses; a result set (column count, column def, row,
        // EOF) counts once; then OK and ERR.
        let result_set = [
            packet(1, &[0x01]),
            packet(2, b"\x03def\x04shop\x06orders\x06orders\x02id\x02id\x0c"),
            packet(3, b"\x017"),
            packet(4, &[0xfe, 0, 0, 0x02, 0]),
        ]
        .concat();
        let resps = run(
            &mut server,
            &[
                (&greeting(), 0),
                (&ok_packet(2, 0), 0),
                (&result_set, 0),
                (&ok_packet(1, 3), 0),
                (&err_packet(1), 0),
            ],
        );
        let s = responses(&resps);
        assert_eq!(s.len(), 3, "{s:?}");
        assert!(!s[0].error);
        assert_eq!(s[1].affected_rows, Some(3));
        assert!(s[2].error);
        assert_eq!(s[2].code, Some(1146));
        assert_eq!(
            s[2].message.as_deref(),
            Some("Table 'shop.nope' doesn't exist")
        );
    }

    #[test]
    fn packets_split_and_large_uncaptured_payloads() {
        let q = packet(0, &[&[0x03][..], b"SELECT 1"].concat());
        for cut in 1..q.len() {
            let mut c = Parser::new(L7::Mysql, Carries::Requests);
            let (a, b) = q.split_at(cut);
            let out = run(&mut c, &[(a, 0), (b, 0)]);
            assert_eq!(requests(&out).len(), 1, "cut at {cut}");
            assert_eq!(out[0].meta.seq, 1000);
        }
        // A 2 MB statement of which 100 bytes were captured, then a ping.
        let mut big = vec![0u8; 4];
        big[..3].copy_from_slice(&2_000_001u32.to_le_bytes()[..3]);
        big.push(0x03);
        big.extend_from_slice(&[b'x'; 95]);
        let mut c = Parser::new(L7::Mysql, Carries::Requests);
        let out = run(&mut c, &[(&big, 2_000_001 - 96), (&packet(0, &[0x0e]), 0)]);
        let r = requests(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].method, "COM_PING");
        assert_eq!(c.stats().truncated, 1);
    }

    #[test]
    fn garbage_and_truncation_never_panic() {
        let mut c = Parser::new(L7::Mysql, Carries::Requests);
        // Unknown command byte, an empty payload, a header cut by a gap, then a good command.
        let out = run(
            &mut c,
            &[
                (&packet(0, &[0xee, 1, 2]), 0),
                (&packet(0, &[]), 0),
                (&[5, 0], 9),
                (b"zz", 0),
                (&packet(0, &[0x0e]), 0),
            ],
        );
        assert_eq!(requests(&out).len(), 1);
        let st = c.stats();
        assert_eq!(st.garbage, 3);
        assert_eq!(st.lost, 1);
        let junk: Vec<u8> = (0..=255u8).rev().cycle().take(4000).collect();
        for cut in (0..junk.len()).step_by(61) {
            let mut s = Parser::new(L7::Mysql, Carries::Responses);
            let _ = run(&mut s, &[(&junk[cut..], 3), (&junk[..cut], 0)]);
        }
        assert_eq!(lenenc(&[0xfc, 1]), None);
        assert_eq!(lenenc(&[0xfc, 1, 1]), Some(257));
    }
}
