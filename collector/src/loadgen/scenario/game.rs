//! The `game` scenario: one player checkout through an uninstrumented edge.
//!
//! ```text
//! game-client (SDK)  K0 player checkout ─ K1 CLIENT POST /api/checkout ─ K2 render receipt
//!   └─ c-p ──► nginx s-p ─(syscall)─ nginx c-p ─► c-nd ─► api-gateway s-p        (no SDK)
//!        gateway c-p ─► login s-p ─► login SERVER (SDK) ─ GET redis CLIENT ─ c-p (fake id)
//!        gateway c-p ─► shop s-p  ─► shop SERVER (SDK) ─ SELECT items CLIENT ─ c-p ─► mysql s-p
//!                                                  ├─ price cart INTERNAL
//!                                                  └─ POST /payment/charge CLIENT ─ c-p ─► c ─► s
//!                                                     ─► payment s-p ─► payment SERVER (SDK)
//!                                                        └─ c-p INSERT payments ─► mysql s-p
//! ```
//!
//! nginx and the gateway forward `traceparent` unchanged, so every row from the client's `c-p`
//! to the login and shop `s-p`s carries K1 as its header span id; the payment hop carries the
//! shop's CLIENT span. MySQL and Redis rows carry no header: fake trace ids, parent == self
//! (`ebpf-spans.md` §2.2). Each process handles its request on one thread, so its syscall
//! trace ids chain as `join.md` §4.4 describes: `S.req == C1.req`, `Ci.resp == C(i+1).req`,
//! `Cn.resp == S.resp`.
//!
//! # The join rules the expected tree relies on
//! - Hops (`join.md` §6 A): the rows of one request share both TCP seqs and are sessions, so
//!   they form one hop, chained in rank order `c-p`, `c` (2), `c-nd` (3), `s` (11), `s-p`; each
//!   member's parent is the previous one, `via tcp_seq` (A2, A3). Cross-host rows overlap far
//!   within the 60 ms tolerance as long as the clock skew stays below about 50 ms.
//! - A `c-p` whose header is an SDK span of its own pod hangs under it, `via span_id` (§6 B2,
//!   §4.2 client-side rule: the instance check is what keeps nginx's and the gateway's `c-p`s,
//!   which carry the same header K1, from attaching to K1).
//! - An SDK SERVER span whose parent is the header of an `s-p` of its own pod hangs under that
//!   `s-p`, `via span_id` (§6 B1 provisional parent replaced by B3(a); the instance check again
//!   picks the right `s-p` among the five that carry K1).
//! - A `c-p` placed by nothing above goes to the covering, syscall-linked `s-p` of its process
//!   (§6 B4.1-3), then to the SDK CLIENT span of the same call and protocol (B4.4 first bullet:
//!   the Redis and `SELECT items` calls), else the deepest covering SDK SERVER/INTERNAL span
//!   (B4.4 second bullet: `INSERT payments` under the payment SERVER span), else the `s-p`
//!   itself (nginx, gateway). `via` is the relation that chose the `s-p`: `syscall`. No
//!   INTERNAL span covers a `c-p` even within the 1 ms `app_slack`, so "deepest" is never in
//!   doubt, and every member of a sibling chain gets a parent B4.5 agrees with.
//! - A split `s-p` merges back into one span with the request row's id and the response row's
//!   id in `merged_span_ids` (§3: same agent, flow and tap side, no request id, adjacent capture
//!   sequences, request start before response end; §7c).
//! - The timed-out call is one request-only `c-p` with the header of the shop's CLIENT span;
//!   B2 places it under that span, and nothing else of the payment side exists.

use super::model::{kv_int, kv_str};
use super::model::{
    pod, response_status, Pod, Row, RowType, Svc, Sys, Tap, CLIENT, GATEWAY, KIND_CLIENT,
    KIND_INTERNAL, KIND_SERVER, L7, LOGIN, MYSQL, NGINX, PAYMENT, REDIS, SHOP, STATUS_ERROR,
    STATUS_UNSET,
};
use super::TraceBuild;

