//! `tailweave loadgen`: sends a realistic mixed workload over OTLP and writes its ground truth.
//!
//! The generator is pure and seeded, so the same seed gives the same traces, and tests and
//! benches can use it without sending anything:
//!
//! ```no_run
//! use tailweave_collector::loadgen::{scenario, truth};
//! let traces = scenario::generate(&scenario::ScenarioConfig::default(), 42);
//! let expected: Vec<truth::TraceTruth> = traces.iter().map(|t| t.truth.clone()).collect();
//! // ... send `traces[i].sdk` and `traces[i].ebpf`, collect the spans that come out ...
//! let observed: Vec<tailweave_core::proto::tonic::trace::v1::Span> = Vec::new();
//! let c = truth::compare(&expected, &observed);
//! assert!(c.is_perfect(), "{:?}", c.examples);
//! ```
//!
//! # Layout
//! - [`scenario`]: the generator: SDK spans, DeepFlow rows (`shared/docs/ebpf-spans.md`) and the
//!   expected joined tree (`shared/docs/join.md`) of every trace.
//! - [`truth`]: the ground truth and [`truth::compare`], which scores a join's output.
//! - [`replay`]: fast replay of the `sdk` scenario by patching pre-encoded traces (benches).
//! - [`send`]: delivery over OTLP/gRPC or OTLP/HTTP: rate, delays, shuffling, connections,
//!   retries, the summary.
//! - [`wire`]: an encoded ResourceSpans, the unit the sender batches without re-encoding.
//! - `rng`: the fixed PRNG behind the determinism.

pub mod replay;
mod rng;
pub mod scenario;
pub mod send;
pub mod truth;
pub mod wire;

#[cfg(test)]
mod join_tests;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use scenario::{Generator, ScenarioConfig, ScenarioKind};
use send::{Compression, Protocol, SendConfig};
use tailweave_core::ConfigIssue;

/// Command-line options of `tailweave loadgen`: what to generate. How to send is in
/// [`SendArgs`], flattened into the same flags (and boxed, which keeps the binary's command
/// enum small).
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Workload: `game` (SDK spans and DeepFlow rows of a game backend) or `sdk` (SDK-only
    /// traces of `--spans` spans).
    #[arg(long, value_enum, default_value_t = ScenarioKind::Game)]
    pub scenario: ScenarioKind,
    /// Spans per trace in the `sdk` scenario.
    #[arg(long, default_value_t = 10)]
    pub spans: usize,
    /// Fraction of traces with an error (a declined payment, or a MySQL error only eBPF sees).
    #[arg(long, default_value_t = 0.01)]
    pub error_rate: f64,
    /// Fraction of traces with a slow MySQL query (seen only by eBPF).
    #[arg(long, default_value_t = 0.01)]
    pub slow_rate: f64,
    /// Fraction of traces whose payment call times out (a request-only row, no response).
    #[arg(long, default_value_t = 0.005)]
    pub timeout_rate: f64,
    /// Fraction of traces with one server-process row split into request and response rows.
    #[arg(long, default_value_t = 0.1)]
    pub split_rate: f64,
    /// Number of tenants (k8s namespaces game-0, game-1, ...).
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
    /// Each host's clock is off by up to this many ms.
    #[arg(long, default_value_t = 0)]
    pub clock_skew_ms: u64,
    /// DeepFlow rows arrive up to this long after the trace's SDK spans.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub ebpf_delay: Duration,
    /// Shuffle spans within each export and rows among each other (`--shuffle false` keeps
    /// generation order).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub shuffle: bool,
    /// Seed of the generator; the same seed gives the same traces.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Traces longer than this are `slow` in the ground truth.
    #[arg(long, default_value_t = 500)]
    pub slow_threshold_ms: u64,
    #[command(flatten)]
    pub send: Box<SendArgs>,
}

