//! The `kafka-eos-proxy` binary: `run --config FILE` (the default) and `check-config FILE`.

use clap::{Parser, Subcommand};
use kafka_eos_proxy::{config::Config, telemetry};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kafka-eos-proxy",
    version,
    about = "A transparent Kafka proxy that adds and proves exactly-once guarantees"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (for the default `run` command).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate a config file and explain what it will do; exit code 2 if it has problems.
    CheckConfig {
        /// The file to check.
        file: Option<PathBuf>,
        /// Show how the policies resolve for this topic (with the client options below).
        #[arg(long)]
        topic: Option<String>,
        /// The client id to resolve policies for.
        #[arg(long)]
        client_id: Option<String>,
        /// The client address to resolve policies for.
        #[arg(long, default_value = "127.0.0.1")]
        address: std::net::IpAddr,
        /// The SASL principal to resolve policies for (e.g. User:alice).
        #[arg(long)]
        principal: Option<String>,
        /// A transactional id to check against owned prefixes.
        #[arg(long)]
        transactional_id: Option<String>,
    },
}

const DEFAULT_CONFIG: &str = "/etc/kafka-eos-proxy/proxy.yaml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig {
            file,
            topic,
            client_id,
            address,
            principal,
            transactional_id,
        } => {
            let path = file.or(cli.config).unwrap_or_else(|| DEFAULT_CONFIG.into());
            match Config::load(&path) {
                Ok(config) => {
                    println!("{}: OK", path.display());
                    print!("{}", config.explain());
                    if topic.is_some()
                        || client_id.is_some()
                        || principal.is_some()
                        || transactional_id.is_some()
                    {
                        let facts = kafka_eos_proxy::client::Client::described(
                            address,
                            client_id.as_deref(),
                            principal.as_deref(),
                        );
                        print!(
                            "{}",
                            kafka_eos_proxy::policy::explain::resolve(
                                &config.policies,
                                &facts,
                                topic.as_deref(),
                                transactional_id.as_deref()
                            )
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprint!("{}: {errors}", path.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Run => {
            let path = cli.config.unwrap_or_else(|| DEFAULT_CONFIG.into());
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(errors) => {
                    eprint!("{}: {errors}", path.display());
                    return ExitCode::from(2);
                }
            };
            telemetry::init_logging(&config.log);
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.runtime.worker_threads {
                builder.worker_threads(n);
            }
            let runtime = match builder.enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(kafka_eos_proxy::run(config, Some(path), shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "proxy failed");
                    eprintln!("kafka-eos-proxy: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
