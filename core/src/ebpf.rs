//! The normalized model of an eBPF-derived span (`shared/docs/ebpf-spans.md` §7.2).
//!
//! Filled by the `deepflow` normalizer (and the native `ebpf` receiver); read by the join,
//! the sampler and the self-filter. Request-only and response-only rows stay separate here;
//! the join merges them.

use std::net::IpAddr;
use std::sync::Arc;

/// How the row was captured (`signal_source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Signal {
    /// 3: kprobes/uprobes in the process's syscalls (system spans).
    #[default]
    Ebpf,
    /// 0: AF_PACKET on a NIC (network spans).
    Packet,
    Other,
}

/// Observation point (`ebpf-spans.md` §4).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum TapSide {
    CP,
    C,
    CNd,
    CHv,
    CGwHv,
    CGw,
    SGw,
    SGwHv,
    SHv,
    SNd,
    S,
    SP,
    Local,
    Rest,
    #[default]
    Unknown,
    Other(Arc<str>),
}

impl TapSide {
    /// From the display name DeepFlow exports, or the raw code.
    pub fn parse(s: &str) -> TapSide {
        match s {
            "Client Process" | "c-p" => TapSide::CP,
            "Client NIC" | "c" => TapSide::C,
            "Client K8s Node" | "c-nd" => TapSide::CNd,
            "Client VM Hypervisor" | "c-hv" => TapSide::CHv,
            "Client-side Gateway Hypervisor" | "c-gw-hv" => TapSide::CGwHv,
            "Client-side Gateway" | "c-gw" => TapSide::CGw,
            "Server-side Gateway" | "s-gw" => TapSide::SGw,
            "Server-side Gateway Hypervisor" | "s-gw-hv" => TapSide::SGwHv,
            "Server VM Hypervisor" | "s-hv" => TapSide::SHv,
            "Server K8s Node" | "s-nd" => TapSide::SNd,
            "Server NIC" | "s" => TapSide::S,
            "Server Process" | "s-p" => TapSide::SP,
            "Local NIC" | "local" => TapSide::Local,
            "Other NIC" | "rest" => TapSide::Rest,
            "" => TapSide::Unknown,
            other => TapSide::Other(other.into()),
        }
    }
    pub fn code(&self) -> &str {
        match self {
            TapSide::CP => "c-p",
            TapSide::C => "c",
            TapSide::CNd => "c-nd",
            TapSide::CHv => "c-hv",
            TapSide::CGwHv => "c-gw-hv",
            TapSide::CGw => "c-gw",
            TapSide::SGw => "s-gw",
            TapSide::SGwHv => "s-gw-hv",
            TapSide::SHv => "s-hv",
            TapSide::SNd => "s-nd",
            TapSide::S => "s",
            TapSide::SP => "s-p",
            TapSide::Local => "local",
            TapSide::Rest => "rest",
            TapSide::Unknown => "",
            TapSide::Other(s) => s,
        }
    }
    /// `TAP_SIDE_RANKS`; 0 for unknown.
    pub fn rank(&self) -> u8 {
        match self {
            TapSide::CP => 1,
            TapSide::C => 2,
            TapSide::CNd => 3,
            TapSide::CHv => 4,
            TapSide::CGwHv => 5,
            TapSide::CGw => 6,
            TapSide::SGw => 7,
            TapSide::SGwHv => 8,
            TapSide::SHv => 9,
            TapSide::SNd => 10,
            TapSide::S => 11,
            TapSide::SP => 12,
            TapSide::Local | TapSide::Rest => 13,
            TapSide::Unknown | TapSide::Other(_) => 0,
        }
    }
    /// The side whose `_0`/`_1` attributes describe the observing end: 0 client, 1 server.
    pub fn local_side(&self) -> Option<usize> {
        match self.rank() {
            1..=6 => Some(0),
            7..=12 => Some(1),
            _ => None,
        }
    }
    pub fn is_process(&self) -> bool {
        matches!(self, TapSide::CP | TapSide::SP)
    }
}

