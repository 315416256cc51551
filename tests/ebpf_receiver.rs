//! The native `ebpf` receiver end to end (issue 9), with the real binary built with the `ebpf`
//! feature, the real kernel, Debian's nginx-light and redis-server, and the OpenTelemetry Python
//! SDK:
//!
//! ```text
//! service_a.py (SDK) -> nginx (uninstrumented) -> service_b.py (SDK) -> redis-server (uninstrumented)
//! tailweave: otlp + ebpf (nginx, redis-server, service_b) -> join -> file
//! ```
//!
//! Loading BPF needs root (CI runs as root). Without it, or without nginx / redis-server, the
//! capture test reports why it did not run; the unprivileged start-up test runs the binary as
//! `nobody` and needs root only to switch to it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tailweave_core::otlp::{decode_json_request, DecodeLimits};
use tailweave_core::Span;
use tailweave_suite::{
    build_tailweave, free_port, python, root, run_output, service_yaml, target_dir, wait_for,
    Collector, Ports,
};

/// The binary with the `ebpf` feature, copied aside so another build of the shared target
/// (without the feature) cannot replace it under a running test.
fn ebpf_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        build_tailweave(&["--features", "tailweave-receivers/ebpf"]);
        let target = target_dir();
        let dir = target.join("ebpf-test");
        std::fs::create_dir_all(&dir).expect("target/ebpf-test");
        let bin = dir.join("tailweave");
        std::fs::copy(target.join("debug").join("tailweave"), &bin).expect("copy binary");
        // Collector::start reads this once, before any test spawns it.
        std::env::set_var("TAILWEAVE_BIN", &bin);
        bin
    })
    .clone()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn have(cmd: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).exists())
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A child process killed (SIGTERM, then SIGKILL) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(what: &str, port: u16) {
    wait_for(what, Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    });
}

