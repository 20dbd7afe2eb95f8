//! `guest-agent`: the faultline guest daemon. Runs as root inside the guest.
//!
//! ```text
//! guest-agent [--config FILE] [KEY=VALUE ...]
//! ```
//!
//! Keys are those of the configuration file (see `docs/guest-agent.md`); arguments apply
//! after the file.

use std::process::ExitCode;

use guest_agent::config::Config;

fn usage() -> &'static str {
    "usage: guest-agent [--config FILE] [KEY=VALUE ...]\n\
     keys: device interval_ms report_every_ms touch touch_threads touch_mode max_cpu_pct\n\
     \x20     batch_pages hot_method ranges_per_message connect_timeout_ms"
}

fn main() -> ExitCode {
    let mut cfg = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let result = match a.as_str() {
            "-h" | "--help" => {
                println!("{}", usage());
                return ExitCode::SUCCESS;
            }
            "--version" => {
                println!("guest-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--config" => match args.next() {
                Some(path) => cfg.apply_file(path.as_ref()),
                None => {
                    eprintln!("{}", usage());
                    return ExitCode::from(2);
                }
            },
            kv => match kv.split_once('=') {
                Some((k, v)) => cfg.set(k.trim(), v.trim(), "argument"),
                None => {
                    eprintln!("guest-agent: unexpected argument {kv:?}\n{}", usage());
                    return ExitCode::from(2);
                }
            },
        };
        if let Err(e) = result {
            eprintln!("guest-agent: {}", guest_agent::daemon::chain(&e));
            return ExitCode::from(2);
        }
    }
    match guest_agent::daemon::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-agent: {}", guest_agent::daemon::chain(&e));
            ExitCode::FAILURE
        }
    }
}
