//! `manifold`: the gateway binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::GatewayConfig;

#[derive(Parser, Debug)]
#[command(name = "manifold", version, about = "Multi-protocol messaging gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default command).
    Serve(ServeArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Configuration file (default: the embedded standalone config).
    #[arg(long, short, env = "MANIFOLD_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `gateway=debug,broker=info`.
    #[arg(long, env = "MANIFOLD_LOG")]
    log_level: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the embedded default configuration.
    PrintDefault,
    /// Validate a configuration file, including every handler's section.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Config(ConfigCommand::PrintDefault)) => {
            print!("{}", gateway::config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Some(Command::Config(ConfigCommand::Check { file })) => {
            match GatewayConfig::load(&file)
                .map_err(gateway::GatewayError::from)
                .and_then(|c| gateway::build_handlers(&c).map(|_| c))
            {
                Ok(c) => {
                    println!(
                        "{}: ok (protocols: [{}]; compiled in: {})",
                        file.display(),
                        c.protocols.join(", "),
                        gateway::registry::compiled_in()
                            .iter()
                            .map(|f| f.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Some(Command::Serve(args)) => serve(args),
        // The bare command is `serve`, with its environment variables.
        None => serve(ServeArgs {
            config: std::env::var_os("MANIFOLD_CONFIG").map(PathBuf::from),
            log_level: std::env::var("MANIFOLD_LOG").ok(),
        }),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    deepen_malloc_cache();
    let config = match &args.config {
        Some(p) => GatewayConfig::load(p),
        None => GatewayConfig::default_config(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = args
        .log_level
        .clone()
        .unwrap_or_else(|| config.log_level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
        .ok();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        tracing::info!(config = %config.source, data_dir = %config.broker.data_dir.display(),
            protocols = ?config.protocols, "starting manifold");
        let running = match gateway::start(config, metrics).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "failed to start");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        running.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

/// The depth of glibc's per-thread cache of freed blocks (its default is 7
/// per size class).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TCACHE_COUNT: &str = "glibc.malloc.tcache_count=256";

/// Re-executes the gateway, once and before it starts anything, with a
/// deeper glibc per-thread cache of freed blocks, unless `GLIBC_TUNABLES`
/// already sets one.
///
/// Why: much of what one thread allocates another frees (a message decoded
/// by a connection, written by its ledger's writer task, whose run the
/// journal thread drops). With glibc's default cache of 7 blocks per size,
/// each further free goes back to the allocating thread's arena under its
/// lock, and the two threads fight over it: in mqtt-bench's closed-loop
/// QoS 1 runs, about 90% of the gateway's 64k futex calls per second were
/// malloc and free waiting on arena locks. With 256 the same runs delivered
/// 15-20% more messages per second, idle memory per connection unchanged
/// (BENCHMARKS.md, 2026-12-06). glibc reads the setting only from the
/// environment at start, hence the exec; the process keeps its PID.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn deepen_malloc_cache() {
    use std::os::unix::process::CommandExt;
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let name = TCACHE_COUNT.split('=').next().unwrap_or(TCACHE_COUNT);
    if current.contains(name) {
        return;
    }
    let value = if current.is_empty() {
        TCACHE_COUNT.to_owned()
    } else {
        format!("{current}:{TCACHE_COUNT}")
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", value)
        .exec();
    // `exec` returns only if it failed: go on with glibc's defaults.
    eprintln!("note: could not re-execute with {TCACHE_COUNT} ({err}); going on without it");
}
