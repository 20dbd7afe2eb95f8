//! Byte counts as operators write them: `3125000`, `512K`, `12M`, `1G`, `4MiB`, `1.5G`
//! (binary multiples), for flags and environment variables alike.

use thiserror::Error;

/// Why a byte count was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ByteCountError {
    /// The input (the value) does not start with a decimal number.
    #[error("{0:?} is not a byte count (examples: 65536, 512K, 1.5M, 1G)")]
    NotANumber(String),
    /// A fraction without a suffix: a fraction of a byte.
    #[error("{0:?} is not a whole number of bytes (a fraction needs K, M, G or T: 1.5M)")]
    Fraction(String),
    /// The number is followed by something other than a known suffix.
    #[error("unknown size suffix {suffix:?} in {input:?} (K, M, G, T; KiB, MB, ... accepted)")]
    UnknownSuffix {
        /// The suffix, trimmed and upper-cased.
        suffix: String,
        /// The whole input.
        input: String,
    },
    /// The input (the value) counts zero bytes, or less than one.
    #[error("{0:?} must be at least one byte")]
    Zero(String),
    /// The input (the value) is more bytes than a `u64` holds.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// A positive byte count with an optional binary suffix (`K`, `M`, `G`, `T`, each also as
/// `KB` / `KiB`, any case). With a suffix the number may have a fraction (`1.5M`: binary
/// multiples, so `37.5M` is 39,321,600 bytes), rounded to a whole byte; without one it is
/// whole bytes.
pub fn parse_bytes(s: &str) -> Result<u64, ByteCountError> {
    let t = s.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    // The number first: `-1` is not a number, rather than a number with a suffix `-1`.
    let number = if num.contains('.') {
        Number::Fraction(
            num.parse::<f64>()
                .map_err(|_| ByteCountError::NotANumber(s.to_string()))?,
        )
    } else {
        match num.parse::<u64>() {
            Ok(n) => Number::Whole(n),
            // All digits, yet no u64: too many of them.
            Err(_) if !num.is_empty() => return Err(ByteCountError::TooLarge(s.to_string())),
            Err(_) => return Err(ByteCountError::NotANumber(s.to_string())),
        }
    };
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(ByteCountError::UnknownSuffix {
                suffix: other.to_string(),
                input: s.to_string(),
            })
        }
    };
    let bytes = match number {
        Number::Whole(n) => n.checked_mul(1 << shift),
        Number::Fraction(_) if shift == 0 => return Err(ByteCountError::Fraction(s.to_string())),
        Number::Fraction(x) => {
            let b = (x * (1u64 << shift) as f64).round();
            // 2^64 as f64 is the first value that does not fit.
            (b < u64::MAX as f64).then_some(b as u64)
        }
    };
    match bytes {
        Some(0) => Err(ByteCountError::Zero(s.to_string())),
        Some(b) => Ok(b),
        None => Err(ByteCountError::TooLarge(s.to_string())),
    }
}

/// The number before a byte count's suffix.
enum Number {
    Whole(u64),
    Fraction(f64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("3125000"), Ok(3_125_000));
        assert_eq!(parse_bytes(" 12M "), Ok(12 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("2tb"), Ok(2 << 40));
        assert_eq!(parse_bytes("0"), Err(ByteCountError::Zero("0".into())));
        assert!(matches!(
            parse_bytes("12X"),
            Err(ByteCountError::UnknownSuffix { .. })
        ));
        assert!(matches!(
            parse_bytes("-1"),
            Err(ByteCountError::NotANumber(_))
        ));
        assert!(matches!(
            parse_bytes(""),
            Err(ByteCountError::NotANumber(_))
        ));
        assert!(matches!(
            parse_bytes("99999999999T"),
            Err(ByteCountError::TooLarge(_))
        ));
        // Fractions, rounded to a byte.
        assert_eq!(parse_bytes("1.5M"), Ok(3 << 19));
        assert_eq!(parse_bytes("0.5K"), Ok(512));
        assert_eq!(parse_bytes(".5K"), Ok(512));
        assert_eq!(parse_bytes("2.0K"), Ok(2048));
        assert_eq!(
            parse_bytes("1.5"),
            Err(ByteCountError::Fraction("1.5".into()))
        );
        assert_eq!(
            parse_bytes("0.0001K"),
            Err(ByteCountError::Zero("0.0001K".into()))
        );
        assert_eq!(
            parse_bytes("99999999999999999999"),
            Err(ByteCountError::TooLarge("99999999999999999999".into()))
        );
        assert_eq!(parse_bytes("18446744073709551615"), Ok(u64::MAX));
        assert!(matches!(
            parse_bytes("1.2.3M"),
            Err(ByteCountError::NotANumber(_))
        ));
        assert!(matches!(
            parse_bytes("."),
            Err(ByteCountError::NotANumber(_))
        ));
        assert!(matches!(
            parse_bytes("99999999.5T"),
            Err(ByteCountError::TooLarge(_))
        ));
    }
}
