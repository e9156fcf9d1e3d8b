//! `tessera-server`: parses the command line, loads the config (exit 64 with one line
//! on error), sets up logging and the runtime, and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use tessera_server::cli::{Cli, Command, run_admin};
use tessera_server::config::ServerConfig;

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
        Command::Run { config } => run(&config),
        command => admin(command),
    }
}

fn runtime(multi_thread: bool) -> std::io::Result<tokio::runtime::Runtime> {
    if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match ServerConfig::load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tessera-server: {err}");
            return ExitCode::from(64);
        }
    };
    tessera_plugin_sdk::daemon::init_logging(config.log_level, config.log_format);
    let runtime = match runtime(true) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tessera-server: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let mut server = tessera_server::start(config).await?;
        let token = server.shutdown_token();
        tokio::spawn(async move {
            tessera_plugin_sdk::daemon::wait_for_stop_signal().await;
            tracing::info!("signal received, stopping");
            token.cancel();
        });
        server.wait().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "server failed");
            eprintln!("tessera-server: {err}");
            ExitCode::FAILURE
        }
    }
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn admin(command: Command) -> ExitCode {
    let runtime = match runtime(false) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tessera-server: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_admin(command)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tessera-server: {}", err.message);
            ExitCode::from(u8::try_from(err.code).unwrap_or(1))
        }
    }
}
