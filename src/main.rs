//! The `taskstream` binary: parse flags, set up logging and the file limit, serve.

use clap::Parser;
use log::{error, info, warn};
use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use taskstream::{app, config::Config, shutdown};

#[actix_web::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    raise_file_limit(config.max_subscribers.into());
    let listener = match TcpListener::bind(&config.bind) {
        Ok(listener) => listener,
        Err(e) => {
            error!("cannot listen on {}: {e}", config.bind);
            return ExitCode::FAILURE;
        }
    };
    let address = listener
        .local_addr()
        .map_or_else(|_| config.bind.clone(), |a| a.to_string());
    // Tests and scripts read this line to find a port chosen with `--bind 127.0.0.1:0`.
    println!("taskstream listening on http://{address}");
    let _ = std::io::stdout().flush();
    info!("listening on http://{address} (buffer {} events, keep-alive {}s, retry {}ms, max {} subscribers)",
        config.buffer, config.keep_alive, config.retry, config.max_subscribers);
    match app::run(listener, config, shutdown::signal_received()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Each subscriber holds a socket: lift the soft open-file limit to the hard one, and say so when
/// even that is too low for `--max-subscribers`.
fn raise_file_limit(max_subscribers: u64) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_subscribers + 64 => warn!(
            "open-file limit is {limit}, below --max-subscribers {max_subscribers}: raise `ulimit -n`"
        ),
        Ok(limit) => info!("open-file limit {limit}"),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}
