//! What the agent tells the host in its Hello: page size, memory size, and whether the
//! kernel wipes pages when it frees them.

use crate::procfs;
use crate::proto::{Hello, PROTOCOL_VERSION};

/// Whether free pages hold no stale data, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoisonOnFree {
    /// `init_on_free` (zeroes) or `page_poison` (fills with a pattern) is in effect.
    pub enabled: bool,
    /// Which setting decided it.
    pub reason: String,
}

/// The kernel's `kstrtobool`: `1 y Y on` are true, `0 n N off` false.
fn kstrtobool(v: &str) -> Option<bool> {
    match v {
        "on" | "On" | "ON" => Some(true),
        "off" | "Off" | "OFF" => Some(false),
        _ => match v.as_bytes().first()? {
            b'1' | b'y' | b'Y' => Some(true),
            b'0' | b'n' | b'N' => Some(false),
            _ => None,
        },
    }
}

/// The last value of `key=` on the command line (the kernel lets the last one win).
fn cmdline_bool(cmdline: &str, key: &str) -> Option<bool> {
    cmdline
        .split_whitespace()
        .filter_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .and_then(kstrtobool)
}

fn config_set(config: Option<&str>, name: &str) -> Option<bool> {
    let config = config?;
    let on = config.lines().any(|l| l.trim() == format!("{name}=y"));
    Some(on)
}

/// Decides poison-on-free from the kernel command line and, if known, the kernel's build
/// configuration:
///
/// * `init_on_free=<bool>` on the command line, else `CONFIG_INIT_ON_FREE_DEFAULT_ON=y`;
/// * `page_poison=<bool>` on the command line, if the kernel has `CONFIG_PAGE_POISONING`
///   (assumed when the configuration is unknown).
///
/// No file under `/sys` exposes these settings, so this is what can be checked.
pub fn poison_on_free(cmdline: &str, kernel_config: Option<&str>) -> PoisonOnFree {
    let init = match cmdline_bool(cmdline, "init_on_free") {
        Some(v) => Some((
            v,
            format!("init_on_free={} on the kernel command line", v as u8),
        )),
        None => match config_set(kernel_config, "CONFIG_INIT_ON_FREE_DEFAULT_ON") {
            Some(true) => Some((true, "CONFIG_INIT_ON_FREE_DEFAULT_ON=y".to_string())),
            _ => None,
        },
    };
    if let Some((true, reason)) = init {
        return PoisonOnFree {
            enabled: true,
            reason,
        };
    }
    if cmdline_bool(cmdline, "page_poison") == Some(true)
        && config_set(kernel_config, "CONFIG_PAGE_POISONING") != Some(false)
    {
        return PoisonOnFree {
            enabled: true,
            reason: "page_poison=1 on the kernel command line".into(),
        };
    }
    PoisonOnFree {
        enabled: false,
        reason: init.map_or_else(
            || "neither init_on_free nor page_poison is on".into(),
            |(_, r)| r,
        ),
    }
}

/// The running kernel's build configuration, if `/boot/config-$(uname -r)` exists.
pub fn kernel_config() -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn mem_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_mem_total(&text).unwrap_or(0)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The Hello of this guest, and the reason for its `poison_on_free`.
pub fn hello() -> (Hello, PoisonOnFree) {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let poison = poison_on_free(&cmdline, kernel_config().as_deref());
    let hello = Hello {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        page_size: procfs::page_size() as u32,
        poison_on_free: poison.enabled,
        mem_total_bytes: mem_total_bytes(),
    };
    (hello, poison)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_settings() {
        let p = |c, k| poison_on_free(c, k).enabled;
        assert!(!p("console=ttyS0", None));
        assert!(p("console=ttyS0 init_on_free=1", None));
        assert!(p("init_on_free=on", None));
        assert!(!p("init_on_free=1 init_on_free=0", None));
        assert!(p("page_poison=1", None));
        assert!(!p(
            "page_poison=1",
            Some("# CONFIG_PAGE_POISONING is not set\n")
        ));
        assert!(p("quiet", Some("CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n")));
        assert!(!p(
            "init_on_free=0",
            Some("CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n")
        ));
        assert!(!p("xinit_on_free=1", None));
        assert_eq!(
            poison_on_free("init_on_free=1", None).reason,
            "init_on_free=1 on the kernel command line"
        );
    }

    #[test]
    fn meminfo() {
        assert_eq!(
            parse_mem_total("MemTotal:  493524 kB\nMemFree: 1 kB\n"),
            Some(493524 * 1024)
        );
        assert_eq!(parse_mem_total("nothing"), None);
    }
}
