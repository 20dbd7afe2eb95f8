//! The agent's configuration: `key = value` lines, `#` comments. Later lines (and
//! `KEY=VALUE` arguments on the command line, applied after the file) override earlier
//! ones, except `touch`, which adds a target each time (`touch =` with no value clears the
//! list).

use std::path::Path;
use std::time::Duration;

use thiserror::Error;

use crate::proto::MAX_RANGES_PER_MESSAGE;
use crate::scan::{HotMethod, MethodChoice};
use crate::touch::{Target, TouchMode};
use crate::transport::Device;

/// Everything the daemon can be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `device`: the channel to the host (`/dev/ttyS1`, `/dev/hvc0`, `unix:/path`).
    pub device: Device,
    /// `interval_ms`: length of a scan interval (how recent "hot" is).
    pub interval: Duration,
    /// `report_every_ms`: unprompted report period; 0 reports only on `ReportNow`.
    pub report_every: Option<Duration>,
    /// `touch`: processes to pre-touch (`name:COMM` or `pid:N`), repeatable.
    pub touch: Vec<Target>,
    /// `touch_threads`: threads that pre-touch at once.
    pub touch_threads: usize,
    /// `touch_mode`: `hot` or `all`.
    pub touch_mode: TouchMode,
    /// `max_cpu_pct`: CPU budget of the scanner, percent of one CPU.
    pub max_cpu_pct: u32,
    /// `batch_pages`: frames per read of `/proc/kpageflags`.
    pub batch_pages: usize,
    /// `hot_method`: `auto`, `idle`, `soft-dirty` or `flags`.
    pub hot_method: MethodChoice,
    /// `ranges_per_message`: split reports into messages of at most this many ranges.
    pub ranges_per_message: usize,
    /// `connect_timeout_ms`: how long to retry connecting a Unix socket.
    pub connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            device: Device::Serial("/dev/ttyS1".into()),
            interval: Duration::from_millis(1000),
            report_every: Some(Duration::from_secs(10)),
            touch: Vec::new(),
            touch_threads: 4,
            touch_mode: TouchMode::Hot,
            max_cpu_pct: 5,
            batch_pages: 32 * 1024,
            hot_method: MethodChoice::Auto,
            ranges_per_message: 4096,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// A configuration that does not parse.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `key = value`.
    #[error("{origin}: expected `key = value`, got {text:?}")]
    Syntax {
        /// File and line, or "argument".
        origin: String,
        /// The text.
        text: String,
    },
    /// An unknown key.
    #[error("{origin}: unknown key {key:?}")]
    UnknownKey {
        /// File and line, or "argument".
        origin: String,
        /// The key.
        key: String,
    },
    /// A value that does not fit its key.
    #[error("{origin}: bad value {value:?} for {key}: {why}")]
    BadValue {
        /// File and line, or "argument".
        origin: String,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What is expected.
        why: String,
    },
}

fn number<T>(v: &str, lo: T, hi: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let n: T = v.parse().map_err(|_| "not a number".to_string())?;
    if n < lo || n > hi {
        return Err(format!("must be {lo}..={hi}"));
    }
    Ok(n)
}