/// Bit flags of [`EbpfSpan::flags`].
pub mod flags {
    pub const REQUEST_ONLY: u16 = 1 << 0;
    pub const RESPONSE_ONLY: u16 = 1 << 1;
    pub const SESSION: u16 = 1 << 2;
    pub const TIMED_OUT: u16 = 1 << 3;
    pub const ERROR: u16 = 1 << 4;
    pub const FAKE_TRACE_ID: u16 = 1 << 5;
    pub const SELF_PARENT: u16 = 1 << 6;
    pub const NO_TIMESTAMPS: u16 = 1 << 7;
    /// tracing_info or transport_layer was not exported (`ebpf-spans.md` §7.3): not joinable by key.
    pub const NO_KEYS: u16 = 1 << 8;
}

/// One received eBPF-derived span, normalized.
///
/// Field meanings follow `ebpf-spans.md` §7.2; `[x; 2]` arrays are indexed by side (0 client,
/// 1 server) except `syscall_*` and `x_request_id`, which are [request, response]. 0 / `None`
/// means absent. The tenant is not stored here: it depends on the join's `tenant` config, so the
/// join reads it from the resource itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EbpfSpan {
    pub row_id: u64,
    pub merged_row_ids: Vec<u64>,
    pub otlp_trace_id: [u8; 16],
    pub trace_key: Option<[u8; 16]>,
    pub header_span_id: Option<[u8; 8]>,
    pub flow_id: u64,
    pub signal: Signal,
    pub tap_side: TapSide,
    pub agent: Arc<str>,
    pub l7_protocol: u8,
    pub is_tls: bool,
    /// `df.network.protocol`: 6 TCP, 17 UDP, 0 unknown (compared by the join's tcp_seq rule).
    pub l4_protocol: u8,
    pub request_id: Option<u64>,
    pub endpoint: Option<Arc<str>>,
    pub req_tcp_seq: u32,
    pub resp_tcp_seq: u32,
    pub syscall_req: u64,
    pub syscall_resp: u64,
    pub syscall_thread: [u32; 2],
    pub syscall_cap_seq: [u32; 2],
    pub x_request_id: [Option<Arc<str>>; 2],
    pub pid: [u32; 2],
    pub process_name: [Option<Arc<str>>; 2],
    pub instance: [Option<Arc<str>>; 2],
    pub host: [Option<Arc<str>>; 2],
    /// `df.universal_tag.pod_ns_0/_1`: the join's default tenant key, read once on receipt.
    pub namespace: [Option<Arc<str>>; 2],
    pub ip: [Option<IpAddr>; 2],
    pub port: [u16; 2],
    pub start_ns: u64,
    pub end_ns: u64,
    pub duration_us: u64,
    pub flags: u16,
}

impl EbpfSpan {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    /// 0 for `c*`, 1 for `s*`, `None` for `local`/`rest`/unknown.
    pub fn local_side(&self) -> Option<usize> {
        self.tap_side.local_side()
    }
    /// The pid of the observing process (`c-p`/`s-p`), 0 if unknown.
    pub fn local_pid(&self) -> u32 {
        self.local_side().map_or(0, |s| self.pid[s])
    }
    pub fn local_instance(&self) -> Option<&Arc<str>> {
        self.local_side().and_then(|s| self.instance[s].as_ref())
    }
    pub fn local_host(&self) -> Option<&Arc<str>> {
        self.local_side().and_then(|s| self.host[s].as_ref())
    }
    /// A system span (`c-p`/`s-p`), captured inside the process.
    pub fn is_system(&self) -> bool {
        self.tap_side.is_process()
    }
    pub fn is_request_only(&self) -> bool {
        self.has(flags::REQUEST_ONLY)
    }
    pub fn is_response_only(&self) -> bool {
        self.has(flags::RESPONSE_ONLY)
    }
    /// Heap bytes beyond the struct itself (strings are shared `Arc<str>`, counted once each here).
    pub fn held_bytes(&self) -> usize {
        let s = |o: &Option<Arc<str>>| o.as_ref().map_or(0, |s| s.len() + 16);
        std::mem::size_of::<EbpfSpan>()
            + self.merged_row_ids.len() * 8
            + self.agent.len()
            + s(&self.endpoint)
            + self.x_request_id.iter().map(s).sum::<usize>()
            + self.process_name.iter().map(s).sum::<usize>()
            + self.instance.iter().map(s).sum::<usize>()
            + self.host.iter().map(s).sum::<usize>()
            + self.namespace.iter().map(s).sum::<usize>()
    }
}
