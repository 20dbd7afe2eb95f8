//! `faultline`: postcopy live migration over QUIC.
//!
//! `faultline demo` runs a whole migration on this machine; `faultline source` and
//! `faultline dest` run the two ends on two machines; `faultline keygen` makes the
//! certificates they pin. With `--json` a command prints exactly one JSON object on stdout;
//! logs and progress go to stderr.

mod cli;
mod malloc;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before any thread: see malloc.rs.
    malloc::tune();
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
            // clap's text starts with its own "error: "; said once, after ours.
            let text = e.to_string();
            let e = anyhow::anyhow!(
                "{}",
                text.strip_prefix("error: ").unwrap_or(&text).trim_end()
            );
            println!(
                "{}",
                cli::outcome::failure_json(&e, cli::outcome::Kind::Usage)
            );
            eprintln!("faultline: error: {e:#}");
            return std::process::ExitCode::from(cli::outcome::Kind::Usage.exit_code());
        }
        Err(e) => e.exit(),
    };
    // Fault injection for the crash-point tests (docs/recovery.md); unset in normal use.
    if let Err(e) = transport::crash::configure_from_env() {
        eprintln!("faultline: error: {e}");
        return std::process::ExitCode::from(cli::outcome::Kind::Usage.exit_code());
    }
    if let Some(role) = args.command.role() {
        stop_on_signals(role, args.command.evacuates_on_sigusr1());
    }
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            let e = match cli::stopper().reason() {
                Some(why) => e.context(why),
                None => e,
            };
            // A stop says `stopped`, unless it lost the VM: that is what must be heard.
            let kind = match (cli::stopper().reason(), cli::outcome::classify(&e)) {
                (_, cli::outcome::Kind::VmLost) => cli::outcome::Kind::VmLost,
                (Some(_), _) => cli::outcome::Kind::Stopped,
                (None, kind) => kind,
            };
            if json {
                println!("{}", cli::outcome::failure_json(&e, kind));
            }
            eprintln!("faultline: error: {e:#}");
            std::process::ExitCode::from(kind.exit_code())
        }
    }
}

/// SIGTERM and SIGINT stop the role's session through [`cli::stopper`], so the peer learns
/// why at once; a second signal exits at once. With `evacuate`, SIGUSR1 sets
/// [`cli::evacuate_now`]. Must run before any other thread starts: the signals are blocked
/// here and every thread started later inherits that, so only the waiting thread receives
/// them.
fn stop_on_signals(role: &'static str, evacuate: bool) {
    // SAFETY: sigset_t is plain data that sigemptyset initialises before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if evacuate {
            libc::sigaddset(&mut set, libc::SIGUSR1);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not asked for.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if blocked != 0 {
        return; // Default handling: the process just dies.
    }
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid place for the signal number.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        if sig == libc::SIGUSR1 {
            cli::evacuate_now().store(true, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        if cli::stopper().reason().is_some() {
            std::process::exit(128 + sig);
        }
        let name = if sig == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        cli::stopper().stop(format!("the {role} was stopped by {name}"));
    });
}