impl Config {
    /// Parses configuration text (`origin` names it in errors) over the defaults.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        c.apply_text(text, origin)?;
        Ok(c)
    }

    /// Reads and applies the file at `path`.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.apply_text(&text, &path.display().to_string())
    }

    /// Applies configuration lines.
    pub fn apply_text(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let origin = format!("{origin}:{}", i + 1);
            let Some((k, v)) = line.split_once('=') else {
                return Err(ConfigError::Syntax {
                    origin,
                    text: line.to_string(),
                });
            };
            self.set(k.trim(), v.trim(), &origin)?;
        }
        Ok(())
    }

    /// Sets one key.
    pub fn set(&mut self, key: &str, value: &str, origin: &str) -> Result<(), ConfigError> {
        let bad = |why: String| ConfigError::BadValue {
            origin: origin.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            why,
        };
        match key {
            "device" => {
                self.device = value
                    .parse()
                    .map_err(|e: crate::transport::TransportError| bad(crate::daemon::chain(&e)))?
            }
            "interval_ms" => {
                self.interval = Duration::from_millis(number(value, 10u64, 3_600_000).map_err(bad)?)
            }
            "report_every_ms" => {
                let ms = number(value, 0u64, 86_400_000).map_err(bad)?;
                self.report_every = (ms > 0).then(|| Duration::from_millis(ms));
            }
            "touch" if value.is_empty() => self.touch.clear(),
            "touch" => self.touch.push(
                value
                    .parse()
                    .map_err(|e: crate::touch::BadTarget| bad(e.to_string()))?,
            ),
            "touch_threads" => self.touch_threads = number(value, 1usize, 64).map_err(bad)?,
            "touch_mode" => {
                self.touch_mode = match value {
                    "hot" => TouchMode::Hot,
                    "all" => TouchMode::All,
                    _ => return Err(bad("hot or all".into())),
                }
            }
            "max_cpu_pct" => self.max_cpu_pct = number(value, 1u32, 100).map_err(bad)?,
            "batch_pages" => self.batch_pages = number(value, 64usize, 1 << 20).map_err(bad)?,
            "hot_method" => {
                self.hot_method = match value {
                    "auto" => MethodChoice::Auto,
                    "idle" => MethodChoice::Only(HotMethod::Idle),
                    "soft-dirty" => MethodChoice::Only(HotMethod::SoftDirty),
                    "flags" => MethodChoice::Only(HotMethod::FlagsOnly),
                    _ => return Err(bad("auto, idle, soft-dirty or flags".into())),
                }
            }
            "ranges_per_message" => {
                self.ranges_per_message =
                    number(value, 1usize, MAX_RANGES_PER_MESSAGE).map_err(bad)?
            }
            "connect_timeout_ms" => {
                self.connect_timeout =
                    Duration::from_millis(number(value, 0u64, 3_600_000).map_err(bad)?)
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    origin: origin.to_string(),
                    key: key.to_string(),
                })
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(
            "# comment\n\
             device = /dev/ttyS1\n\
             interval_ms = 500   # half a second\n\
             touch = name:faultline-touch\n\
             touch = pid:7\n\
             touch_threads = 8\n\
             max_cpu_pct = 50\n\
             report_every_ms = 0\n\
             hot_method = soft-dirty\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(
            c.touch,
            vec![Target::Name("faultline-touch".into()), Target::Pid(7)]
        );
        assert_eq!(c.touch_threads, 8);
        assert_eq!(c.max_cpu_pct, 50);
        assert_eq!(c.report_every, None);
        assert_eq!(c.hot_method, MethodChoice::Only(HotMethod::SoftDirty));
    }

    #[test]
    fn errors_name_the_line() {
        let e = Config::parse("interval_ms = 100\nnonsense\n", "f").unwrap_err();
        assert!(e.to_string().starts_with("f:2:"), "{e}");
        let e = Config::parse("colour = red", "f").unwrap_err();
        assert!(matches!(e, ConfigError::UnknownKey { .. }));
        let e = Config::parse("max_cpu_pct = 0", "f").unwrap_err();
        assert!(matches!(e, ConfigError::BadValue { .. }), "{e}");
        assert!(Config::parse("touch = pid:x", "f").is_err());
        assert!(Config::parse("device = ", "f").is_err());
    }

    #[test]
    fn later_values_win_and_touch_accumulates() {
        let mut c = Config::parse("max_cpu_pct = 5\ntouch = a\n", "f").unwrap();
        c.set("max_cpu_pct", "60", "argument").unwrap();
        c.set("touch", "b", "argument").unwrap();
        assert_eq!(c.max_cpu_pct, 60);
        assert_eq!(c.touch.len(), 2);
        c.set("touch", "", "argument").unwrap();
        assert!(c.touch.is_empty());
    }
}
