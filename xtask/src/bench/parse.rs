//! Parsers for what the load tools print (wrk, h2load, curl -w), and the percentile maths.

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// The numbers taken from one wrk run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Wrk {
    pub requests: u64,
    pub secs: f64,
    pub req_per_sec: f64,
    /// Socket errors of every kind (connect, read, write, timeout) plus non-2xx/3xx answers.
    pub errors: u64,
}

/// A wrk duration such as `3.09s`, `1.00m`, `812.00ms` or `950us`, in seconds.
pub fn duration_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    })
}

pub fn wrk(text: &str) -> Result<Wrk> {
    let mut out = Wrk::default();
    let mut seen_total = false;
    for line in text.lines().map(str::trim) {
        if let Some((count, rest)) = line.split_once(" requests in ") {
            // "37837 requests in 3.09s, 46.12MB read"
            out.requests = count.trim().parse().context("wrk request count")?;
            let dur = rest.split(',').next().unwrap_or_default();
            out.secs = duration_secs(dur).context("wrk duration")?;
            seen_total = true;
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            out.req_per_sec = v.trim().parse().context("wrk Requests/sec")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "Socket errors: connect 0, read 3, write 0, timeout 0"
            out.errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            out.errors += v.trim().parse::<u64>().context("wrk non-2xx count")?;
        }
    }
    if !seen_total {
        bail!("no `N requests in T` line in wrk output:\n{text}");
    }
    Ok(out)
}

/// The numbers taken from one h2load run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct H2load {
    pub secs: f64,
    pub req_per_sec: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub protocol: Option<String>,
}

pub fn h2load(text: &str) -> Result<H2load> {
    let mut out = H2load::default();
    let mut seen_finished = false;
    let mut seen_requests = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 3.03s, 7704.00 req/s, 8.53MB/s"
            let mut parts = rest.split(',').map(str::trim);
            out.secs = parts
                .next()
                .and_then(duration_secs)
                .context("h2load duration")?;
            out.req_per_sec = parts
                .next()
                .and_then(|p| p.strip_suffix(" req/s"))
                .and_then(|p| p.trim().parse().ok())
                .context("h2load req/s")?;
            seen_finished = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // "requests: 23112 total, 23176 started, 23112 done, 23112 succeeded, 0 failed, 0 errored, 0 timeout"
            for part in rest.split(',') {
                let mut kv = part.split_whitespace();
                let (Some(n), Some(k)) = (kv.next(), kv.next()) else {
                    continue;
                };
                let n: u64 = n.parse().context("h2load request counts")?;
                match k {
                    "succeeded" => out.succeeded = n,
                    "failed" | "errored" | "timeout" => out.failed += n,
                    _ => {}
                }
            }
            seen_requests = true;
        } else if let Some(p) = line.strip_prefix("Application protocol:") {
            out.protocol = Some(p.trim().to_owned());
        }
    }
    if !seen_finished || !seen_requests {
        bail!("h2load output lacks its summary:\n{text}");
    }
    Ok(out)
}

/// What `curl -w '%{http_code} %{size_download} %{time_total}'` printed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Curl {
    pub status: u16,
    pub bytes: u64,
    pub secs: f64,
}

/// Finds the `-w` line (the last line of three numbers) in curl's output.
pub fn curl(text: &str) -> Result<Curl> {
    text.lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [code, size, time] => Some(Curl {
                    status: code.parse().ok()?,
                    bytes: size.parse::<f64>().ok()? as u64,
                    secs: time.parse().ok()?,
                }),
                _ => None,
            }
        })
        .with_context(|| format!("no `code size time` line in curl output:\n{text}"))
}

/// The JSON after the last `@@RESULT ` marker that the internal client prints.
pub fn result_json<T: serde::de::DeserializeOwned>(lines: &[String]) -> Result<T> {
    let json = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("@@RESULT "))
        .with_context(|| format!("no @@RESULT line in:\n{}", lines.join("\n")))?;
    serde_json::from_str(json).with_context(|| format!("bad @@RESULT JSON: {json}"))
}

