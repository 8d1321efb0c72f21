//! Flag values parsed into typed values at the edge: durations, sizes and shares of a core,
//! with the errors clap shows for a bad one.

/// A share of one core: `10%` (1% to 100%).
pub fn parse_share(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim()
        .strip_suffix('%')
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("{s:?} is not a percentage like 10%"))?;
    if !(1.0..=100.0).contains(&p) {
        return Err(format!("{s:?} is not between 1% and 100%"));
    }
    Ok(p / 100.0)
}

/// Sizes as `200GiB`, `500MB`, `200Gi`, or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    kache_store::parse_size(s).map_err(|e| e.to_string())
}

pub use kache_api::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        assert_eq!(parse_share("10%"), Ok(0.1));
        assert_eq!(parse_share(" 100% "), Ok(1.0));
        assert!(parse_share("0%").is_err());
        assert!(parse_share("150%").is_err());
        assert!(parse_share("0.5").is_err());
    }
}
