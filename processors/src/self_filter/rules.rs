//! The compiled self-filter rules and the per-span match.
//!
//! An eBPF span is read into [`Facts`] (ports, IPs, pids, process names, hosts per side, and the
//! path-like fields), from the normalized model when the receiver filled `span.ebpf`, else from
//! the DeepFlow attributes in the bytes (`ebpf-spans.md` §3). Rules are tried in [`Rule::ALL`]
//! order and the first that holds names the drop.

use std::collections::BTreeMap;
use std::net::IpAddr;

use tailweave_core::config::SelfInfo;
use tailweave_core::ebpf::EbpfSpan;
use tailweave_core::{AttrValue, Resource, Span, SpanKind, SpanSource};

use super::SelfFilterConfig;

/// The kernel keeps 15 bytes of a process name (`TASK_COMM_LEN` 16 with the NUL); DeepFlow's
/// `thread.name_*` is that name.
const COMM_LEN: usize = 15;

/// The OTLP gRPC service prefix; the gRPC path and DeepFlow's `rpc.service` both start with it.
const OTLP_GRPC_PREFIX: &str = "opentelemetry.proto.collector.";
/// OTLP/HTTP default paths.
const OTLP_HTTP_PATHS: &[&str] = &["/v1/traces", "/v1/metrics", "/v1/logs"];

/// Why a span was dropped: the `rule` label of [`super::DROPPED_SPANS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// eBPF span on this host whose server port is one of tailweave's listening ports.
    ListenPort,
    /// eBPF span whose client is tailweave's process calling one of its exporter endpoints.
    OwnProcess,
    /// eBPF span of the OTLP export path towards an exporter endpoint or a listening port.
    ExportPath,
    /// SDK span of tailweave's own service name.
    OwnService,
    /// Config `ports`.
    Port,
    /// Config `cidrs`.
    Cidr,
    /// Config `process_names`.
    ProcessName,
    /// Config `service_names`.
    ServiceName,
    /// Config `resource_attributes`.
    ResourceAttribute,
}

impl Rule {
    pub const ALL: [Rule; 9] = [
        Rule::ListenPort,
        Rule::OwnProcess,
        Rule::ExportPath,
        Rule::OwnService,
        Rule::Port,
        Rule::Cidr,
        Rule::ProcessName,
        Rule::ServiceName,
        Rule::ResourceAttribute,
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Rule::ListenPort => "listen_port",
            Rule::OwnProcess => "own_process",
            Rule::ExportPath => "export_path",
            Rule::OwnService => "own_service",
            Rule::Port => "ports",
            Rule::Cidr => "cidrs",
            Rule::ProcessName => "process_names",
            Rule::ServiceName => "service_names",
            Rule::ResourceAttribute => "resource_attributes",
        }
    }

    pub fn index(&self) -> usize {
        Rule::ALL
            .iter()
            .position(|r| r == self)
            .expect("every rule is in ALL")
    }
}

/// A network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: not an IP address or CIDR (10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 address is the IPv4 host as far as a rule is concerned.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Everything the rules need, compiled once at build.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    derive: bool,
    any_host: bool,
    listen_ports: Vec<u16>,
    /// The `host:port` of every exporter endpoint, for the description.
    export_endpoints: Vec<String>,
    export_ports: Vec<u16>,
    pid: u32,
    /// Truncated as the kernel keeps it.
    process_name: String,
    /// Names this host, pod or node goes by in DeepFlow's `host`/`chost`/`pod_node`/`pod` tags.
    self_names: Vec<String>,
    service_name: String,
    ports: Vec<u16>,
    cidrs: Vec<Cidr>,
    process_names: Vec<String>,
    service_names: Vec<String>,
    resource_attributes: BTreeMap<String, String>,
}

/// The port of `host:port` / `[v6]:port` / `http://host:port`.
pub fn endpoint_port(ep: &str) -> Option<u16> {
    let ep = ep.split_once("://").map_or(ep, |(_, r)| r);
    let ep = ep.split('/').next().unwrap_or(ep);
    let (_, port) = ep.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)
}

