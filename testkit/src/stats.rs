//! Summaries of timed series for the benchmarks.

use std::time::Duration;

/// The `percent`-th percentile of `values` (nearest rank, rounding down); zero when empty.
pub fn percentile(values: &[Duration], percent: usize) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) * percent / 100).min(sorted.len() - 1)]
}

/// The median of `values` (the upper one of an even count); zero when empty.
pub fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// Rounds a benchmark takes: `TASKVM_BENCH_TASKS`, else 10.
pub fn bench_rounds() -> usize {
    std::env::var("TASKVM_BENCH_TASKS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_taken_from_the_sorted_series() {
        let series: Vec<Duration> = [5, 1, 4, 2, 3].map(Duration::from_secs).to_vec();
        assert_eq!(median(&series), Duration::from_secs(3));
        assert_eq!(percentile(&series, 50), Duration::from_secs(3));
        assert_eq!(percentile(&series, 95), Duration::from_secs(4));
        assert_eq!(percentile(&series, 100), Duration::from_secs(5));
        assert_eq!(median(&[]), Duration::ZERO);
    }
}
