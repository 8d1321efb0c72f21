//! Reading Prometheus text exposition (what kache's `/metrics` serves) in tests.

/// `GET url` and the body as text; fails the test unless it answers 200.
pub fn scrape(url: &str) -> String {
    let r = super::http::get(url, &[]);
    assert_eq!(r.status, 200, "GET {url}: {}", r.text());
    r.text()
}

/// The sum of every sample of `name` whose labels include all of `labels` (0 when none does),
/// e.g. `value(&text, "kache_proxy_requests_total", &[("result", "hit")])`.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_sample)
        .filter(|(n, ls, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// The value of one series written whole, labels in the order the exposition writes them
/// (`name{k="v",...}`, or `name`); 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.trim().rsplit_once(' '))
        .find(|(s, _)| *s == series)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// A sample's labels, as (name, value) pairs in the order written.
type Labels = Vec<(String, String)>;

/// `name{k="v",...} value` (or `name value`) as its parts; `None` for anything else.
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series.to_owned(), Vec::new(), value));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => val.push(chars.next()?),
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name.to_owned(), labels, value))
}
