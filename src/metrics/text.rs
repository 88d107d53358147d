//! The Prometheus text format (version 0.0.4): every family gets its `# HELP` and `# TYPE` once,
//! label values are escaped, histograms get their cumulative `_bucket`s, `_sum` and `_count`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::HistogramSnapshot;

/// `k="v",…` with the values escaped (`\\`, `\"`, `\n`).
pub fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s
}

/// A number as Prometheus reads it (`+Inf`, `-Inf`, `NaN` spelled out).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

/// The page being written. A family named twice is a bug: it is written once and logged.
#[derive(Default)]
pub struct Page {
    out: String,
    names: BTreeSet<String>,
}

impl Page {
    fn head(&mut self, name: &str, kind: &str, help: &str) -> bool {
        if !self.names.insert(name.to_string()) {
            tracing::error!(
                family = name,
                "a metric family written twice (a bug); dropped"
            );
            return false;
        }
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        true
    }

    fn sample(&mut self, name: &str, labels: &str, v: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {}", number(v));
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {}", number(v));
        }
    }

    /// A family of `kind` (`counter`, `gauge`) with samples by labels (`""`: no labels).
    pub fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
        if self.head(name, kind, help) {
            for (l, v) in samples {
                self.sample(name, l, *v);
            }
        }
    }

    /// A family with one sample and no labels.
    pub fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help, &[(String::new(), v)]);
    }

    /// A histogram family, one series per labels.
    pub fn histogram(&mut self, name: &str, help: &str, series: &[(String, HistogramSnapshot)]) {
        if !self.head(name, "histogram", help) {
            return;
        }
        for (l, h) in series {
            let sep = if l.is_empty() { "" } else { "," };
            for (le, n) in &h.buckets {
                let le = labels(&[("le", &number(*le))]);
                let _ = writeln!(self.out, "{name}_bucket{{{l}{sep}{le}}} {n}");
            }
            self.sample(&format!("{name}_sum"), l, h.sum);
            self.sample(&format!("{name}_count"), l, h.count as f64);
        }
    }

    /// A summary without quantiles: `_sum` and `_count`.
    pub fn summary(&mut self, name: &str, help: &str, sum: f64, count: u64) {
        if self.head(name, "summary", help) {
            self.sample(&format!("{name}_sum"), "", sum);
            self.sample(&format!("{name}_count"), "", count as f64);
        }
    }

    /// How many families were written.
    pub fn families(&self) -> usize {
        self.names.len()
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_histograms_and_escapes() {
        let mut p = Page::default();
        p.one("a_total", "counter", "A.", 3.0);
        p.family("b", "gauge", "B.", &[(labels(&[("m", "x\"y\\z\nw")]), 1.5)]);
        p.histogram(
            "h_seconds",
            "H.",
            &[(
                labels(&[("k", "v")]),
                HistogramSnapshot {
                    buckets: vec![(0.5, 1), (f64::INFINITY, 2)],
                    sum: 2.5,
                    count: 2,
                },
            )],
        );
        p.one("a_total", "counter", "twice", 1.0);
        assert_eq!(p.families(), 3);
        let t = p.finish();
        assert_eq!(
            t,
            "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n\
             # HELP b B.\n# TYPE b gauge\nb{m=\"x\\\"y\\\\z\\nw\"} 1.5\n\
             # HELP h_seconds H.\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{k=\"v\",le=\"0.5\"} 1\nh_seconds_bucket{k=\"v\",le=\"+Inf\"} 2\n\
             h_seconds_sum{k=\"v\"} 2.5\nh_seconds_count{k=\"v\"} 2\n"
        );
    }
}
