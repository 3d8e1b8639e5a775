//! The `taskstream` binary: parse flags, set up logging and the file limit, serve (or mint a token).

use clap::Parser;
use log::{error, info, warn};
use std::io::Write;
use std::process::ExitCode;
use taskstream::config::{Cli, Command, TokenArgs};
use taskstream::{app, auth, shutdown, tls};

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token(args)) = cli.command {
        return token(&args);
    }
    let config = cli.config;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Checked before the address is printed, so a bad certificate never looks like a started server.
    let scheme = match tls::server_config(&config) {
        Ok(Some(_)) => "https",
        Ok(None) => "http",
        Err(e) => {
            error!("TLS: {e}");
            return ExitCode::FAILURE;
        }
    };
    raise_file_limit(config.max_subscribers.into());
    let listener = match taskstream::listener::bind(&config.bind) {
        Ok(listener) => listener,
        Err(e) => {
            error!("cannot listen on {}: {e}", config.bind);
            return ExitCode::FAILURE;
        }
    };
    let publish_listener = match config
        .publish_bind
        .as_deref()
        .map(taskstream::listener::bind)
    {
        None => None,
        Some(Ok(listener)) => Some(listener),
        Some(Err(e)) => {
            error!(
                "cannot listen on {} (--publish-bind): {e}",
                config.publish_bind.as_deref().unwrap_or_default()
            );
            return ExitCode::FAILURE;
        }
    };
    let address = listener
        .local_addr()
        .map_or_else(|_| config.bind.clone(), |a| a.to_string());
    // Tests and scripts read this line (the first) to find a port chosen with `--bind 127.0.0.1:0`.
    println!("taskstream listening on {scheme}://{address}");
    if let Some(Ok(publish)) = publish_listener.as_ref().map(|l| l.local_addr()) {
        info!("publish listener on {scheme}://{publish} (a worker thread of its own)");
        // A reader that wanted only the first line may have closed stdout: not worth a panic.
        let _ = writeln!(
            std::io::stdout(),
            "taskstream publish listener on {scheme}://{publish}"
        );
    }
    let _ = std::io::stdout().flush();
    info!("listening on {scheme}://{address} (buffer {} events, keep-alive {}s, retry {}ms, max {} subscribers, auth {})",
        config.buffer, config.keep_alive, config.retry, config.max_subscribers,
        if config.auth_enabled() { "on" } else { "off" });
    match app::run(
        listener,
        publish_listener,
        config,
        shutdown::signal_received(),
    )
    .await
    {
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

/// `taskstream token`: prints a signed JWT on stdout, nothing else, so `$(taskstream token ...)`
/// can be used in scripts.
fn token(args: &TokenArgs) -> ExitCode {
    let private_key = match &args.jwt_private_key {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                eprintln!("taskstream token: cannot read {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mint = auth::mint::Mint {
        subject: &args.sub,
        publish: &args.publish,
        subscribe: &args.subscribe,
        ttl: args.ttl,
    };
    match auth::mint::mint(&mint, args.jwt_secret.as_ref(), private_key.as_deref()) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("taskstream token: {e}");
            ExitCode::FAILURE
        }
    }
}