/// Command-line options of `tailweave loadgen`: where and how to send, what to write.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// OTLP transport.
    #[arg(long, value_enum, default_value_t = Protocol::Grpc)]
    pub protocol: Protocol,
    /// Where SDK spans go. Default http://127.0.0.1:4317 (grpc) or http://127.0.0.1:4318
    /// (http; `/v1/traces` is added when the URL has no path).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Where DeepFlow rows go. Default: `--endpoint`.
    #[arg(long)]
    pub ebpf_endpoint: Option<String>,
    /// Connections per endpoint (SDK and eBPF each get this many).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// ResourceSpans per export request (DeepFlow's default batch is 32).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Traces per second; 0 = as fast as the endpoint takes them.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Stop after this long (e.g. `30s`, `5m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many traces. Without `--duration` and `--count`: 1000 traces.
    #[arg(long)]
    pub count: Option<u64>,
    /// Write the ground truth here, one JSON object per trace and line.
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Write the summary here as JSON (it is printed to stdout too).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Retries of a refused request before its spans count as refused.
    #[arg(long, default_value_t = 5)]
    pub max_retries: u32,
    /// Deadline of one export request.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub request_timeout: Duration,
    /// DeepFlow rows held for their delay, at most; beyond it generation pauses.
    #[arg(long, default_value_t = 200_000)]
    pub max_delayed_rows: usize,
    /// `sdk` scenario only: generate this many traces once and replay them with fresh ids and
    /// shifted times (much cheaper than generating each trace; for saturating a collector).
    /// 0 = generate every trace.
    #[arg(long, default_value_t = 0)]
    pub replay_pool: usize,
    /// `KEY=VALUE` sent with every request as gRPC metadata / HTTP header (e.g.
    /// `authorization=Bearer TOKEN`); repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// `KEY=VALUE` sent with DeepFlow rows only (after `x-tailweave-source: deepflow`);
    /// repeatable.
    #[arg(long = "ebpf-header", value_parser = parse_header)]
    pub ebpf_headers: Vec<(String, String)>,
    /// Request compression: `none` or `gzip`.
    #[arg(long, value_enum, default_value_t = Compression::None)]
    pub compression: Compression,
}

/// `KEY=VALUE` (or `KEY: VALUE`; the first `=` or `:` splits, so values may hold either); the
/// key is lower-cased, as gRPC metadata requires.
fn parse_header(s: &str) -> Result<(String, String), String> {
    let at = s
        .find(['=', ':'])
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let (k, v) = (&s[..at], &s[at + 1..]);
    let k = k.trim().to_ascii_lowercase();
    if k.is_empty() {
        return Err(format!("empty header name in {s:?}"));
    }
    Ok((k, v.trim().to_string()))
}

/// Traces sent when neither `--count` nor `--duration` is given.
pub const DEFAULT_COUNT: u64 = 1000;

impl LoadgenArgs {
    /// The generator's config; traces start at `start_unix_nano`, spaced by the rate.
    pub fn scenario_config(&self, start_unix_nano: u64) -> ScenarioConfig {
        let interval_us = if self.send.rate > 0.0 && self.send.rate.is_finite() {
            ((1e6 / self.send.rate) as u64).max(1)
        } else {
            50
        };
        ScenarioConfig {
            scenario: self.scenario,
            traces: 0,
            sdk_spans: self.spans,
            error_rate: self.error_rate,
            slow_rate: self.slow_rate,
            timeout_rate: self.timeout_rate,
            split_rate: self.split_rate,
            tenants: self.tenants,
            clock_skew_ms: self.clock_skew_ms,
            ebpf_delay_ms: self.ebpf_delay.as_millis() as u64,
            shuffle: self.shuffle,
            slow_threshold_ms: self.slow_threshold_ms,
            start_unix_nano,
            trace_interval_us: interval_us,
            ..ScenarioConfig::default()
        }
    }

    pub fn send_config(&self) -> SendConfig {
        let default_endpoint = match self.send.protocol {
            Protocol::Grpc => "http://127.0.0.1:4317",
            Protocol::Http => "http://127.0.0.1:4318",
        };
        let count = match (self.send.count, self.send.duration) {
            (None, None) => Some(DEFAULT_COUNT),
            (c, _) => c,
        };
        SendConfig {
            protocol: self.send.protocol,
            endpoint: self
                .send
                .endpoint
                .clone()
                .unwrap_or_else(|| default_endpoint.to_string()),
            ebpf_endpoint: self.send.ebpf_endpoint.clone(),
            connections: self.send.connections,
            batch_size: self.send.batch_size,
            rate: self.send.rate,
            duration: self.send.duration,
            count,
            max_retries: self.send.max_retries,
            request_timeout: self.send.request_timeout,
            max_delayed_rows: self.send.max_delayed_rows,
            shuffle: self.shuffle,
            seed: self.seed,
            headers: self.send.headers.clone(),
            ebpf_headers: self.send.ebpf_headers.clone(),
            compression: self.send.compression,
            ..SendConfig::default()
        }
    }

