//! `tessera-agent`: parses the command line, loads the config (exit 64 with one line on
//! error), sets up logging and the runtime, and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use tessera_agent::AgentConfig;
use tessera_agent::cli::{Cli, Command, run_client};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Run { config, join_token } => run(&config, join_token),
        command => client(command),
    }
}

fn run(path: &std::path::Path, join_token: Option<String>) -> ExitCode {
    let config = match AgentConfig::load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tessera-agent: {err}");
            return ExitCode::from(64);
        }
    };
    tessera_plugin_sdk::daemon::init_logging(config.log_level, config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tessera-agent: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let mut agent = tessera_agent::start(config, join_token).await?;
        let token = agent.shutdown_token();
        tokio::spawn(async move {
            tessera_plugin_sdk::daemon::wait_for_stop_signal().await;
            tracing::info!("signal received, stopping");
            token.cancel();
        });
        agent.wait().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Already said, in one line, where it was noticed.
        Err(err) if err.is_removed_by_server() => ExitCode::FAILURE,
        Err(err) => {
            tracing::error!(error = %err, "agent failed");
            eprintln!("tessera-agent: {err}");
            ExitCode::FAILURE
        }
    }
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn client(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tessera-agent: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_client(command)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tessera-agent: {}", err.message);
            ExitCode::from(u8::try_from(err.code).unwrap_or(1))
        }
    }
}