fn start_nginx(dir: &Path, port: u16, upstream: u16) -> Proc {
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream items {{ server 127.0.0.1:{upstream}; keepalive 4; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://items;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        d = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let p = Proc(child);
    wait_port("nginx", port);
    p
}

fn start_redis(dir: &Path, port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--daemonize", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let p = Proc(child);
    wait_port("redis-server", port);
    p
}

fn start_service_b(port: u16, redis: u16, otlp: &str) -> Proc {
    let mut child = Command::new(python())
        .arg(root().join("tests/ebpf/service_b.py"))
        .args([&port.to_string(), &redis.to_string(), otlp, &host_name()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start service_b.py");
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    BufReader::new(out)
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready", "service_b.py did not start");
    Proc(child)
}

/// Every span in the file exporter's output.
fn read_output(path: &Path) -> Vec<Span> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(|l| {
            decode_json_request(l.as_bytes(), &DecodeLimits::default())
                .map(|d| d.spans)
                .unwrap_or_default()
        })
        .collect()
}

fn str_attr(s: &Span, k: &str) -> Option<String> {
    s.attr(k).and_then(|v| v.as_str().map(String::from))
}

fn res_attr(s: &Span, k: &str) -> Option<String> {
    s.resource()
        .attr(k)
        .and_then(|v| v.as_str().map(String::from))
}

/// One request service_a.py made.
struct Sent {
    trace_id: String,
    root_span_id: String,
    client_span_id: String,
    status: u64,
}

fn sent(line: &str) -> Sent {
    let v: serde_json::Value = serde_json::from_str(line).expect("service_a.py line");
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Sent {
        trace_id: s("trace_id"),
        root_span_id: s("root_span_id"),
        client_span_id: s("client_span_id"),
        status: v["status"].as_u64().unwrap_or(0),
    }
}

/// Outside CI a developer without root or the servers gets a loud skip; in CI (`CI=true`, root,
/// `.ci/run` installs the servers) a missing prerequisite is a failure, never a silent pass.
fn skip(msg: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "in CI this test must run: {msg}"
    );
    eprintln!("skipped: {msg}");
}

#[test]
fn nginx_and_redis_hops_join_between_the_sdk_spans() {
    if !is_root() {
        skip("loading BPF needs root (CI runs as root)");
        return;
    }
    if !have("nginx") || !have("redis-server") {
        skip("needs Debian's nginx-light and redis-server (apt-get install -y nginx-light redis-server)");
        return;
    }
    ebpf_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let (nginx_port, b_port, redis_port) = (free_port(), free_port(), free_port());
    let ports = Ports::new();
    let otlp = format!("http://127.0.0.1:{}", ports.grpc);
    let _redis = start_redis(dir.path(), redis_port);
    let b = start_service_b(b_port, redis_port, &otlp);
    let _nginx = start_nginx(dir.path(), nginx_port, b_port);

    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
  ebpf:
    comm: [nginx, redis-server]
    pids: [{b_pid}]
    poll_interval: 20ms
processors:
  join:
    wait:
      min: 2s
      idle: 1s
      max: 15s
exporters:
  file:
    path: {{DIR}}/out.jsonl
{service}"#,
        b_pid = b.0.id(),
        service = service_yaml(&["otlp", "ebpf"], &["join"], &["file"]),
    );
    let mut col = Collector::start(&config, ports);
    let out_path = col.dir.path().join("out.jsonl");

    let out = Command::new(python())
        .arg(root().join("tests/ebpf/service_a.py"))
        .args([&nginx_port.to_string(), otlp.as_str(), &host_name(), "3"])
        .output()
        .expect("run service_a.py");
    assert!(
        out.status.success(),
        "service_a.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<Sent> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(sent)
        .collect();
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|s| s.status == 200));

    // Each trace is one unit holding the four SDK spans and the eBPF spans of the nginx hop
    // and the Redis call.
    let spans = wait_for("joined traces in the file", Duration::from_secs(60), || {
        let spans = read_output(&out_path);
        let complete = sent.iter().all(|s| {
            let n = spans
                .iter()
                .filter(|x| x.trace_id.to_hex() == s.trace_id)
                .count();
            n >= 4 + 4
        });
        complete.then_some(spans)
    });
    let log = col.log_text();
    let metrics = col.metrics();
    col.terminate();

    for s in &sent {
        let trace: Vec<&Span> = spans
            .iter()
            .filter(|x| x.trace_id.to_hex() == s.trace_id)
            .collect();
        let by_id: HashMap<String, &Span> =
            trace.iter().map(|x| (x.span_id.to_hex(), *x)).collect();
        let describe = || {
            trace
                .iter()
                .map(|x| {
                    format!(
                        "{} {} parent={} tap={:?} via={:?} svc={:?}",
                        x.span_id,
                        x.name(),
                        x.parent_span_id,
                        str_attr(x, "tailweave.join.tap_side"),
                        str_attr(x, "tailweave.join.via"),
                        res_attr(x, "service.name")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let ancestors = |x: &Span| -> Vec<String> {
            let mut out = Vec::new();
            let mut cur = x.parent_span_id.to_hex();
            while let Some(p) = by_id.get(&cur) {
                if out.contains(&cur) {
                    break;
                }
                out.push(cur.clone());
                cur = p.parent_span_id.to_hex();
            }
            out
        };
        let ebpf = |tap: &str, svc: &str| -> &Span {
            trace
                .iter()
                .find(|x| {
                    str_attr(x, "tailweave.join.tap_side").as_deref() == Some(tap)
                        && res_attr(x, "service.name").as_deref() == Some(svc)
                })
                .copied()
                .unwrap_or_else(|| {
                    panic!(
                        "no {tap} span of {svc} in trace {}:\n{}",
                        s.trace_id,
                        describe()
                    )
                })
        };
        let sdk = |name: &str, svc: &str| -> &Span {
            trace
                .iter()
                .find(|x| x.name() == name && res_attr(x, "service.name").as_deref() == Some(svc))
                .copied()
                .unwrap_or_else(|| panic!("no SDK span {name} of {svc}:\n{}", describe()))
        };
        if std::env::var("TEST_ECHO").is_ok() {
            eprintln!("trace {}:\n{}", s.trace_id, describe());
        }
        let nginx_in = ebpf("s-p", "nginx");
        let nginx_out = ebpf("c-p", "nginx");
        let redis = ebpf("s-p", "redis-server");
        let b_server = sdk("GET /items", "items");
        let b_redis = sdk("GET", "items");

        // The nginx hop sits between the two SDK spans: A's client span -> nginx s-p -> nginx
        // c-p (linked by syscall trace id) -> ... -> B's server span.
        assert_eq!(
            nginx_out.parent_span_id,
            nginx_in.span_id,
            "nginx c-p under nginx s-p:\n{}",
            describe()
        );
        assert_eq!(
            str_attr(nginx_out, "tailweave.join.via").as_deref(),
            Some("syscall")
        );
        assert!(
            ancestors(nginx_in).contains(&s.client_span_id),
            "nginx s-p under A's client span:\n{}",
            describe()
        );
        assert!(
            ancestors(b_server).contains(&nginx_out.span_id.to_hex()),
            "B's server span under nginx c-p:\n{}",
            describe()
        );
        assert_eq!(
            ancestors(b_server).last(),
            Some(&s.root_span_id),
            "one tree under A's root:\n{}",
            describe()
        );
        // The Redis call sits under the second service's span.
        let up = ancestors(redis);
        assert!(
            up.contains(&b_server.span_id.to_hex()),
            "redis s-p under B's server span:\n{}",
            describe()
        );
        assert!(
            up.contains(&b_redis.span_id.to_hex()),
            "redis s-p under B's redis span:\n{}",
            describe()
        );
        // Every joined span carries its order; eBPF spans their real trace id now.
        assert!(
            trace
                .iter()
                .all(|x| x.attr("tailweave.join.order").is_some()),
            "{}",
            describe()
        );
        assert_eq!(
            str_attr(redis, "db.statement")
                .as_deref()
                .map(|v| v.starts_with("GET item:")),
            Some(true)
        );
    }

    // Nothing of tailweave's own traffic was captured: the SDK exports to tailweave's port are
    // skipped in the kernel, so no span names an OTLP path or tailweave's ports.
    let own = [ports.grpc, ports.http, ports.metrics, ports.health];
    let captured_own = spans.iter().filter(|x| {
        let port = |k: &str| x.resource().attr(k).and_then(|v| v.as_i64()).unwrap_or(0) as u16;
        str_attr(x, "df.http.path")
            .is_some_and(|p| p.starts_with("/opentelemetry") || p == "/v1/traces")
            || own.contains(&port("df.transport.server_port"))
    });
    assert_eq!(captured_own.count(), 0);
    assert!(log.contains("ebpf receiver attached"), "{log}");
    assert!(
        metrics.contains("tailweave_ebpf_receiver_events_total"),
        "{metrics}"
    );
}

#[test]
fn without_privileges_start_up_names_the_missing_capability() {
    if !is_root() || !have("setpriv") {
        skip("switching to nobody needs root and setpriv");
        return;
    }
    let bin = ebpf_bin();
    // A config directory nobody can read.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut perm = std::fs::metadata(dir.path()).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(dir.path(), perm).expect("chmod");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: 127.0.0.1:{}\n  ebpf:\n    comm: [nginx]\n\
             exporters:\n  debug:\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp, ebpf]\n      exporters: [debug]\n",
            free_port()
        ),
    )
    .expect("config");
    let out = run_output(
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(&bin)
            .arg("--config")
            .arg(&cfg),
    );
    let text = out.text();
    assert_eq!(out.code, Some(64), "{text}");
    assert!(
        text.contains("missing capability CAP_BPF and CAP_PERFMON"),
        "{text}"
    );
    // Nothing half-started: the OTLP port was never bound (a config error stops before build).
    assert!(!text.contains("listening"), "{text}");
}
