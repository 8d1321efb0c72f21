//! Durations as people write them in flags and specs: `30s`, `15m`, `24h`, `1d12h`.

use std::time::Duration;

/// Durations as `500ms`, `30s`, `15m`, `2h`, `30d`, `1d12h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s:?} is too long a duration"));
    }
    units(t)
}

/// `30d`, `2h`, `90m`, `45s`, `1d12h`, `500ms`: numbers each followed by a unit.
fn units(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut total_ms: u64 = 0;
    let mut digits = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let (unit, ms) = match c {
            'd' => ("d", 86_400_000),
            'h' => ("h", 3_600_000),
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                ("ms", 1)
            }
            'm' => ("m", 60_000),
            's' => ("s", 1_000),
            _ => return Err(format!("{s:?}: unknown unit {c:?} (use d, h, m, s, ms)")),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?}: a number must come before {unit:?}"))?;
        digits.clear();
        total_ms = n
            .checked_mul(ms)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| format!("{s:?}: too long"))?;
    }
    if !digits.is_empty() {
        return Err(format!(
            "{s:?}: a unit must follow {digits} (d, h, m, s, ms)"
        ));
    }
    Ok(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2s250ms"), Ok(Duration::from_millis(2250)));
        assert!(parse_duration("5ms3").is_err());
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn units_add_up() {
        let ok = [
            ("30d", 30 * 86_400),
            ("2h", 7_200),
            ("90m", 5_400),
            ("45s", 45),
            ("1d12h", 129_600),
            ("0s", 0),
        ];
        for (s, secs) in ok {
            assert_eq!(units(s), Ok(Duration::from_secs(secs)), "{s}");
        }
        for bad in ["", "30", "d", "3w", "1.5h", "-1d", "99999999999999999999d"] {
            assert!(units(bad).is_err(), "{bad}");
        }
    }
}
