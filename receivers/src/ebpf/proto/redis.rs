//! RESP (Redis serialization protocol, v2 and v3) framing for one direction of a socket.
//!
//! Requests are arrays of bulk strings (or inline commands, one line); replies are any RESP
//! value. Values nest, so framing keeps a stack of how many elements each open aggregate still
//! needs. Bulk payloads are skipped by count, seen or not. A message is emitted when its last
//! element is framed, with the metadata of the segment its first byte was in. Server pushes
//! (`>`) are framed but not emitted: they answer no request.

use super::{text, Carries, Message, ParseStats, Parsed, Request, Response, SegMeta, MAX_FIELD};

/// Longest simple line (`+OK`, `-ERR ...`, `:12`, `*3`) kept across segments.
const MAX_LINE: usize = 64 * 1024;
/// Deepest nesting followed before the stream counts as garbage.
const MAX_DEPTH: usize = 32;
/// Request arguments kept for the statement.
const MAX_ARGS: usize = 8;

/// The bytes start a RESP message: `Some(what it is)` for a confident guess.
pub fn detect(data: &[u8]) -> Option<Carries> {
    match data.first()? {
        b'*' => {
            // An array of bulk strings whose first is a command name: a request.
            let nl = data.iter().position(|&b| b == b'\n')?;
            let n = parse_int(trim_cr(&data[1..nl]))?;
            if n <= 0 || n > 1024 * 1024 {
                return None;
            }
            let rest = &data[nl + 1..];
            if rest.first() != Some(&b'$') {
                return None;
            }
            let nl2 = rest.iter().position(|&b| b == b'\n')?;
            let len = parse_int(trim_cr(&rest[1..nl2]))?;
            let name = rest.get(nl2 + 1..nl2 + 1 + usize::try_from(len).ok()?)?;
            (!name.is_empty() && name.iter().all(|b| b.is_ascii_alphabetic()))
                .then_some(Carries::Requests)
        }
        b'+' | b'-' | b':' | b'$' => {
            let nl = data.iter().position(|&b| b == b'\n')?;
            (nl >= 2 && data[nl - 1] == b'\r').then_some(Carries::Responses)
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting the type byte and line of the next element.
    Line,
    /// Skipping a bulk payload and its CRLF; `keep` bytes of it go to the current argument.
    Bulk {
        left: u64,
    },
    Lost,
}

#[derive(Debug)]
pub struct RespParser {
    carries: Carries,
    state: State,
    line: Vec<u8>,
    /// Elements still needed by each open aggregate.
    stack: Vec<u64>,
    /// A message is open (its first byte seen).
    open: bool,
    meta: SegMeta,
    /// The message being framed.
    args: Vec<Vec<u8>>,
    push: bool,
    error: Option<String>,
    truncated: bool,
    pub stats: ParseStats,
}

impl RespParser {
    pub fn new(carries: Carries) -> RespParser {
        RespParser {
            carries,
            state: State::Line,
            line: Vec::new(),
            stack: Vec::new(),
            open: false,
            meta: SegMeta::default(),
            args: Vec::new(),
            push: false,
            error: None,
            truncated: false,
            stats: ParseStats::default(),
        }
    }

    fn starts_message(&self, data: &[u8]) -> bool {
        match self.carries {
            // Inline commands are not trusted for resynchronising: body bytes look like them.
            Carries::Requests => detect(data) == Some(Carries::Requests),
            Carries::Responses => matches!(
                data.first(),
                Some(
                    b'+' | b'-'
                        | b':'
                        | b'$'
                        | b'*'
                        | b'_'
                        | b','
                        | b'#'
                        | b'!'
                        | b'='
                        | b'('
                        | b'%'
                        | b'~'
                        | b'>'
                        | b'|'
                )
            ),
        }
    }

    pub fn feed(&mut self, meta: SegMeta, data: &[u8], missing: u64, out: &mut Vec<Parsed>) {
        if self.state == State::Lost {
            if !self.starts_message(data) {
                self.stats.garbage += 1;
                return;
            }
            self.state = State::Line;
        }
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Line => {
                    if !self.open {
                        self.open = true;
                        self.meta = meta.at(i);
                        self.args.clear();
                        self.push = false;
                        self.error = None;
                        self.truncated = false;
                    }
                    let nl = data[i..].iter().position(|&b| b == b'\n');
                    let end = nl.map_or(data.len(), |p| i + p + 1);
                    self.line.extend_from_slice(&data[i..end]);
                    i = end;
                    if self.line.len() > MAX_LINE {
                        self.garbage(out);
                        return;
                    }
                    if nl.is_some() {
                        let line = std::mem::take(&mut self.line);
                        if !self.element(trim_cr(trim_lf(&line)), out) {
                            self.garbage(out);
                            return;
                        }
                    }
                }
                State::Bulk { left } => {
                    let take = ((data.len() - i) as u64).min(left);
                    // The payload (not its CRLF) of a request argument is kept, bounded.
                    let payload_left = left.saturating_sub(2);
                    let keep = take.min(payload_left) as usize;
                    if let Some(arg) = self.args.last_mut() {
                        let room = MAX_FIELD.saturating_sub(arg.len());
                        arg.extend_from_slice(&data[i..i + keep.min(room)]);
                    }
                    i += take as usize;
                    if take == left {
                        self.state = State::Line;
                        self.done_element(out);
                    } else {
                        self.state = State::Bulk { left: left - take };
                    }
                }
                State::Lost => return,
            }
        }
        if missing > 0 {
            match self.state {
                State::Bulk { left } if missing <= left => {
                    self.truncated = true;
                    if missing == left {
                        self.state = State::Line;
                        self.done_element(out);
                    } else {
                        self.state = State::Bulk {
                            left: left - missing,
                        };
                    }
                }
                State::Lost => {}
                _ => {
                    self.truncated = true;
                    self.lose(out);
                }
            }
        }
    }

    /// One element's line (type byte and header). `false`: not RESP.
    fn element(&mut self, line: &[u8], out: &mut Vec<Parsed>) -> bool {
        let Some((&t, rest)) = line.split_first() else {
            // A blank line between inline commands is fine; inside a value it is not RESP.
            if !self.stack.is_empty() {
                return false;
            }
            self.open = false;
            return true;
        };
        let top = self.stack.is_empty() && self.args.is_empty();
        if self.carries == Carries::Requests && top && t != b'*' {
            // An inline command: the whole line, words split by spaces.
            self.args = line
                .split(|&b| b == b' ')
                .filter(|w| !w.is_empty())
                .take(MAX_ARGS)
                .map(|w| w[..w.len().min(MAX_FIELD)].to_vec())
                .collect();
            self.emit(out);
            return true;
        }
        match t {
            b'*' | b'%' | b'~' | b'>' | b'|' => {
                let Some(n) = parse_int(rest) else {
                    return false;
                };
                if top && t == b'>' {
                    self.push = true;
                }
                let n = match t {
                    b'%' => n.saturating_mul(2),
                    // An attribute map precedes the value it annotates.
                    b'|' => n.saturating_mul(2).saturating_add(1),
                    _ => n,
                };
                if n <= 0 {
                    self.done_element(out);
                } else {
                    if self.stack.len() >= MAX_DEPTH {
                        return false;
                    }
                    self.stack.push(n as u64);
                }
                true
            }
            b'$' | b'=' | b'!' => {
                let Some(n) = parse_int(rest) else {
                    return false;
                };
                if t == b'!' && top {
                    self.error = Some(String::new());
                }
                if n < 0 {
                    self.done_element(out);
                } else {
                    if self.carries == Carries::Requests && self.args.len() < MAX_ARGS {
                        self.args.push(Vec::new());
                    }
                    self.state = State::Bulk { left: n as u64 + 2 };
                }
                true
            }
            b'-' => {
                if top {
                    self.error = Some(text(rest));
                }
                self.done_element(out);
                true
            }
            b'+' | b':' | b'_' | b',' | b'#' | b'(' => {
                if t == b':' && parse_int(rest).is_none() {
                    return false;
                }
                self.done_element(out);
                true
            }
            _ => false,
        }
    }

    /// An element is complete: close the aggregates it completes; emit at the top level.
    fn done_element(&mut self, out: &mut Vec<Parsed>) {
        while let Some(top) = self.stack.last_mut() {
            *top -= 1;
            if *top > 0 {
                return;
            }
            self.stack.pop();
        }
        if self.push {
            self.open = false;
            return;
        }
        self.emit(out);
    }

    fn emit(&mut self, out: &mut Vec<Parsed>) {
        self.open = false;
        self.stats.messages += 1;
        if self.truncated {
            self.stats.truncated += 1;
        }
        let msg = match self.carries {
            Carries::Requests => {
                let mut args = self.args.iter();
                let method = args
                    .next()
                    .map(|a| text(a).to_ascii_uppercase())
                    .unwrap_or_default();
                let key = self.args.get(1).map(|a| text(a)).unwrap_or_default();
                let mut statement = method.clone();
                for a in self.args.iter().skip(1) {
                    if statement.len() >= MAX_FIELD {
                        break;
                    }
                    statement.push(' ');
                    statement.push_str(&text(a));
                }
                statement.truncate(floor_char_boundary(&statement, MAX_FIELD));
                Message::Request(Request {
                    method,
                    resource: key,
                    statement,
                    truncated: self.truncated,
                    ..Request::default()
                })
            }
            Carries::Responses => Message::Response(Response {
                error: self.error.is_some(),
                message: self.error.take().filter(|m| !m.is_empty()),
                truncated: self.truncated,
                ..Response::default()
            }),
        };
        out.push(Parsed {
            meta: self.meta,
            msg,
        });
        self.args.clear();
    }

    /// Framing lost mid-message: emit what there is (a command name is worth keeping).
    fn lose(&mut self, out: &mut Vec<Parsed>) {
        if self.open && (self.carries == Carries::Responses || !self.args.is_empty()) {
            self.stack.clear();
            self.emit(out);
        }
        self.reset();
    }

    fn garbage(&mut self, out: &mut Vec<Parsed>) {
        self.stats.garbage += 1;
        self.truncated = true;
        if self.open && !self.args.is_empty() {
            self.stack.clear();
            self.emit(out);
        }
        self.reset();
    }

    fn reset(&mut self) {
        self.stats.lost += 1;
        self.state = State::Lost;
        self.stack.clear();
        self.line.clear();
        self.args.clear();
        self.open = false;
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn trim_lf(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\n").unwrap_or(l)
}

fn trim_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn parse_int(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{requests, responses, run};
    use super::super::{Carries, Parser, L7};
    use super::*;

    fn reqs() -> Parser {
        Parser::new(L7::Redis, Carries::Requests)
    }
    fn resps() -> Parser {
        Parser::new(L7::Redis, Carries::Responses)
    }

    /// Recorded from redis-py 5 (`r.set("cart:1", "x"); r.get("cart:1")` pipelined).
    const PIPELINE: &[u8] =
        b"*3\r\n$3\r\nSET\r\n$6\r\ncart:1\r\n$1\r\nx\r\n*2\r\n$3\r\nGET\r\n$6\r\ncart:1\r\n";

    #[test]
    fn pipelined_commands() {
        let mut p = reqs();
        let out = run(&mut p, &[(PIPELINE, 0)]);
        let r = requests(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].method, "SET");
        assert_eq!(r[0].resource, "cart:1");
        assert_eq!(r[0].statement, "SET cart:1 x");
        assert_eq!(r[1].method, "GET");
        let second = PIPELINE.windows(2).position(|w| w == b"*2").unwrap() as u32;
        assert_eq!(out[1].meta.seq, 1000 + second);
    }

    #[test]
    fn commands_split_anywhere() {
        for cut in 1..PIPELINE.len() {
            let mut p = reqs();
            let (a, b) = PIPELINE.split_at(cut);
            let out = run(&mut p, &[(a, 0), (b, 0)]);
            let r = requests(&out);
            assert_eq!(r.len(), 2, "cut at {cut}");
            assert_eq!(r[1].statement, "GET cart:1", "cut at {cut}");
            assert_eq!(p.stats().garbage, 0);
        }
    }

    #[test]
    fn inline_commands() {
        let mut p = reqs();
        let out = run(&mut p, &[(b"PING\r\nset k v\r\n", 0)]);
        let r = requests(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].method, "PING");
        assert_eq!(r[1].method, "SET");
        assert_eq!(r[1].resource, "k");
    }

    #[test]
    fn replies_of_every_shape() {
        // +OK, a bulk, a nil, an error, an array with a nested array, RESP3 map and push.
        let stream: &[u8] = b"+OK\r\n$5\r\nhello\r\n$-1\r\n-WRONGTYPE Operation against a key\r\n*2\r\n*1\r\n:1\r\n$1\r\nz\r\n%1\r\n+a\r\n:2\r\n>2\r\n$7\r\nmessage\r\n$1\r\nm\r\n_\r\n";
        let mut p = resps();
        let out = run(&mut p, &[(stream, 0)]);
        let r = responses(&out);
        assert_eq!(r.len(), 7, "{r:?}");
        assert!(!r[0].error);
        assert!(r[3].error);
        assert_eq!(
            r[3].message.as_deref(),
            Some("WRONGTYPE Operation against a key")
        );
        assert_eq!(p.stats().garbage, 0);
    }

    #[test]
    fn large_bulk_reply_skipped_by_count() {
        let head = b"$100000\r\n";
        let first = [&head[..], &[b'v'; 20][..]].concat();
        let mut p = resps();
        let out = run(&mut p, &[(&first, 99_982), (b"+OK\r\n", 0)]);
        assert_eq!(responses(&out).len(), 2);
        assert_eq!(p.stats().lost, 0);
    }

    #[test]
    fn truncated_and_garbage_input() {
        let mut p = reqs();
        // A command cut inside its header line by the capture limit: emitted, then resync.
        let out = run(
            &mut p,
            &[(b"*2\r\n$3\r\nGET\r\n$4", 30), (b"xx", 0), (PIPELINE, 0)],
        );
        let r = requests(&out);
        assert_eq!(r[0].method, "GET");
        assert!(r[0].truncated);
        assert_eq!(r.len(), 3);
        let mut p = resps();
        let out = run(
            &mut p,
            &[(b":notanumber\r\n", 0), (b"\x00\x01", 0), (b"+OK\r\n", 0)],
        );
        assert_eq!(responses(&out).len(), 1);
        assert_eq!(p.stats().garbage, 2);
        // Deep nesting, huge counts, random bytes: no panic.
        let deep = b"*1\r\n".repeat(100);
        let mut p = resps();
        let _ = run(&mut p, &[(&deep, 0), (b"*99999999999999999999999\r\n", 0)]);
        assert!(p.stats().garbage >= 1);
        let junk: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for cut in (0..junk.len()).step_by(97) {
            let mut p = reqs();
            let _ = run(&mut p, &[(&junk[cut..], 7)]);
            let mut p = resps();
            let _ = run(&mut p, &[(&junk[..cut], 0)]);
        }
    }

    #[test]
    fn detection() {
        assert_eq!(detect(PIPELINE), Some(Carries::Requests));
        assert_eq!(detect(b"+PONG\r\n"), Some(Carries::Responses));
        assert_eq!(detect(b"*2\r\n$1\r\n1\r\n"), None);
        assert_eq!(detect(b"+"), None);
    }
}
