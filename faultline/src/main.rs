//! `faultline`: postcopy live migration over QUIC.
//!
//! `faultline demo` runs a whole migration on this machine; `faultline source` and
//! `faultline dest` run the two ends on two machines; `faultline keygen` makes the
//! certificates they pin. With `--json` a command prints exactly one JSON object on stdout;
//! logs and progress go to stderr.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAULTLINE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("faultline: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
