//! User-space L7 parsers for the bytes the kernel side captures.
//!
//! The kernel copies only the first bytes of each syscall's payload and says how many bytes the
//! syscall moved in all, so a direction of a socket arrives as a sequence of segments: a captured
//! prefix followed by `missing` bytes nobody saw. Each parser is a per-direction state machine
//! that frames messages (HTTP/1.x heads and bodies, RESP values, MySQL packets) across segment
//! boundaries and across the unseen bytes whenever the framing says how long they are (a body
//! length, a bulk string length, a packet length). When it cannot (a head cut by the capture
//! limit, garbage), it emits what it has, marks the direction lost and resynchronises at the next
//! segment that starts like a message. Nothing here panics on any input; every oddity is counted
//! in [`ParseStats`].
//!
//! # Layout
//! - [`http`]: HTTP/1.x requests and responses (keep-alive, pipelining, chunked, split heads).
//! - [`redis`]: RESP2/RESP3 commands and replies (pipelining, inline commands).
//! - [`mysql`]: MySQL client commands and the first packet of each response.

pub mod http;
pub mod mysql;
pub mod redis;

/// The L7 protocol of a socket, with DeepFlow's ids (`ebpf-spans.md` §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L7 {
    Http1,
    Redis,
    Mysql,
}

impl L7 {
    pub fn id(self) -> u8 {
        match self {
            L7::Http1 => 20,
            L7::Redis => 80,
            L7::Mysql => 60,
        }
    }
    /// The name DeepFlow exports in `df.application.l7_protocol`.
    pub fn name(self) -> &'static str {
        match self {
            L7::Http1 => "HTTP",
            L7::Redis => "Redis",
            L7::Mysql => "MySQL",
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            L7::Http1 => "http1",
            L7::Redis => "redis",
            L7::Mysql => "mysql",
        }
    }
}

/// What one direction of a socket carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carries {
    Requests,
    Responses,
}

/// Where a segment sits: copied from the syscall event, so a message can say where it began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegMeta {
    /// Wall-clock time of the syscall (exit), ns since the Unix epoch.
    pub ts_ns: u64,
    /// TCP sequence number of the segment's first byte.
    pub seq: u32,
    pub tid: u32,
    /// The thread's syscall trace id at this syscall.
    pub trace_id: u64,
    /// Per-socket capture sequence of the syscall.
    pub cap_seq: u32,
}

impl SegMeta {
    /// The same syscall, `off` bytes in: a pipelined message's own sequence number.
    pub fn at(&self, off: usize) -> SegMeta {
        SegMeta {
            seq: self.seq.wrapping_add(off as u32),
            ..*self
        }
    }
}

/// A parsed request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// HTTP method, Redis command (upper case), MySQL command name (`COM_QUERY`).
    pub method: String,
    /// HTTP request target, Redis key, MySQL statement (truncated to [`MAX_FIELD`]).
    pub resource: String,
    /// HTTP version (`1.1`).
    pub version: String,
    /// The whole Redis command line or SQL statement, bounded.
    pub statement: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub x_request_id: Option<String>,
    /// The protocol sends no answer to this request (MySQL `COM_QUIT`, `COM_STMT_CLOSE`).
    pub one_way: bool,
    /// The head or command was cut by the capture limit or a gap: fields may be partial.
    pub truncated: bool,
}

/// A parsed response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code; MySQL error code for ERR packets.
    pub code: Option<u32>,
    /// The response reports a failure (HTTP 4xx/5xx, RESP error, MySQL ERR).
    pub error: bool,
    /// Error text (RESP error, MySQL ERR message), bounded.
    pub message: Option<String>,
    pub x_request_id: Option<String>,
    /// MySQL OK: affected rows.
    pub affected_rows: Option<u64>,
    pub truncated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    Response(Response),
}

/// One framed message and the syscall it began in (sequence number adjusted to its first byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub meta: SegMeta,
    pub msg: Message,
}

/// Counters a parser keeps; the receiver turns them into metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseStats {
    pub messages: u64,
    /// Messages emitted with partial fields (capture limit, gap in the stream).
    pub truncated: u64,
    /// Segments that did not start like a message where one was expected.
    pub garbage: u64,
    /// Times the parser lost framing and waited for the next message start.
    pub lost: u64,
}

