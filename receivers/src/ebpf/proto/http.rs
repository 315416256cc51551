//! HTTP/1.x framing for one direction of a socket.
//!
//! A message is a head (start line and headers, up to the blank line) and a body whose length
//! the head gives: `Content-Length`, `Transfer-Encoding: chunked`, none (requests, 1xx/204/304),
//! or until the connection closes. Body bytes are skipped by count, so bodies the kernel did not
//! copy cost nothing and keep-alive/pipelined messages stay framed. The message is emitted when
//! its head is complete; its metadata is that of the segment the head began in.

use super::{text, Carries, Message, ParseStats, Parsed, Request, Response, SegMeta};

/// Longest head kept across segments; a longer one is emitted truncated.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 1024;

const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];

/// The bytes start an HTTP/1 request line (`GET /x HTTP/1.1`).
pub fn looks_like_request(data: &[u8]) -> bool {
    METHODS
        .iter()
        .any(|m| data.len() > m.len() && data.starts_with(m) && data[m.len()] == b' ')
}

/// The bytes start an HTTP/1 status line.
pub fn looks_like_response(data: &[u8]) -> bool {
    data.starts_with(b"HTTP/1.")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages.
    Start,
    /// Collecting the head in `head`.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Collecting a chunk-size line.
    ChunkLine,
    /// Skipping chunk data plus its CRLF.
    ChunkData(u64),
    /// Collecting trailer lines after the last chunk.
    Trailers,
    /// Body runs to the end of the connection.
    UntilClose,
    /// Framing lost: waiting for a segment that starts a message.
    Lost,
}

#[derive(Debug)]
pub struct HttpParser {
    carries: Carries,
    state: State,
    head: Vec<u8>,
    /// Metadata of the segment (and offset) the current head began in.
    head_meta: SegMeta,
    line: Vec<u8>,
    pub stats: ParseStats,
}

/// What a head says about the body that follows.
enum BodyLen {
    None,
    Fixed(u64),
    Chunked,
    UntilClose,
}

impl HttpParser {
    pub fn new(carries: Carries) -> HttpParser {
        HttpParser {
            carries,
            state: State::Start,
            head: Vec::new(),
            head_meta: SegMeta::default(),
            line: Vec::new(),
            stats: ParseStats::default(),
        }
    }

    fn starts_message(&self, data: &[u8]) -> bool {
        match self.carries {
            Carries::Requests => looks_like_request(data),
            Carries::Responses => looks_like_response(data),
        }
    }

    /// `data` starts a message, or is too short to tell but is a prefix of a start line.
    fn may_start_message(&self, data: &[u8]) -> bool {
        if self.starts_message(data) {
            return true;
        }
        data.len() < 8
            && match self.carries {
                Carries::Requests => METHODS.iter().any(|m| {
                    let full = [*m, b" "].concat();
                    full.starts_with(data) || data.starts_with(&full)
                }),
                Carries::Responses => b"HTTP/1.".starts_with(data),
            }
    }

    /// A segment start that is certainly a new message: a full start line, not body bytes that
    /// happen to begin with a method name.
    fn strongly_starts_message(&self, data: &[u8]) -> bool {
        if !self.starts_message(data) {
            return false;
        }
        let line_end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
        let line = &data[..line_end];
        match self.carries {
            Carries::Requests => line.windows(7).any(|w| w == b"HTTP/1."),
            Carries::Responses => {
                line.len() >= 12 && line[8] == b' ' && line[9..12].iter().all(u8::is_ascii_digit)
            }
        }
    }