    /// Every problem with the options, each named by its flag.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out: Vec<ConfigIssue> = self
            .scenario_config(ScenarioConfig::default().start_unix_nano)
            .validate()
            .into_iter()
            .map(|i| {
                let flag = match i.path.as_str() {
                    "sdk_spans" => "spans".to_string(),
                    p => p.to_string(),
                };
                ConfigIssue::new(format!("--{}", flag.replace('_', "-")), i.message)
            })
            .collect();
        if self.send.connections == 0 {
            out.push(ConfigIssue::new("--connections", "must be at least 1"));
        }
        if self.send.batch_size == 0 {
            out.push(ConfigIssue::new("--batch-size", "must be at least 1"));
        }
        if !(self.send.rate >= 0.0 && self.send.rate.is_finite()) {
            out.push(ConfigIssue::new("--rate", "must be a finite number >= 0"));
        }
        if self.send.max_delayed_rows == 0 {
            out.push(ConfigIssue::new("--max-delayed-rows", "must be at least 1"));
        }
        if self.send.replay_pool > 0 && self.scenario != ScenarioKind::Sdk {
            out.push(ConfigIssue::new(
                "--replay-pool",
                "replays the sdk scenario only (use --scenario sdk)",
            ));
        }
        out
    }
}

/// Runs the generator with the given options: sends until `--count` / `--duration` (or Ctrl-C,
/// which still delivers what is held), then prints the summary.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let problems = args.validate();
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::bail!("invalid loadgen options:\n  {}", list.join("\n  "));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?;
    let scenario = args.scenario_config(now.as_nanos() as u64);
    let send_cfg = args.send_config();
    let mut truth = match &args.send.truth {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    eprintln!(
        "loadgen: {:?} traces to {} (eBPF rows to {}) over {:?}, {} connections",
        args.scenario,
        send_cfg.endpoint,
        send_cfg
            .ebpf_endpoint
            .as_deref()
            .unwrap_or(&send_cfg.endpoint),
        send_cfg.protocol,
        send_cfg.connections,
    );
    let mut write = |t: &truth::TraceTruth| -> std::io::Result<()> {
        if let Some(w) = truth.as_mut() {
            serde_json::to_writer(&mut *w, t)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    };
    let summary = if args.send.replay_pool > 0 {
        let replayer = replay::Replayer::new(scenario, args.seed, args.send.replay_pool)?;
        let want_truth = args.send.truth.is_some();
        send::send(
            &send_cfg,
            replayer,
            |t| {
                if want_truth {
                    write(&t.truth())
                } else {
                    Ok(())
                }
            },
            stop,
        )
        .await?
    } else {
        send::send(
            &send_cfg,
            Generator::new(scenario, args.seed).wire(),
            |t| write(&t.truth),
            stop,
        )
        .await?
    };
    if let Some(w) = truth.as_mut() {
        w.flush().context("writing the ground truth")?;
    }
    let json = serde_json::to_string_pretty(&summary)?;
    println!("{json}");
    if let Some(p) = &args.send.summary {
        std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    #[test]
    fn defaults_are_valid_and_flags_reach_the_configs() {
        let a = Cli::parse_from(["loadgen"]).args;
        assert!(a.validate().is_empty());
        let s = a.send_config();
        assert_eq!(s.endpoint, "http://127.0.0.1:4317");
        assert_eq!(s.count, Some(DEFAULT_COUNT));
        assert_eq!((s.connections, s.batch_size), (4, 32));

        let a = Cli::parse_from([
            "loadgen",
            "--scenario",
            "sdk",
            "--protocol",
            "http",
            "--duration",
            "3s",
            "--ebpf-delay",
            "10s",
            "--tenants",
            "3",
            "--shuffle",
            "false",
            "--rate",
            "1000",
            "--header",
            "Authorization=Bearer abc",
            "--header",
            "x-tenant: t1",
            "--ebpf-header",
            "x-a=b:c=",
        ])
        .args;
        let s = a.send_config();
        assert_eq!(s.endpoint, "http://127.0.0.1:4318");
        let h = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            s.headers,
            vec![h("authorization", "Bearer abc"), h("x-tenant", "t1")]
        );
        assert_eq!(s.ebpf_headers, vec![h("x-a", "b:c=")]);
        assert_eq!((s.count, s.duration), (None, Some(Duration::from_secs(3))));
        let c = a.scenario_config(5_000_000_000_000);
        assert_eq!(c.scenario, ScenarioKind::Sdk);
        assert_eq!((c.ebpf_delay_ms, c.tenants, c.shuffle), (10_000, 3, false));
        assert_eq!(c.trace_interval_us, 1000);
    }

    #[test]
    fn bad_flags_are_all_reported_by_name() {
        let a = Cli::parse_from([
            "loadgen",
            "--error-rate",
            "2",
            "--tenants",
            "0",
            "--connections",
            "0",
            "--rate=-1",
            "--spans",
            "0",
        ])
        .args;
        let paths: Vec<String> = a.validate().into_iter().map(|i| i.path).collect();
        for p in [
            "--error-rate",
            "--tenants",
            "--connections",
            "--rate",
            "--spans",
        ] {
            assert!(paths.iter().any(|x| x == p), "{p} missing from {paths:?}");
        }
    }
}
