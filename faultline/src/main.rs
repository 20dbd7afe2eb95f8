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
    // With --json every run prints one JSON object, failed or not (cli::outcome).
    let json = std::env::args_os().any(|a| a == "--json");
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) if json && e.use_stderr() => {
            let e = anyhow::Error::new(e);
            println!(
                "{}",
                cli::outcome::failure_json(&e, cli::outcome::Kind::Usage)
            );
            eprintln!("faultline: error: {e:#}");
            return std::process::ExitCode::from(cli::outcome::Kind::Usage.exit_code());
        }
        Err(e) => e.exit(),
    };
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            let kind = cli::outcome::classify(&e);
            if json {
                println!("{}", cli::outcome::failure_json(&e, kind));
            }
            eprintln!("faultline: error: {e:#}");
            std::process::ExitCode::from(kind.exit_code())
        }
    }
}