    pub fn feed(&mut self, meta: SegMeta, data: &[u8], missing: u64, out: &mut Vec<Parsed>) {
        match self.state {
            State::Lost => {
                if !self.starts_message(data) {
                    self.stats.garbage += 1;
                    return;
                }
                self.state = State::Start;
            }
            State::Body(_) | State::ChunkData(_) | State::ChunkLine | State::UntilClose
                if self.strongly_starts_message(data) =>
            {
                // The previous body was shorter than framed (a HEAD response, a lost segment):
                // the new start line is the better evidence.
                self.stats.lost += 1;
                self.state = State::Start;
            }
            _ => {}
        }
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Start => {
                    if data[i] == b'\r' || data[i] == b'\n' {
                        i += 1;
                        continue;
                    }
                    if !self.may_start_message(&data[i..]) {
                        self.stats.garbage += 1;
                        self.state = State::Lost;
                        return;
                    }
                    self.head.clear();
                    self.head_meta = meta.at(i);
                    self.state = State::Head;
                }
                State::Head => {
                    let before = self.head.len();
                    let room = MAX_HEAD.saturating_sub(before);
                    let take = (data.len() - i).min(room);
                    self.head.extend_from_slice(&data[i..i + take]);
                    let from = before.saturating_sub(3);
                    match find(&self.head[from..], b"\r\n\r\n") {
                        Some(p) => {
                            let end = from + p + 4;
                            i += end - before;
                            self.head.truncate(end);
                            self.finish_head(false, out);
                        }
                        None if take < data.len() - i || self.head.len() >= MAX_HEAD => {
                            self.finish_head(true, out);
                            self.state = State::Lost;
                            self.stats.lost += 1;
                            return;
                        }
                        None => i += take,
                    }
                }
                State::Body(n) => {
                    let take = ((data.len() - i) as u64).min(n);
                    i += take as usize;
                    self.state = if n == take {
                        State::Start
                    } else {
                        State::Body(n - take)
                    };
                }
                State::ChunkData(n) => {
                    let take = ((data.len() - i) as u64).min(n);
                    i += take as usize;
                    self.state = if n == take {
                        State::ChunkLine
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::ChunkLine | State::Trailers => {
                    let nl = data[i..].iter().position(|&b| b == b'\n');
                    let end = nl.map_or(data.len(), |p| i + p + 1);
                    self.line.extend_from_slice(&data[i..end]);
                    i = end;
                    if self.line.len() > MAX_LINE {
                        self.stats.garbage += 1;
                        self.lose();
                        return;
                    }
                    if nl.is_none() {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = trim_crlf(&line);
                    if self.state == State::Trailers {
                        if line.is_empty() {
                            self.state = State::Start;
                        }
                        continue;
                    }
                    if line.is_empty() {
                        // The CRLF that ends a chunk's data.
                        continue;
                    }
                    let hex = line.split(|&b| b == b';').next().unwrap_or(line);
                    match parse_hex(hex) {
                        Some(0) => self.state = State::Trailers,
                        // The data and its trailing CRLF.
                        Some(n) => self.state = State::ChunkData(n),
                        None => {
                            self.stats.garbage += 1;
                            self.lose();
                            return;
                        }
                    }
                }
                State::UntilClose => i = data.len(),
                State::Lost => return,
            }
        }
        if missing > 0 {
            self.skip_missing(missing, out);
        }
    }

    fn lose(&mut self) {
        self.line.clear();
        self.state = State::Lost;
        self.stats.lost += 1;
    }

    /// Bytes nobody saw: fine inside a body of known length, framing is lost anywhere else.
    fn skip_missing(&mut self, missing: u64, out: &mut Vec<Parsed>) {
        match self.state {
            State::Body(n) if missing <= n => {
                self.state = if n == missing {
                    State::Start
                } else {
                    State::Body(n - missing)
                };
            }
            State::ChunkData(n) if missing <= n => self.state = State::ChunkData(n - missing),
            State::UntilClose | State::Lost => {}
            State::Head => {
                self.finish_head(true, out);
                self.lose();
            }
            _ => self.lose(),
        }
    }

    /// Parses the collected head, emits the message and sets up the body.
    fn finish_head(&mut self, truncated: bool, out: &mut Vec<Parsed>) {
        let head = std::mem::take(&mut self.head);
        let mut lines = head.split(|&b| b == b'\n').map(trim_crlf);
        let first = lines.next().unwrap_or(&[]);
        let mut headers = Headers::default();
        for l in lines {
            if l.is_empty() {
                break;
            }
            headers.add(l);
        }
        if truncated {
            self.stats.truncated += 1;
        }
        self.stats.messages += 1;
        let body = match self.carries {
            Carries::Requests => {
                let mut parts = first.splitn(3, |&b| b == b' ');
                let method = parts.next().unwrap_or(&[]);
                let target = parts.next().unwrap_or(&[]);
                let version = parts.next().unwrap_or(&[]);
                out.push(Parsed {
                    meta: self.head_meta,
                    msg: Message::Request(Request {
                        method: text(method),
                        resource: text(target),
                        version: text(version.strip_prefix(b"HTTP/").unwrap_or(version)),
                        statement: String::new(),
                        traceparent: headers.traceparent,
                        tracestate: headers.tracestate,
                        x_request_id: headers.x_request_id,
                        one_way: false,
                        truncated,
                    }),
                });
                if headers.chunked {
                    BodyLen::Chunked
                } else {
                    headers.content_length.map_or(BodyLen::None, BodyLen::Fixed)
                }
            }
            Carries::Responses => {
                let code = first
                    .get(9..12)
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .and_then(|c| c.parse::<u32>().ok());
                out.push(Parsed {
                    meta: self.head_meta,
                    msg: Message::Response(Response {
                        code,
                        error: code.is_some_and(|c| c >= 400),
                        message: None,
                        x_request_id: headers.x_request_id,
                        affected_rows: None,
                        truncated,
                    }),
                });
                match code {
                    Some(c) if (100..200).contains(&c) || c == 204 || c == 304 => BodyLen::None,
                    _ if headers.chunked => BodyLen::Chunked,
                    _ => headers
                        .content_length
                        .map_or(BodyLen::UntilClose, BodyLen::Fixed),
                }
            }
        };
        self.state = match body {
            BodyLen::None | BodyLen::Fixed(0) => State::Start,
            BodyLen::Fixed(n) => State::Body(n),
            BodyLen::Chunked => State::ChunkLine,
            BodyLen::UntilClose => State::UntilClose,
        };
        self.head = head;
        self.head.clear();
    }
}

#[derive(Default)]
struct Headers {
    content_length: Option<u64>,
    chunked: bool,
    traceparent: Option<String>,
    tracestate: Option<String>,
    x_request_id: Option<String>,
}

impl Headers {
    fn add(&mut self, line: &[u8]) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let name = &line[..colon];
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            self.content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.chunked = value
                .split(|&b| b == b',')
                .any(|v| trim(v).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"traceparent") {
            self.traceparent = Some(text(value));
        } else if name.eq_ignore_ascii_case(b"tracestate") {
            self.tracestate = Some(text(value));
        } else if name.eq_ignore_ascii_case(b"x-request-id") {
            self.x_request_id = Some(text(value));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim_crlf(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |p| p + 1);
    &v[start..end]
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    let s = trim(s);
    if s.is_empty() || s.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// A W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`): trace id and parent span id.
pub fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let t: [u8; 16] = tailweave_core::span::unhex(trace)?.try_into().ok()?;
    let s: [u8; 8] = tailweave_core::span::unhex(span)?.try_into().ok()?;
    if t == [0; 16] || s == [0; 8] {
        return None;
    }
    Some((t, s))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{requests, responses, run};
    use super::super::{Carries, Message, Parser};
    use super::*;

    fn req_parser() -> Parser {
        Parser::new(super::super::L7::Http1, Carries::Requests)
    }
    fn resp_parser() -> Parser {
        Parser::new(super::super::L7::Http1, Carries::Responses)
    }

    const GET: &[u8] = b"GET /api/cart?id=3 HTTP/1.1\r\nHost: shop\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: k=v\r\nX-Request-ID: rid-1\r\n\r\n";

    #[test]
    fn request_fields() {
        let mut p = req_parser();
        let out = run(&mut p, &[(GET, 0)]);
        let r = requests(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].method, "GET");
        assert_eq!(r[0].resource, "/api/cart?id=3");
        assert_eq!(r[0].version, "1.1");
        assert_eq!(
            r[0].traceparent.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(r[0].tracestate.as_deref(), Some("k=v"));
        assert_eq!(r[0].x_request_id.as_deref(), Some("rid-1"));
        assert!(!r[0].truncated);
        assert_eq!(out[0].meta.seq, 1000);
    }

    #[test]
    fn keep_alive_with_bodies_and_pipelining_in_one_write() {
        let post = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let two = [&post[..], GET].concat();
        let mut p = req_parser();
        // One write with two pipelined requests, then a third on the same connection.
        let out = run(&mut p, &[(&two, 0), (GET, 0)]);
        let r = requests(&out);
        assert_eq!(
            r.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(),
            ["POST", "GET", "GET"]
        );
        // The pipelined request's sequence number is that of its own first byte.
        assert_eq!(out[1].meta.seq, 1000 + post.len() as u32);
        assert_eq!(out[2].meta.seq, 1000 + two.len() as u32);
        assert_eq!(p.stats().garbage, 0);
    }

    #[test]
    fn request_split_over_several_writes() {
        let mut p = req_parser();
        let (a, rest) = GET.split_at(7);
        let (b, c) = rest.split_at(40);
        let out = run(&mut p, &[(a, 0), (b, 0), (c, 0)]);
        let r = requests(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].x_request_id.as_deref(), Some("rid-1"));
        // The message begins in the first write.
        assert_eq!(out[0].meta.ts_ns, 1);
        assert_eq!(out[0].meta.seq, 1000);
    }