const DOMAIN: &str = "api.game.example";

/// What a trace carries besides the normal flow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Normal,
    PaymentDeclined,
    MysqlError,
    SlowQuery,
    Timeout,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Normal => "normal",
            Case::PaymentDeclined => "payment_declined",
            Case::MysqlError => "mysql_error",
            Case::SlowQuery => "slow_query",
            Case::Timeout => "timeout",
        }
    }
}

/// One request/response between two processes, on the true clock (µs after the trace start):
/// the client writes at `w` and reads the response at `r`; the server reads at `sr` and writes
/// at `sw`.
struct Call<'a> {
    client: &'a Pod,
    server: &'a Pod,
    l7: L7,
    header: Option<([u8; 16], [u8; 8])>,
    w: i64,
    sr: i64,
    sw: i64,
    r: i64,
    /// Network observation points between the two processes, in rank order.
    net: &'a [Tap],
    /// The `c-p` row's syscall keys; `None`: no `c-p` row.
    client_sys: Option<Sys>,
    /// The `s-p` row's syscall keys; `None`: no `s-p` row.
    server_sys: Option<Sys>,
    status: u8,
    exception: Option<String>,
    split_sp: bool,
}

/// Span ids of the rows a call produced.
struct CallIds {
    sp: Option<[u8; 8]>,
}

impl TraceBuild<'_> {
    fn thread(&mut self, pod: &Pod) -> u32 {
        pod.pid + 1 + self.rng().below(32) as u32
    }

    fn cap_seq(&mut self) -> u32 {
        1 + self.rng().below(1 << 30) as u32
    }

    /// Syscall keys of one system row: a request syscall and, unless `resp == 0`, the adjacent
    /// response syscall on the same socket and thread.
    fn sys(&mut self, req: u64, resp: u64, thread: u32) -> Sys {
        let cap = self.cap_seq();
        Sys {
            req,
            resp,
            thread: [thread, if resp == 0 { 0 } else { thread }],
            cap_seq: [cap, if resp == 0 { 0 } else { cap + 1 }],
        }
    }

    /// Emits the rows of a call, chained as one hop: the first row hangs under `parent`
    /// (`via`), each next one under the previous (`tcp_seq`, `join.md` §6 A3).
    fn call(&mut self, c: Call<'_>, parent: [u8; 8], via: &str) -> CallIds {
        let req_seq = self.g.tcp_seq();
        let resp_seq = self.g.tcp_seq();
        let client_port = 32768 + self.rng().below(28000) as u16;
        let mut taps: Vec<(Tap, Option<Sys>, i64, i64)> = Vec::new();
        if let Some(s) = c.client_sys {
            taps.push((Tap::CP, Some(s), c.w, c.r));
        }
        for &t in c.net {
            let (a, b) = match t {
                Tap::C => (c.w + 15, c.r - 15),
                Tap::CNd => (c.w + 30, c.r - 30),
                Tap::SNd => (c.sr - 30, c.sw + 30),
                _ => (c.sr - 15, c.sw + 15),
            };
            taps.push((t, None, a, b));
        }
        if let Some(s) = c.server_sys {
            taps.push((Tap::SP, Some(s), c.sr, c.sw));
        }
        let mut prev = parent;
        let mut prev_via = via;
        let mut out = CallIds { sp: None };
        for (tap, sys, a, b) in taps {
            let host = if tap.is_client() {
                c.client.svc.host
            } else {
                c.server.svc.host
            };
            let row = Row {
                row_id: 0,
                tap,
                row_type: RowType::Session,
                client: c.client.clone(),
                server: c.server.clone(),
                client_port,
                flow_id: self.g.flow_id(),
                header: c.header,
                l7: c.l7.clone(),
                start_us: self.host_us(host, a),
                end_us: self.host_us(host, b),
                req_tcp_seq: req_seq,
                resp_tcp_seq: resp_seq,
                sys,
                status: c.status,
                exception: c.exception.clone(),
            };
            let split = tap == Tap::SP && c.split_sp;
            let id = self.row(row, prev, prev_via, split);
            if tap == Tap::SP {
                out.sp = Some(id);
            }
            prev = id;
            prev_via = "tcp_seq";
        }
        out
    }
}

