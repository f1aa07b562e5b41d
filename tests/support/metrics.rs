//! The Prometheus text the admin port serves.

/// The sum of the samples of `name` whose labels include every `label="value"` given (one sample
/// when the labels pick one series); `None` when no sample matches.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            let (series, value) = rest.rsplit_once(' ')?;
            if !labels.iter().all(|l| series.contains(l)) {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}