    #[test]
    fn chunked_bodies_keep_framing() {
        let resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-ID: r2\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
        let next = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        let mut p = resp_parser();
        // Chunks split at awkward places, then the next response.
        let (a, b) = resp.split_at(70);
        let out = run(&mut p, &[(a, 0), (b, 0), (next, 0)]);
        let r = responses(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].code, Some(200));
        assert!(!r[0].error);
        assert_eq!(r[0].x_request_id.as_deref(), Some("r2"));
        assert_eq!(r[1].code, Some(503));
        assert!(r[1].error);
        assert_eq!(p.stats().garbage, 0);
        assert_eq!(p.stats().lost, 0);
    }

    #[test]
    fn uncaptured_body_bytes_are_skipped_by_count() {
        // A 100 000-byte body of which the kernel copied the first 10 bytes after the head.
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
        let first = [&head[..], &[b'x'; 10][..]].concat();
        let next = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let mut p = resp_parser();
        let out = run(&mut p, &[(&first, 50_000), (b"yyyy", 49_986), (next, 0)]);
        let codes: Vec<_> = responses(&out).iter().map(|r| r.code).collect();
        assert_eq!(codes, [Some(200), Some(404)]);
        assert_eq!(p.stats().lost, 0);
    }

    #[test]
    fn head_cut_by_capture_limit_is_emitted_truncated_then_resyncs() {
        let mut p = req_parser();
        let cut = &GET[..30];
        let out = run(
            &mut p,
            &[(cut, 200), (b"more header bytes\r\n\r\n", 0), (GET, 0)],
        );
        let r = requests(&out);
        assert_eq!(r.len(), 2);
        assert!(r[0].truncated);
        assert_eq!(r[0].method, "GET");
        assert_eq!(r[0].resource, "/api/cart?id=3");
        assert!(!r[1].truncated);
        let st = p.stats();
        assert_eq!(st.truncated, 1);
        assert_eq!(st.garbage, 1);
    }