/// Percentile `q` (0..=1) of sorted samples by the nearest-rank method: the smallest sample
/// with at least `q` of all samples at or below it.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn summarize(samples: &mut [f64]) -> Summary {
    samples.sort_by(f64::total_cmp);
    let p = |q| percentile(samples, q).unwrap_or(0.0);
    Summary {
        n: samples.len(),
        p50: p(0.5),
        p90: p(0.9),
        p99: p(0.99),
        max: samples.last().copied().unwrap_or(0.0),
        mean: if samples.is_empty() {
            0.0
        } else {
            samples.iter().sum::<f64>() / samples.len() as f64
        },
    }
}

pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 3s test @ https://origin.bench.test/1k
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.59ms    6.84ms 130.07ms   97.81%
    Req/Sec     8.61k     2.04k   11.45k    68.97%
  25222 requests in 3.10s, 30.16MB read
  Socket errors: connect 0, read 2, write 1, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:   8141.05
Transfer/sec:      9.74MB
";

    #[test]
    fn wrk_summary() {
        let w = wrk(WRK).expect("parse");
        assert_eq!(w.requests, 25222);
        assert!((w.secs - 3.10).abs() < 1e-9);
        assert!((w.req_per_sec - 8141.05).abs() < 1e-9);
        assert_eq!(w.errors, 2 + 1 + 4 + 5);
    }

    #[test]
    fn wrk_without_errors_and_minutes() {
        let w = wrk("  100 requests in 1.00m, 1MB read\nRequests/sec: 1.67\n").expect("parse");
        assert_eq!((w.requests, w.errors), (100, 0));
        assert!((w.secs - 60.0).abs() < 1e-9);
    }

    #[test]
    fn wrk_garbage_is_an_error() {
        assert!(wrk("unable to connect to origin.bench.test:443 Connection refused").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration_secs("950us"), Some(0.00095));
        assert_eq!(duration_secs("812.5ms"), Some(0.8125));
        assert_eq!(duration_secs("2s"), Some(2.0));
        assert_eq!(duration_secs("2"), None);
        assert_eq!(duration_secs("2d"), None);
    }

    const H2: &str = "starting benchmark...
Application protocol: h2
finished in 3.03s, 7704.00 req/s, 8.53MB/s
requests: 23112 total, 23176 started, 23112 done, 23110 succeeded, 2 failed, 1 errored, 3 timeout
status codes: 23112 2xx, 0 3xx, 0 4xx, 0 5xx
";

    #[test]
    fn h2load_summary() {
        let h = h2load(H2).expect("parse");
        assert!((h.secs - 3.03).abs() < 1e-9);
        assert!((h.req_per_sec - 7704.0).abs() < 1e-9);
        assert_eq!((h.succeeded, h.failed), (23110, 6));
        assert_eq!(h.protocol.as_deref(), Some("h2"));
    }

    #[test]
    fn h2load_without_protocol_fails_cleanly() {
        assert!(h2load("No protocol negotiated. Aborted\n").is_err());
    }

    #[test]
    fn curl_write_out_line() {
        let c = curl("curl: (28) Operation timed out\n200 699023360 30.000412\n").expect("parse");
        assert_eq!(
            c,
            Curl {
                status: 200,
                bytes: 699023360,
                secs: 30.000412
            }
        );
        assert!(curl("nothing useful").is_err());
    }

    #[test]
    fn result_marker() {
        #[derive(Deserialize)]
        struct R {
            n: u32,
        }
        let lines = vec!["noise".to_owned(), "@@RESULT {\"n\": 7}".to_owned()];
        assert_eq!(result_json::<R>(&lines).expect("json").n, 7);
        assert!(result_json::<R>(&["x".to_owned()]).is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&v, 1.5), None);
        // Ten samples: p99 is the largest, p50 the fifth.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 0.99), Some(10.0));
        assert_eq!(percentile(&ten, 0.5), Some(5.0));
    }

    #[test]
    fn summary_sorts_first() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        let s = summarize(&mut v);
        assert_eq!((s.n, s.p50, s.max, s.mean), (5, 3.0, 5.0, 3.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), 5.0);
        assert_eq!(summarize(&mut []).n, 0);
    }
}
