//! Reading the gateway's Prometheus scrape, where an absent series is a failure and not a zero.
//!
//! A series is written as the exposition shows it, `name{label="value",...}` (or a bare `name`); label
//! order does not matter. [`metric`] reads one value now and panics, naming the series and showing the
//! scrape, if the series is absent; [`metric_eventually`] polls until a condition holds. Counters and
//! gauges that the gateway registers at start-up are exported from the first scrape; series with
//! free-form labels (`flaggate_requests_total{...}`, the duration histograms, `flaggate_sdk_requests_total`)
//! appear with their first event. A test that means "absent" says so with [`Scrape::get`].

use super::client::get;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One sample line: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses `name{a="x",b="y"}` (label values may hold `\"`, `\\`, `\n` escapes, `,` and `}`).
fn parse_series(series: &str) -> Option<(String, BTreeMap<String, String>)> {
    let series = series.trim();
    let Some((name, mut rest)) = series.split_once('{') else {
        return (!series.is_empty()).then(|| (series.to_string(), BTreeMap::new()));
    };
    let mut labels = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return after.trim().is_empty().then(|| (name.to_string(), labels));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        rest = &after[end + 1..];
    }
}

/// The sample lines of a text exposition (comments and blank lines skipped).
pub fn samples(scrape: &str) -> Vec<Sample> {
    scrape
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let (name, labels) = parse_series(series).unwrap_or_else(|| panic!("bad series in {l:?}"));
            let value = match value.trim() {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            Sample { name, labels, value }
        })
        .collect()
}

/// One scrape, kept to read several series from the same moment.
#[derive(Clone, Debug)]
pub struct Scrape {
    /// Where it came from, for failure messages.
    pub source: String,
    pub text: String,
}

impl Scrape {
    /// A scrape the test already holds as text.
    pub fn parse(text: impl Into<String>) -> Scrape {
        Scrape {
            source: "a scrape".into(),
            text: text.into(),
        }
    }

    /// The series' value, `None` if it is absent. Use it only where absence is what the test expects
    /// or tolerates, and say why.
    pub fn get(&self, series: &str) -> Option<f64> {
        let (name, labels) = parse_series(series).unwrap_or_else(|| panic!("not a series: {series:?}"));
        samples(&self.text)
            .into_iter()
            .find(|s| s.name == name && s.labels == labels)
            .map(|s| s.value)
    }

    /// The series' value; panics, naming it and showing the scrape, if it is absent.
    #[track_caller]
    pub fn value(&self, series: &str) -> f64 {
        match self.get(series) {
            Some(v) => v,
            None => panic!(
                "metric series `{series}` is absent from {}\n{}",
                self.source,
                self.explain(series)
            ),
        }
    }

    /// The series of the same name that are present, then the whole scrape.
    fn explain(&self, series: &str) -> String {
        let name = parse_series(series).map(|(n, _)| n).unwrap_or_default();
        let same: Vec<&str> = self
            .text
            .lines()
            .filter(|l| {
                !l.starts_with('#') && (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            })
            .collect();
        format!(
            "series named `{name}` present: {}\n--- scrape ---\n{}",
            if same.is_empty() {
                "none".to_string()
            } else {
                format!("\n  {}", same.join("\n  "))
            },
            self.text
        )
    }
}

/// Scrapes `http://{admin}/metrics` (which must answer 200).
pub async fn scrape(admin: SocketAddr) -> Scrape {
    let r = get(admin, "/metrics", None).await;
    assert_eq!(r.status, 200, "GET http://{admin}/metrics: {}", r.text());
    Scrape {
        source: format!("the scrape of http://{admin}/metrics"),
        text: r.text(),
    }
}

/// The series' value now; panics, naming it and showing the scrape, if it is absent.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    scrape(admin).await.value(series)
}

/// Polls every 20 ms until the series is present and `pred` holds for its value, and returns that
/// value; panics with the last value and scrape after `limit` (pass it through [`super::patience`]).
pub async fn metric_eventually(admin: SocketAddr, series: &str, pred: impl Fn(f64) -> bool, limit: Duration) -> f64 {
    let started = Instant::now();
    loop {
        let s = scrape(admin).await;
        let v = s.get(series);
        if let Some(v) = v.filter(|v| pred(*v)) {
            return v;
        }
        if started.elapsed() > limit {
            let last = v.map_or("absent".to_string(), |v| v.to_string());
            panic!(
                "metric series `{series}` never met the condition within {limit:?} (last value: {last}) in {}\n{}",
                s.source,
                s.explain(series)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_match_by_name_and_label_set_in_any_order() {
        let s = Scrape::parse(
            "# HELP x y\nflaggate_requests_total{decision=\"allowed\",method=\"GET\"} 2\nflaggate_ready 1\nv{a=\"q\\\"},\"} 3\n",
        );
        assert_eq!(
            s.get("flaggate_requests_total{method=\"GET\",decision=\"allowed\"}"),
            Some(2.0)
        );
        assert_eq!(
            s.get("flaggate_requests_total{method=\"GET\"}"),
            None,
            "a label subset is another series"
        );
        assert_eq!(s.value("flaggate_ready"), 1.0);
        assert_eq!(s.get("v{a=\"q\\\"},\"}"), Some(3.0));
        assert_eq!(s.get("flaggate_read"), None);
    }

    #[test]
    #[should_panic(expected = "metric series `flaggate_inflight_requests` is absent")]
    fn an_absent_series_is_a_failure_not_a_zero() {
        Scrape::parse("flaggate_ready 1\n").value("flaggate_inflight_requests");
    }
}