fn comm(name: &str) -> String {
    let mut end = name.len().min(COMM_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

fn same_comm(a: &str, b: &str) -> bool {
    !a.is_empty() && comm(a) == comm(b)
}

/// Environment variables naming the Kubernetes node this pod runs on (set from the downward API,
/// `spec.nodeName`). DeepFlow's agent runs once per node, so the host of an eBPF span captured
/// next to tailweave is the node's name, not the pod's.
pub const NODE_NAME_VARS: [&str; 2] = ["NODE_NAME", "K8S_NODE_NAME"];

impl Rules {
    /// Compiles the rules for this process; the node name comes from [`NODE_NAME_VARS`].
    pub fn compile(cfg: &SelfFilterConfig, info: &SelfInfo) -> Result<Rules, String> {
        Rules::compile_with_env(cfg, info, |k| std::env::var(k).ok())
    }

    /// As [`Rules::compile`], with the environment given (for tests).
    pub fn compile_with_env(
        cfg: &SelfFilterConfig,
        info: &SelfInfo,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Rules, String> {
        let node_name = NODE_NAME_VARS.iter().find_map(|k| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        });
        let mut cidrs = Vec::new();
        for c in &cfg.cidrs {
            cidrs.push(Cidr::parse(c)?);
        }
        let mut listen_ports = info.listen_ports.clone();
        listen_ports.sort_unstable();
        listen_ports.dedup();
        let mut export_ports: Vec<u16> = info
            .exporter_endpoints
            .iter()
            .filter_map(|e| endpoint_port(e))
            .collect();
        export_ports.sort_unstable();
        export_ports.dedup();
        let mut self_names: Vec<String> = Vec::new();
        for n in [
            Some(&info.host_name),
            info.pod_name.as_ref(),
            node_name.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !n.is_empty() && !self_names.iter().any(|s| s.eq_ignore_ascii_case(n)) {
                self_names.push(n.clone());
            }
        }
        Ok(Rules {
            derive: cfg.derive_rules,
            any_host: cfg.any_host,
            listen_ports,
            export_endpoints: info.exporter_endpoints.clone(),
            export_ports,
            pid: info.pid,
            process_name: comm(&info.process_name),
            self_names,
            service_name: info.service_name.clone(),
            ports: cfg.ports.clone(),
            cidrs,
            process_names: cfg.process_names.iter().map(|n| comm(n.trim())).collect(),
            service_names: cfg.service_names.clone(),
            resource_attributes: cfg.resource_attributes.clone(),
        })
    }

    /// The ports the DeepFlow agent should not capture: the listening ports, the exporter ports
    /// and the configured ones.
    pub fn agent_blacklist_ports(&self) -> Vec<u16> {
        let mut v = Vec::new();
        if self.derive {
            v.extend(&self.listen_ports);
            v.extend(&self.export_ports);
        }
        v.extend(&self.ports);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// One line per active rule, then the matching agent setting.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        let list = |v: &[u16]| {
            v.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let host = if self.self_names.is_empty() {
            "this host".to_string()
        } else {
            format!("this host ({})", self.self_names.join(", "))
        };
        if self.derive {
            if !self.listen_ports.is_empty() {
                let scope = if self.any_host {
                    "any host".to_string()
                } else {
                    format!("{host} or an unnamed host")
                };
                out.push(format!(
                    "rule listen_port: drop eBPF spans on {scope} whose server port is one of [{}]",
                    list(&self.listen_ports)
                ));
            }
            if !self.export_ports.is_empty() {
                out.push(format!(
                    "rule own_process: drop eBPF spans whose client is process {:?} (pid {} here) on {host} calling an exporter endpoint [{}]",
                    self.process_name,
                    self.pid,
                    self.export_endpoints.join(", ")
                ));
            }
            let mut towards = self.listen_ports.clone();
            towards.extend(&self.export_ports);
            towards.sort_unstable();
            towards.dedup();
            if !towards.is_empty() {
                out.push(format!(
                    "rule export_path: drop eBPF spans of /{OTLP_GRPC_PREFIX}* or {} towards port [{}]",
                    OTLP_HTTP_PATHS.join(", "),
                    list(&towards)
                ));
            }
            if !self.service_name.is_empty() {
                out.push(format!(
                    "rule own_service: drop SDK spans with service.name {:?}",
                    self.service_name
                ));
            }
        }
        if !self.ports.is_empty() {
            out.push(format!(
                "rule ports: drop eBPF spans on any host whose server port is one of [{}]",
                list(&self.ports)
            ));
        }
        if !self.cidrs.is_empty() {
            let c: Vec<String> = self.cidrs.iter().map(|c| c.to_string()).collect();
            out.push(format!(
                "rule cidrs: drop eBPF spans with a client or server IP in [{}]",
                c.join(", ")
            ));
        }
        if !self.process_names.is_empty() {
            out.push(format!(
                "rule process_names: drop eBPF spans with a client or server process in {:?}",
                self.process_names
            ));
        }
        if !self.service_names.is_empty() {
            out.push(format!(
                "rule service_names: drop spans with service.name in {:?}",
                self.service_names
            ));
        }
        for (k, v) in &self.resource_attributes {
            out.push(format!(
                "rule resource_attributes: drop spans with resource {k} = {v:?}"
            ));
        }
        if out.is_empty() {
            out.push("no rules: every span passes".into());
        }
        let ports = self.agent_blacklist_ports();
        if !ports.is_empty() {
            out.push(format!(
                "DeepFlow agent setting: inputs.ebpf.socket.kprobe.blacklist.ports: \"{}\"",
                ports
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        out
    }

    /// The first rule `span` matches, if any. `cache` holds verdicts on the resource last seen,
    /// since the SDK spans of one request share theirs.
    pub fn matches(&self, span: &Span, cache: &mut ResourceCache) -> Option<Rule> {
        let res = cache.get(span.resource(), self);
        if res.is_ebpf || span.source == SpanSource::Ebpf || span.ebpf.is_some() {
            let facts = match span.ebpf.as_deref() {
                Some(m) => Facts::from_model(m, span),
                None => Facts::from_attrs(span),
            };
            if let Some(r) = self.match_ebpf(&facts) {
                return Some(r);
            }
        } else if res.own_service {
            return Some(Rule::OwnService);
        }
        res.config_rule
    }

    fn is_self_host(&self, host: Option<&str>, instance: Option<&str>) -> Option<bool> {
        let named: Vec<&str> = [host, instance].into_iter().flatten().collect();
        if named.is_empty() {
            return None;
        }
        Some(
            named
                .iter()
                .any(|n| self.self_names.iter().any(|s| s.eq_ignore_ascii_case(n))),
        )
    }

    fn match_ebpf(&self, f: &Facts<'_>) -> Option<Rule> {
        let server_port = f.port[1];
        if self.derive {
            if server_port != 0 && self.listen_ports.contains(&server_port) {
                // An unnamed server side is taken as this host: tailweave's ports are dedicated.
                let here = self.any_host
                    || self.is_self_host(f.host[1], f.instance[1]).unwrap_or(true)
                    || (self.pid != 0 && f.pid[1] == self.pid && self.process_is_self(f, 1));
                if here {
                    return Some(Rule::ListenPort);
                }
            }
            if server_port != 0
                && self.export_ports.contains(&server_port)
                && self.process_is_self(f, 0)
                && self.is_self_host(f.host[0], f.instance[0]).unwrap_or(true)
            {
                return Some(Rule::OwnProcess);
            }
            if server_port != 0
                && (self.export_ports.contains(&server_port)
                    || self.listen_ports.contains(&server_port))
                && f.paths().iter().flatten().any(|p| is_otlp_path(p))
            {
                return Some(Rule::ExportPath);
            }
        }
        if server_port != 0 && self.ports.contains(&server_port) {
            return Some(Rule::Port);
        }
        if !self.cidrs.is_empty()
            && f.ip
                .iter()
                .flatten()
                .any(|ip| self.cidrs.iter().any(|c| c.contains(*ip)))
        {
            return Some(Rule::Cidr);
        }
        if !self.process_names.is_empty()
            && f.process
                .iter()
                .flatten()
                .any(|p| self.process_names.iter().any(|n| same_comm(n, p)))
        {
            return Some(Rule::ProcessName);
        }
        None
    }

    /// Side `side` is tailweave's process: its pid, or its name when the pid is not ours (a
    /// container's pid namespace hides the pid the agent sees), with no other name contradicting.
    fn process_is_self(&self, f: &Facts<'_>, side: usize) -> bool {
        let name = f.process[side];
        let pid_match = self.pid != 0 && f.pid[side] == self.pid;
        let name_match = name.is_some_and(|n| same_comm(&self.process_name, n));
        match name {
            Some(_) => name_match,
            None => pid_match,
        }
    }

    fn resource_verdict(&self, r: &Resource) -> ResourceVerdict {
        let mut is_ebpf = false;
        let mut service: Option<&str> = None;
        // Keys compared as bytes, only the two values we read parsed: most resources are SDK
        // resources whose other attributes no rule looks at.
        for (k, v) in r.raw_attrs() {
            if k.starts_with(b"df.")
                || (k == b"telemetry.sdk.name" && AttrValue::parse(v).as_str() == Some("deepflow"))
            {
                is_ebpf = true;
            }
            if k == b"service.name" {
                service = AttrValue::parse(v).as_str();
            }
        }
        let own_service =
            self.derive && !self.service_name.is_empty() && service == Some(&*self.service_name);
        let config_rule = if service.is_some_and(|s| self.service_names.iter().any(|n| n == s)) {
            Some(Rule::ServiceName)
        } else if self
            .resource_attributes
            .iter()
            .any(|(k, want)| r.attr(k).is_some_and(|v| v.to_string_lossy() == *want))
        {
            Some(Rule::ResourceAttribute)
        } else {
            None
        };
        ResourceVerdict {
            is_ebpf,
            own_service,
            config_rule,
        }
    }
}

fn is_otlp_path(p: &str) -> bool {
    let p = p.split('?').next().unwrap_or(p);
    let bare = p.strip_prefix('/').unwrap_or(p);
    bare.starts_with(OTLP_GRPC_PREFIX) || OTLP_HTTP_PATHS.contains(&p)
}

#[derive(Clone, Copy, Debug, Default)]
struct ResourceVerdict {
    /// DeepFlow markers on the resource (`ebpf-spans.md` §7.1 rule 2).
    is_ebpf: bool,
    own_service: bool,
    config_rule: Option<Rule>,
}

/// The verdict on the last resource seen, keyed by its address (spans share an `Arc<Resource>`).
/// Lives for one batch, while the resources it saw are alive, so an address is not reused.
#[derive(Default)]
pub struct ResourceCache {
    last: Option<(usize, ResourceVerdict)>,
}

impl ResourceCache {
    fn get(&mut self, r: &Resource, rules: &Rules) -> ResourceVerdict {
        let ptr = r as *const Resource as usize;
        if let Some((p, v)) = self.last {
            if p == ptr {
                return v;
            }
        }
        let v = rules.resource_verdict(r);
        self.last = Some((ptr, v));
        v
    }
}

/// What one eBPF span says about its two ends; `[0]` client, `[1]` server.
#[derive(Debug)]
pub struct Facts<'a> {
    pub port: [u16; 2],
    pub ip: [Option<IpAddr>; 2],
    pub pid: [u32; 2],
    pub process: [Option<&'a str>; 2],
    pub host: [Option<&'a str>; 2],
    pub instance: [Option<&'a str>; 2],
    /// The span, for [`Facts::paths`].
    span: &'a Span,
    /// `df.span.endpoint` as the model has it, or `None`: read from the attributes when asked.
    endpoint: Option<Option<&'a str>>,
}

fn nonempty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

impl<'a> Facts<'a> {
    /// `df.span.endpoint`, `df.http.path`, `rpc.service`, and the span name. Read when a rule
    /// asks (only spans to or from tailweave's ports): each is a scan of the span's attributes,
    /// which for every span was most of this processor's time on DeepFlow rows.
    pub fn paths(&self) -> [Option<&'a str>; 4] {
        let span = self.span;
        let endpoint = self
            .endpoint
            .unwrap_or_else(|| span.attr("df.span.endpoint").and_then(|v| v.as_str()));
        [
            nonempty(endpoint),
            nonempty(span.attr("df.http.path").and_then(|v| v.as_str())),
            nonempty(span.attr("rpc.service").and_then(|v| v.as_str())),
            nonempty(Some(span.name())),
        ]
    }

    pub fn from_model(m: &'a EbpfSpan, span: &'a Span) -> Facts<'a> {
        let s = |o: &'a Option<std::sync::Arc<str>>| o.as_deref();
        Facts {
            port: m.port,
            ip: m.ip,
            pid: m.pid,
            process: [s(&m.process_name[0]), s(&m.process_name[1])],
            host: [s(&m.host[0]), s(&m.host[1])],
            instance: [s(&m.instance[0]), s(&m.instance[1])],
            span,
            endpoint: Some(m.endpoint.as_deref()),
        }
    }

    /// From the DeepFlow attributes, for spans the receiver did not classify (`ebpf-spans.md` §3).
    pub fn from_attrs(span: &'a Span) -> Facts<'a> {
        let res = span.resource();
        let rs = |k: &str| nonempty(res.attr(k).and_then(|v| v.as_str()));
        let int = |v: Option<tailweave_core::AttrValue<'_>>| v.and_then(|v| v.as_i64());
        let port_of = |v| int(v).and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
        // net.host.* is the server for SERVER spans, the client otherwise.
        let host_side = if span.kind == SpanKind::Server { 1 } else { 0 };
        let mut port = [
            port_of(res.attr("df.transport.client_port")),
            port_of(res.attr("df.transport.server_port")),
        ];
        if port == [0, 0] {
            port[host_side] = port_of(span.attr("net.host.port"));
            port[1 - host_side] = port_of(span.attr("net.peer.port"));
        }
        let ip_of = |s: Option<&str>| s.and_then(|s| s.parse::<IpAddr>().ok());
        let mut ip = [ip_of(rs("df.network.ip_0")), ip_of(rs("df.network.ip_1"))];
        if ip == [None, None] {
            let a = |k| nonempty(span.attr(k).and_then(|v| v.as_str()));
            ip[host_side] = ip_of(a("net.sock.host.addr"));
            ip[1 - host_side] = ip_of(a("net.sock.peer.addr"));
        }
        let pid = |k: &str| {
            int(res.attr(k))
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0)
        };
        let side = |base: &[&str], i: usize| base.iter().find_map(|b| rs(&format!("{b}_{i}")));
        let hosts = [
            "df.universal_tag.host",
            "df.universal_tag.chost",
            "df.universal_tag.pod_node",
        ];
        let inst = ["df.universal_tag.pod", "df.universal_tag.auto_instance"];
        Facts {
            port,
            ip,
            pid: [pid("process.pid_0"), pid("process.pid_1")],
            process: [side(&["thread.name"], 0), side(&["thread.name"], 1)],
            host: [side(&hosts, 0), side(&hosts, 1)],
            instance: [side(&inst, 0), side(&inst, 1)],
            span,
            endpoint: None,
        }
    }
}