/// Longest string field kept from a message.
pub const MAX_FIELD: usize = 1024;

/// Bounded lossy UTF-8.
pub(crate) fn text(b: &[u8]) -> String {
    let b = &b[..b.len().min(MAX_FIELD)];
    String::from_utf8_lossy(b).into_owned()
}

/// A direction's parser, whatever the protocol.
#[derive(Debug)]
pub enum Parser {
    Http(http::HttpParser),
    Redis(redis::RespParser),
    Mysql(mysql::MysqlParser),
}

impl Parser {
    pub fn new(l7: L7, carries: Carries) -> Parser {
        match l7 {
            L7::Http1 => Parser::Http(http::HttpParser::new(carries)),
            L7::Redis => Parser::Redis(redis::RespParser::new(carries)),
            L7::Mysql => Parser::Mysql(mysql::MysqlParser::new(carries)),
        }
    }

    /// Feeds one segment: `data` was captured, `missing` more bytes followed unseen.
    pub fn feed(&mut self, meta: SegMeta, data: &[u8], missing: u64, out: &mut Vec<Parsed>) {
        match self {
            Parser::Http(p) => p.feed(meta, data, missing, out),
            Parser::Redis(p) => p.feed(meta, data, missing, out),
            Parser::Mysql(p) => p.feed(meta, data, missing, out),
        }
    }

    pub fn stats(&self) -> ParseStats {
        match self {
            Parser::Http(p) => p.stats,
            Parser::Redis(p) => p.stats,
            Parser::Mysql(p) => p.stats,
        }
    }
}

/// Guesses the protocol and what this direction carries from the first bytes a socket moved.
/// `None`: not recognised (yet).
pub fn detect(data: &[u8]) -> Option<(L7, Carries)> {
    if http::looks_like_request(data) {
        return Some((L7::Http1, Carries::Requests));
    }
    if http::looks_like_response(data) {
        return Some((L7::Http1, Carries::Responses));
    }
    if let Some(c) = mysql::detect(data) {
        return Some((L7::Mysql, c));
    }
    if let Some(c) = redis::detect(data) {
        return Some((L7::Redis, c));
    }
    None
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub fn meta(seq: u32, ts: u64) -> SegMeta {
        SegMeta {
            ts_ns: ts,
            seq,
            tid: 7,
            trace_id: 1,
            cap_seq: 0,
        }
    }

    /// Feeds `segments` (captured bytes, missing count) with consecutive sequence numbers.
    pub fn run(p: &mut Parser, segments: &[(&[u8], u64)]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut seq = 1000u32;
        for (i, (d, missing)) in segments.iter().enumerate() {
            p.feed(meta(seq, i as u64 + 1), d, *missing, &mut out);
            seq = seq.wrapping_add(d.len() as u32 + *missing as u32);
        }
        out
    }

    pub fn requests(v: &[Parsed]) -> Vec<&Request> {
        v.iter()
            .filter_map(|p| match &p.msg {
                Message::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    pub fn responses(v: &[Parsed]) -> Vec<&Response> {
        v.iter()
            .filter_map(|p| match &p.msg {
                Message::Response(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_protocol_and_direction() {
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\n"),
            Some((L7::Http1, Carries::Requests))
        );
        assert_eq!(
            detect(b"HTTP/1.1 200 OK\r\n"),
            Some((L7::Http1, Carries::Responses))
        );
        assert_eq!(
            detect(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            Some((L7::Redis, Carries::Requests))
        );
        assert_eq!(detect(b"+OK\r\n"), Some((L7::Redis, Carries::Responses)));
        let q = mysql::tests::packet(0, &[&[3u8][..], b"SELECT 1"].concat());
        assert_eq!(detect(&q), Some((L7::Mysql, Carries::Requests)));
        assert_eq!(
            detect(&mysql::tests::greeting()),
            Some((L7::Mysql, Carries::Responses))
        );
        assert_eq!(detect(b"\x16\x03\x01\x02\x00"), None);
        assert_eq!(detect(b""), None);
    }
}
