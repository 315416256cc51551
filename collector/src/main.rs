//! `tailweave`: the binary. Loads and checks the config before binding anything (exit 64 on a bad
//! config), starts the pipelines, logs the bound addresses, waits for SIGTERM/SIGINT and drains.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tailweave_collector::config::{self, Config, ConfigErrors};
use tailweave_collector::{loadgen, service, telemetry};
use tailweave_core::config::BuildContext;

/// Every span passes through a few short-lived allocations (request buffers, batches); mimalloc's
/// per-thread free lists make those cheap where the system allocator zeroed pages and locked arenas.
/// `cap` counts the live bytes (one relaxed atomic add per allocation) so that the memory budget can
/// tell memory in use from pages the allocator merely keeps (`tailweave_core::limiter`).
#[global_allocator]
static ALLOCATOR: cap::Cap<mimalloc::MiMalloc> = cap::Cap::new(mimalloc::MiMalloc, usize::MAX);

fn heap_in_use() -> u64 {
    ALLOCATOR.allocated() as u64
}

/// Exit code for a config that does not load (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tailweave",
    version,
    about = "A trace pipeline that joins OTel SDK spans with eBPF spans and tail-samples whole traces"
)]
struct Cli {
    /// Pipeline file. Default: ./pipelines.yaml, else the embedded default pipeline.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipelines (the default).
    Run,
    /// Check a config: every problem with its key path and line; exit 0 when valid.
    Validate,
    /// Send a generated workload (SDK spans and DeepFlow rows) to an OTLP endpoint.
    Loadgen(loadgen::LoadgenArgs),
}

fn load(path: &Option<PathBuf>) -> Result<(Config, String), ConfigErrors> {
    match path {
        Some(p) => config::load_file(p).map(|c| (c, p.display().to_string())),
        None => {
            let local = PathBuf::from("pipelines.yaml");
            if local.exists() {
                config::load_file(&local).map(|c| (c, "pipelines.yaml".into()))
            } else {
                config::load_str(config::EMBEDDED_PIPELINES, "embedded pipelines.yaml", |n| {
                    std::env::var(n).ok()
                })
                .map(|c| (c, "embedded pipelines.yaml".into()))
            }
        }
    }
}

fn main() -> ExitCode {
    tailweave_core::limiter::set_heap_probe(heap_in_use);
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tailweave: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Loadgen(args) => {
            telemetry::init_logs(&config::LogsConfig::default());
            match rt.block_on(loadgen::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tailweave loadgen: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Validate => match load(&cli.config) {
            Ok((cfg, source)) => {
                validate_report(&cfg, &source);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run => {
            let (cfg, source) = match load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            telemetry::init_logs(&cfg.service.telemetry.logs);
            for w in &cfg.warnings {
                tracing::warn!("{source}: {w}");
            }
            rt.block_on(run(cfg, source))
        }
    }
}

fn validate_report(cfg: &Config, source: &str) {
    println!("{source}: configuration is valid");
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
    for (pid, p) in &cfg.service.pipelines {
        println!(
            "pipeline {pid}: {} -> [{}] -> {}",
            p.receivers.join(", "),
            p.processors.join(", "),
            p.exporters.join(", ")
        );
    }
    let info = std::sync::Arc::new(service::self_info(cfg));
    for pc in &cfg.processors {
        let ctx = BuildContext {
            id: pc.id.clone(),
            pipeline: String::new(),
            self_info: info.clone(),
        };
        for line in pc.config.describe(&ctx) {
            println!("{}: {line}", pc.id);
        }
    }
}

async fn run(cfg: Config, source: String) -> ExitCode {
    let running = match service::start(&cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{source}: {e:#}");
            let _ = writeln!(std::io::stderr(), "tailweave: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(config = %source, pipelines = cfg.service.pipelines.len(), "tailweave is running");
    let failed = running.failed.clone();
    let mut code = ExitCode::SUCCESS;
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot install the SIGTERM handler: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            _ = failed.cancelled() => { tracing::error!("a component failed: shutting down"); code = ExitCode::FAILURE; }
        }
    }
    #[cfg(not(unix))]
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
            _ = failed.cancelled() => { tracing::error!("a component failed: shutting down"); code = ExitCode::FAILURE; }
        }
    }
    if !running.stop().await {
        tracing::warn!("shutdown deadline passed before everything was delivered");
    }
    tracing::info!("tailweave stopped");
    code
}