    #[test]
    fn garbage_never_panics_and_is_counted() {
        let mut p = req_parser();
        let junk: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let out = run(
            &mut p,
            &[(&junk, 0), (&junk[..17], 5), (b"\r\n", 0), (b"GET", 0)],
        );
        assert!(requests(&out).is_empty());
        assert!(p.stats().garbage >= 2);
        // Every prefix of a valid request, and random cuts, never panic.
        for cut in 0..GET.len() {
            let mut p = req_parser();
            let _ = run(&mut p, &[(&GET[..cut], 3), (&GET[cut..], 0)]);
            let mut p = resp_parser();
            let _ = run(&mut p, &[(&GET[..cut], 0), (b"0\r\n", 1)]);
        }
        let mut p = resp_parser();
        let _ = run(
            &mut p,
            &[(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                0,
            )],
        );
        assert_eq!(p.stats().garbage, 1);
    }

    #[test]
    fn head_response_without_body_resyncs_on_next_status_line() {
        // A response to HEAD carries Content-Length but no body; the next status line wins.
        let mut p = resp_parser();
        let out = run(
            &mut p,
            &[
                (b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", 0),
                (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0),
            ],
        );
        assert_eq!(responses(&out).len(), 2);
        assert!(matches!(out[1].msg, Message::Response(_)));
    }

    #[test]
    fn traceparent_parsing() {
        let (t, s) =
            parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(t[0], 0x0a);
        assert_eq!(s[7], 0x31);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none()
        );
        assert!(
            parse_traceparent("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_none()
        );
        assert!(parse_traceparent("00-xyz-b7ad6b7169203331-01").is_none());
        assert!(parse_traceparent("").is_none());
    }
}
