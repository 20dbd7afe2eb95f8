//! Sizes on the command line: `1G`, `256M`, `64MiB`, `4096`.

/// A positive byte count with a binary suffix (`65536`, `64K`, `2M`, `1G`):
/// [`transport::units::parse_bytes`] with its error as text for clap.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    transport::units::parse_bytes(s).map_err(|e| e.to_string())
}

/// A guest memory size: a byte count that is a whole number of 4 KiB pages.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)?;
    if bytes % 4096 != 0 {
        return Err(format!("{s:?} must be a non-zero multiple of 4 KiB"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert!(parse_size("100").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