fn http(method: &'static str, path: &'static str, status_code: u16) -> L7 {
    L7::Http {
        method,
        path,
        domain: DOMAIN,
        status_code,
    }
}

fn http_attrs(method: &str, path: &str, status: u16, server: Option<&Svc>) -> Vec<super::KeyValue> {
    let mut a = vec![
        kv_str("http.request.method", method),
        kv_str("url.path", path),
        kv_int("http.response.status_code", status as i64),
    ];
    match server {
        Some(s) => {
            a.push(kv_str("server.address", s.name));
            a.push(kv_int("server.port", s.port as i64));
        }
        None => a.push(kv_str("http.route", path)),
    }
    a
}

fn db_attrs(system: &str, op: &str, statement: &str, server: &Svc) -> Vec<super::KeyValue> {
    vec![
        kv_str("db.system", system),
        kv_str("db.operation", op),
        kv_str("db.statement", statement),
        kv_str("server.address", server.name),
        kv_int("server.port", server.port as i64),
    ]
}

pub(super) fn build(b: &mut TraceBuild<'_>) -> &'static str {
    let t = b.tenant;
    let tid = b.trace_id;
    let (client, nginx, gw) = (pod(CLIENT, t), pod(NGINX, t), pod(GATEWAY, t));
    let (login, shop, payment) = (pod(LOGIN, t), pod(SHOP, t), pod(PAYMENT, t));
    let (mysql, redis) = (pod(MYSQL, t), pod(REDIS, t));

    let (er, sr, tr, spr) = {
        let c = b.cfg();
        (c.error_rate, c.slow_rate, c.timeout_rate, c.split_rate)
    };
    let u = b.rng().unit();
    let case = if u < er {
        if b.rng().chance(0.5) {
            Case::PaymentDeclined
        } else {
            Case::MysqlError
        }
    } else if u < er + sr {
        Case::SlowQuery
    } else if u < er + sr + tr {
        Case::Timeout
    } else {
        Case::Normal
    };
    let split = if b.rng().chance(spr) {
        match b.rng().below(3) {
            2 if case != Case::Timeout => Some(2),
            2 => Some(0),
            n => Some(n),
        }
    } else {
        None
    };

    let [k0, k1, k2, l1, l2, s1, s2, s3, s4, p1] = std::array::from_fn(|_| b.rng().span_id());
    let hdr_k1 = Some((tid, k1));
    let hdr_s4 = Some((tid, s4));

    // Syscall trace ids of each process for this request (join.md §4.4 chains).
    let c_ids = [b.g.syscall_id(CLIENT.host), b.g.syscall_id(CLIENT.host)];
    let n_ids = [b.g.syscall_id(NGINX.host), b.g.syscall_id(NGINX.host)];
    let g_ids = [0; 3].map(|_| b.g.syscall_id(GATEWAY.host));
    let l_ids = [b.g.syscall_id(LOGIN.host), b.g.syscall_id(LOGIN.host)];
    let s_ids = [0; 3].map(|_| b.g.syscall_id(SHOP.host));
    let p_ids = [b.g.syscall_id(PAYMENT.host), b.g.syscall_id(PAYMENT.host)];
    // Leaf servers read and write on one id: req == resp, never used for association.
    let m_ids = [b.g.syscall_id(MYSQL.host), b.g.syscall_id(MYSQL.host)];
    let th = [&client, &nginx, &gw, &login, &shop, &payment, &mysql].map(|p| b.thread(p));

    // ---- timeline, true clock, µs after the trace start ----
    let rr = |b: &mut TraceBuild<'_>, lo: i64, hi: i64| b.rng().range(lo, hi);
    let k1_s = rr(b, 200, 800);
    let a1_w = k1_s + 30;
    let lat1 = rr(b, 1000, 5000);
    let a2_sr = a1_w + lat1;
    let a3_w = a2_sr + rr(b, 50, 200);
    let lat2 = rr(b, 100, 400);
    let a6_sr = a3_w + lat2;
    // gateway -> login
    let g1_w = a6_sr + rr(b, 100, 300);
    let lat3 = rr(b, 100, 400);
    let l0_sr = g1_w + lat3;
    let l1_s = l0_sr + 30;
    let l2_s = l1_s + rr(b, 100, 300);
    let lr_w = l2_s + 20;
    let redis_lat = rr(b, 100, 300);
    let lrs_sr = lr_w + redis_lat;
    let lrs_sw = lrs_sr + rr(b, 50, 500);
    let lr_r = lrs_sw + redis_lat;
    let l2_e = lr_r + 20;
    let l1_e = l2_e + rr(b, 100, 300);
    let l0_sw = l1_e + 30;
    let g1_r = l0_sw + lat3;
    // gateway -> shop
    let g2_w = g1_r + rr(b, 50, 150);
    let lat4 = rr(b, 100, 400);
    let s0_sr = g2_w + lat4;
    let s1_s = s0_sr + 30;
    let s2_s = s1_s + rr(b, 100, 300);
    let sm_w = s2_s + 20;
    let mlat = rr(b, 100, 300);
    let sms_sr = sm_w + mlat;
    let sms_sw = sms_sr + rr(b, 1000, 5000);
    let sm_r = sms_sw + mlat;
    let s2_e = sm_r + 20;
    // Gaps of 1.5 ms keep the INTERNAL span clear of every c-p even with app_slack (1 ms).
    let s3_s = s2_e + 1500;
    let s3_e = s3_s + rr(b, 300, 1500);
    let s4_s = s3_e + 1500;
    let sc_w = s4_s + 30;
    // shop -> payment
    let lat5 = rr(b, 100, 400);
    let p0_sr = sc_w + lat5;
    let p1_s = p0_sr + 30;
    let pm_w = p1_s + rr(b, 200, 500);
    let mlat2 = rr(b, 100, 300);
    let pms_sr = pm_w + mlat2;
    let query = if case == Case::SlowQuery {
        rr(b, 700_000, 1_200_000)
    } else {
        rr(b, 1000, 5000)
    };
    let pms_sw = pms_sr + query;
    let pm_r = pms_sw + mlat2;
    let p1_e = pm_r + rr(b, 100, 300);
    let p0_sw = p1_e + 30;
    let sc_r = p0_sw + lat5;
    let s4_e = if case == Case::Timeout {
        // The shop gives up after 250 ms and queues the charge for a retry.
        sc_w + 250_000
    } else {
        sc_r + 30
    };
    let s1_e = s4_e + rr(b, 100, 300);
    let s0_sw = s1_e + 30;
    let g2_r = s0_sw + lat4;
    let a6_sw = g2_r + rr(b, 50, 150);
    let a3_r = a6_sw + lat2;
    let a2_sw = a3_r + rr(b, 30, 100);
    let a1_r = a2_sw + lat1;
    let k1_e = a1_r + 30;
    let k2_s = k1_e + 200;
    let k2_e = k2_s + rr(b, 500, 3000);
    let k0_e = k2_e + 100;

    let declined = case == Case::PaymentDeclined;
    let pay_code = if declined { 402 } else { 200 };

    // ---- the client ----
    b.sdk_span(
        &client,
        k0,
        None,
        "player checkout",
        KIND_INTERNAL,
        (0, k0_e),
        vec![kv_str("game.action", "checkout")],
        (STATUS_UNSET, ""),
        None,
        None,
    );
    b.sdk_span(
        &client,
        k1,
        Some(k0),
        "POST /api/checkout",
        KIND_CLIENT,
        (k1_s, k1_e),
        http_attrs("POST", "/api/checkout", 200, Some(&NGINX)),
        (STATUS_UNSET, ""),
        Some(k0),
        Some("span_id"),
    );
    b.sdk_span(
        &client,
        k2,
        Some(k0),
        "render receipt",
        KIND_INTERNAL,
        (k2_s, k2_e),
        Vec::new(),
        (STATUS_UNSET, ""),
        Some(k0),
        Some("span_id"),
    );

    // ---- client -> nginx: c-p under K1 (B2), nginx s-p under it (A3) ----
    let client_sys = b.sys(c_ids[0], c_ids[1], th[0]);
    let nginx_in = b.sys(n_ids[0], n_ids[1], th[1]);
    let h1 = b.call(
        Call {
            client: &client,
            server: &nginx,
            l7: http("POST", "/api/checkout", 200),
            header: hdr_k1,
            w: a1_w,
            sr: a2_sr,
            sw: a2_sw,
            r: a1_r,
            net: &[],
            client_sys: Some(client_sys),
            server_sys: Some(nginx_in),
            status: response_status::SUCCESS,
            exception: None,
            split_sp: false,
        },
        k1,
        "span_id",
    );
    let nginx_sp = h1.sp.unwrap_or_default();

    // ---- nginx -> gateway: nginx c-p under nginx s-p (B4, syscall), then c-nd, gateway s-p ----
    let nginx_out = b.sys(n_ids[0], n_ids[1], th[1]);
    let gw_in = b.sys(g_ids[0], g_ids[2], th[2]);
    let h2 = b.call(
        Call {
            client: &nginx,
            server: &gw,
            l7: http("POST", "/api/checkout", 200),
            header: hdr_k1,
            w: a3_w,
            sr: a6_sr,
            sw: a6_sw,
            r: a3_r,
            net: &[Tap::CNd],
            client_sys: Some(nginx_out),
            server_sys: Some(gw_in),
            status: response_status::SUCCESS,
            exception: None,
            split_sp: false,
        },
        nginx_sp,
        "syscall",
    );
    let gw_sp = h2.sp.unwrap_or_default();

    // ---- gateway -> login: gateway c-p under gateway s-p (B4), login s-p, login SERVER (B3a) ----
    let gw_out1 = b.sys(g_ids[0], g_ids[1], th[2]);
    let login_in = b.sys(l_ids[0], l_ids[1], th[3]);
    let h3 = b.call(
        Call {
            client: &gw,
            server: &login,
            l7: http("POST", "/login/verify", 200),
            header: hdr_k1,
            w: g1_w,
            sr: l0_sr,
            sw: l0_sw,
            r: g1_r,
            net: &[],
            client_sys: Some(gw_out1),
            server_sys: Some(login_in),
            status: response_status::SUCCESS,
            exception: None,
            split_sp: split == Some(0),
        },
        gw_sp,
        "syscall",
    );
    let login_sp = h3.sp.unwrap_or_default();
    b.sdk_span(
        &login,
        l1,
        Some(k1),
        "POST /login/verify",
        KIND_SERVER,
        (l1_s, l1_e),
        http_attrs("POST", "/login/verify", 200, None),
        (STATUS_UNSET, ""),
        Some(login_sp),
        Some("span_id"),
    );
    let session_key = format!("session:{:08x}", b.rng().next_u64() as u32);
    b.sdk_span(
        &login,
        l2,
        Some(l1),
        "GET",
        KIND_CLIENT,
        (l2_s, l2_e),
        db_attrs("redis", "GET", &format!("GET {session_key}"), &REDIS),
        (STATUS_UNSET, ""),
        Some(l1),
        Some("span_id"),
    );
    // Redis c-p: fake trace id; login s-p by syscall (B4.1-3), then the SDK Redis CLIENT span
    // of the same call (B4.4). No Redis server row: a server with no agent.
    let login_redis = b.sys(l_ids[0], l_ids[1], th[3]);
    b.call(
        Call {
            client: &login,
            server: &redis,
            l7: L7::Redis {
                command: "GET",
                key: session_key,
            },
            header: None,
            w: lr_w,
            sr: lrs_sr,
            sw: lrs_sw,
            r: lr_r,
            net: &[],
            client_sys: Some(login_redis),
            server_sys: None,
            status: response_status::SUCCESS,
            exception: None,
            split_sp: false,
        },
        l2,
        "syscall",
    );

    // ---- gateway -> shop ----
    let gw_out2 = b.sys(g_ids[1], g_ids[2], th[2]);
    // After a timed-out call the thread reads nothing, so its reply keeps the call's id.
    let shop_resp = if case == Case::Timeout {
        s_ids[1]
    } else {
        s_ids[2]
    };
    let shop_in = b.sys(s_ids[0], shop_resp, th[4]);
    let h4 = b.call(
        Call {
            client: &gw,
            server: &shop,
            l7: http("POST", "/shop/checkout", 200),
            header: hdr_k1,
            w: g2_w,
            sr: s0_sr,
            sw: s0_sw,
            r: g2_r,
            net: &[],
            client_sys: Some(gw_out2),
            server_sys: Some(shop_in),
            status: response_status::SUCCESS,
            exception: None,
            split_sp: false,
        },
        gw_sp,
        "syscall",
    );
    let shop_sp = h4.sp.unwrap_or_default();
    b.sdk_span(
        &shop,
        s1,
        Some(k1),
        "POST /shop/checkout",
        KIND_SERVER,
        (s1_s, s1_e),
        http_attrs("POST", "/shop/checkout", 200, None),
        (STATUS_UNSET, ""),
        Some(shop_sp),
        Some("span_id"),
    );
    let cart = b.rng().below(1_000_000);
    let select = format!("SELECT id, price FROM items WHERE cart_id = {cart}");
    b.sdk_span(
        &shop,
        s2,
        Some(s1),
        "SELECT items",
        KIND_CLIENT,
        (s2_s, s2_e),
        db_attrs("mysql", "SELECT", &select, &MYSQL),
        (STATUS_UNSET, ""),
        Some(s1),
        Some("span_id"),
    );
    let shop_mysql = b.sys(s_ids[0], s_ids[1], th[4]);
    let mysql_in = b.sys(m_ids[0], m_ids[0], th[6]);
    b.call(
        Call {
            client: &shop,
            server: &mysql,
            l7: L7::Mysql {
                command: "SELECT",
                table: "items",
                statement: select,
            },
            header: None,
            w: sm_w,
            sr: sms_sr,
            sw: sms_sw,
            r: sm_r,
            net: &[],
            client_sys: Some(shop_mysql),
            server_sys: Some(mysql_in),
            status: response_status::SUCCESS,
            exception: None,
            split_sp: split == Some(1),
        },
        s2,
        "syscall",
    );
    b.sdk_span(
        &shop,
        s3,
        Some(s1),
        "price cart",
        KIND_INTERNAL,
        (s3_s, s3_e),
        Vec::new(),
        (STATUS_UNSET, ""),
        Some(s1),
        Some("span_id"),
    );
    let (s4_status, s4_msg) = if declined {
        (STATUS_ERROR, "402 Payment Required")
    } else {
        (STATUS_UNSET, "")
    };
    b.sdk_span(
        &shop,
        s4,
        Some(s1),
        "POST /payment/charge",
        KIND_CLIENT,
        (s4_s, s4_e),
        http_attrs("POST", "/payment/charge", pay_code, Some(&PAYMENT)),
        (s4_status, s4_msg),
        Some(s1),
        Some("span_id"),
    );

    // ---- shop -> payment: c-p under the shop's CLIENT span (B2), then c, s, s-p (A3) ----
    if case == Case::Timeout {
        // A request-only row and nothing else: status Timeout, exported as Unset (§2.4).
        let sys = b.sys(s_ids[1], 0, th[4]);
        let client_port = 32768 + b.rng().below(28000) as u16;
        let at = b.host_us(SHOP.host, sc_w);
        let row = Row {
            row_id: 0,
            tap: Tap::CP,
            row_type: RowType::Request,
            client: shop.clone(),
            server: payment.clone(),
            client_port,
            flow_id: b.g.flow_id(),
            header: hdr_s4,
            l7: http("POST", "/payment/charge", 0),
            start_us: at,
            end_us: at,
            req_tcp_seq: b.g.tcp_seq(),
            resp_tcp_seq: 0,
            sys: Some(sys),
            status: response_status::TIMEOUT,
            exception: None,
        };
        b.row(row, s4, "span_id", false);
        b.timed_out = true;
        return case.name();
    }
    let shop_pay = b.sys(s_ids[1], s_ids[2], th[4]);
    let pay_in = b.sys(p_ids[0], p_ids[1], th[5]);
    let pay_status = if declined {
        response_status::CLIENT_ERROR
    } else {
        response_status::SUCCESS
    };
    let h5 = b.call(
        Call {
            client: &shop,
            server: &payment,
            l7: http("POST", "/payment/charge", pay_code),
            header: hdr_s4,
            w: sc_w,
            sr: p0_sr,
            sw: p0_sw,
            r: sc_r,
            net: &[Tap::C, Tap::S],
            client_sys: Some(shop_pay),
            server_sys: Some(pay_in),
            status: pay_status,
            exception: None,
            split_sp: split == Some(2),
        },
        s4,
        "span_id",
    );
    let pay_sp = h5.sp.unwrap_or_default();
    let (p1_status, p1_msg) = if declined {
        (STATUS_ERROR, "card declined")
    } else {
        (STATUS_UNSET, "")
    };
    b.sdk_span(
        &payment,
        p1,
        Some(s4),
        "POST /payment/charge",
        KIND_SERVER,
        (p1_s, p1_e),
        http_attrs("POST", "/payment/charge", pay_code, None),
        (p1_status, p1_msg),
        Some(pay_sp),
        Some("span_id"),
    );
    // The payment's ORM is not instrumented: its INSERT c-p hangs under the SERVER span that
    // covers it (B4.4 second bullet). A MySQL error here is seen only by eBPF.
    let order = b.rng().below(1_000_000_000);
    let (m_status, m_exc) = if case == Case::MysqlError {
        (
            response_status::SERVER_ERROR,
            Some(format!(
                "1062 (23000): Duplicate entry 'ord-{order}' for key 'PRIMARY'"
            )),
        )
    } else {
        (response_status::SUCCESS, None)
    };
    let pay_mysql = b.sys(p_ids[0], p_ids[1], th[5]);
    let mysql_in2 = b.sys(m_ids[1], m_ids[1], th[6]);
    b.call(
        Call {
            client: &payment,
            server: &mysql,
            l7: L7::Mysql {
                command: "INSERT",
                table: "payments",
                statement: format!(
                    "INSERT INTO payments (order_id, amount) VALUES ('ord-{order}', 499)"
                ),
            },
            header: None,
            w: pm_w,
            sr: pms_sr,
            sw: pms_sw,
            r: pm_r,
            net: &[],
            client_sys: Some(pay_mysql),
            server_sys: Some(mysql_in2),
            status: m_status,
            exception: m_exc,
            split_sp: false,
        },
        p1,
        "syscall",
    );
    case.name()
}
