//! The `ca-server` binary: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // One crypto provider for everything (rustls, tonic, the JWKS client).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = ca_server::cli::Cli::parse();
    ca_server::cli::init_tracing(cli.log_format());
    match ca_server::cli::dispatch(cli) {
        Ok(code) => code,
        // `ca-server audit list | head`: a closed pipe ends the output, it is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // A user's mistake gets one clear line, not a backtrace.
            eprintln!("error: {}", ca_server::cli::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
