//! Random distributions of durations and numbers, as scenario files write them.
//!
//! A duration is written as a Go duration string (`"30s"`, fixed), or as one of
//! `{uniform: [MIN, MAX]}`, `{exponential: MEAN}`, `{normal: {mean: M, stddev: S}}` (clamped at
//! zero), `{lognormal: {median: M, sigma: S}}`. Numbers use the same shapes with plain numbers.
//! Every draw uses the caller's seeded stream, so a seed fixes every sample.

use std::time::Duration;

use arvados_dispatch_cloud::config::units::parse_duration;
use arvados_dispatch_cloud::core::rng::Rng;
use serde::Deserialize;

/// A duration as written in a scenario (Go syntax).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(u64),
        }
        match Raw::deserialize(d)? {
            Raw::N(0) => Ok(Dur(Duration::ZERO)),
            Raw::N(n) => Err(serde::de::Error::custom(format!(
                "invalid duration {n}: give a unit, e.g. \"{n}s\""
            ))),
            Raw::S(s) => match parse_duration(&s) {
                Ok(ns) if ns >= 0 => Ok(Dur(Duration::from_nanos(ns as u64))),
                Ok(_) => Err(serde::de::Error::custom(format!(
                    "invalid duration {s:?}: negative"
                ))),
                Err(e) => Err(serde::de::Error::custom(format!(
                    "invalid duration {s:?}: {e}"
                ))),
            },
        }
    }
}

/// Normal and lognormal parameters.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeanStd<T> {
    /// Mean (normal) or median (lognormal, as `median`).
    #[serde(alias = "median")]
    pub mean: T,
    /// Standard deviation (normal) or sigma of the log (lognormal, as `sigma`).
    #[serde(alias = "sigma")]
    pub stddev: f64,
}

/// A distribution over `T` (durations or numbers).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Dist<T> {
    /// Always this value.
    Fixed(T),
    /// One of the shapes.
    Shaped(Shape<T>),
}

/// The non-constant shapes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Shape<T> {
    /// Uniform in [min, max].
    Uniform([T; 2]),
    /// Exponential with this mean.
    Exponential(T),
    /// Normal, clamped at zero.
    Normal(MeanStd<T>),
    /// Lognormal with this median and sigma.
    Lognormal(MeanStd<T>),
    /// One of these values, with weights: [[value, weight], ...].
    Choice(Vec<(T, f64)>),
}

/// Values a distribution can produce.
pub trait Sample: Copy {
    /// As a float (milliseconds for durations).
    fn to_f64(self) -> f64;
    /// From a float (clamped at zero).
    fn from_f64(v: f64) -> Self;
}

impl Sample for Dur {
    fn to_f64(self) -> f64 {
        self.0.as_secs_f64() * 1000.0
    }
    fn from_f64(v: f64) -> Dur {
        Dur(Duration::from_millis(v.max(0.0).round() as u64))
    }
}

impl Sample for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> f64 {
        v.max(0.0)
    }
}

/// A standard normal draw (Box–Muller).
pub fn std_normal(rng: &mut Rng) -> f64 {
    let u1 = rng.unit_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.unit_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// An exponential draw with this mean.
pub fn exponential(rng: &mut Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.unit_f64()).ln()
}

impl<T: Sample> Dist<T> {
    /// One draw.
    pub fn sample(&self, rng: &mut Rng) -> T {
        match self {
            Dist::Fixed(v) => *v,
            Dist::Shaped(Shape::Uniform([a, b])) => {
                let (a, b) = (a.to_f64(), b.to_f64());
                T::from_f64(a + (b - a) * rng.unit_f64())
            }
            Dist::Shaped(Shape::Exponential(m)) => T::from_f64(exponential(rng, m.to_f64())),
            Dist::Shaped(Shape::Normal(p)) => {
                T::from_f64(p.mean.to_f64() + p.stddev * std_normal(rng))
            }
            Dist::Shaped(Shape::Lognormal(p)) => {
                T::from_f64(p.mean.to_f64() * (p.stddev * std_normal(rng)).exp())
            }
            Dist::Shaped(Shape::Choice(items)) => {
                let total: f64 = items.iter().map(|(_, w)| w.max(0.0)).sum();
                let mut x = rng.unit_f64() * total;
                for (v, w) in items {
                    x -= w.max(0.0);
                    if x < 0.0 {
                        return *v;
                    }
                }
                items.last().map(|(v, _)| *v).unwrap_or(T::from_f64(0.0))
            }
        }
    }

    /// The mean (for reports and checks).
    pub fn mean(&self) -> f64 {
        match self {
            Dist::Fixed(v) => v.to_f64(),
            Dist::Shaped(Shape::Uniform([a, b])) => (a.to_f64() + b.to_f64()) / 2.0,
            Dist::Shaped(Shape::Exponential(m)) => m.to_f64(),
            Dist::Shaped(Shape::Normal(p)) => p.mean.to_f64(),
            Dist::Shaped(Shape::Lognormal(p)) => {
                p.mean.to_f64() * (p.stddev * p.stddev / 2.0).exp()
            }
            Dist::Shaped(Shape::Choice(items)) => {
                let total: f64 = items.iter().map(|(_, w)| w.max(0.0)).sum();
                items
                    .iter()
                    .map(|(v, w)| v.to_f64() * w.max(0.0))
                    .sum::<f64>()
                    / total.max(f64::MIN_POSITIVE)
            }
        }
    }
}

impl Dist<Dur> {
    /// A fixed duration.
    pub fn fixed(d: Duration) -> Dist<Dur> {
        Dist::Fixed(Dur(d))
    }

    /// One draw as a `Duration`.
    pub fn draw(&self, rng: &mut Rng) -> Duration {
        self.sample(rng).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_sample_in_range() {
        let d: Dist<Dur> = serde_yaml::from_str("{uniform: [1s, 3s]}").expect("parses");
        let mut r = Rng::new(1);
        for _ in 0..100 {
            let v = d.draw(&mut r);
            assert!(v >= Duration::from_secs(1) && v <= Duration::from_secs(3));
        }
        let f: Dist<Dur> = serde_yaml::from_str("\"250ms\"").expect("parses");
        assert_eq!(f.draw(&mut r), Duration::from_millis(250));
        let n: Dist<f64> = serde_yaml::from_str("{choice: [[1, 3], [4, 1]]}").expect("parses");
        let x = n.sample(&mut r);
        assert!(x == 1.0 || x == 4.0);
        let e: Result<Dist<Dur>, _> = serde_yaml::from_str("\"3 parsecs\"");
        assert!(e.is_err());
    }
}
