//! Helpers for tests that publish sessions' events: concurrent sessions interleaved, and the
//! events of one session spaced evenly in time. Generic, so that any crate's event type fits.

/// Interleaves `lists` item by item (each one's first, then each one's second, ...), as the
/// events of concurrent sessions are published.
pub fn interleave<T: Clone>(lists: &[Vec<T>]) -> Vec<T> {
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest).flat_map(|i| lists.iter().filter_map(move |l| l.get(i).cloned())).collect()
}

/// One `make(event, at)` per event, the times `at` being `step` apart from `start`.
pub fn spaced<E, T>(events: Vec<E>, start: i64, step: i64, mut make: impl FnMut(E, i64) -> T) -> Vec<T> {
    events.into_iter().zip((0..).map(|i: i64| start + i * step)).map(|(event, at)| make(event, at)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_lists_of_different_lengths() {
        assert_eq!(interleave(&[vec![1, 2, 3], vec![10], vec![20, 21]]), vec![1, 10, 20, 2, 21, 3]);
        assert!(interleave::<u8>(&[]).is_empty());
    }

    #[test]
    fn spaces_events_from_the_start() {
        assert_eq!(
            spaced(vec!['a', 'b', 'c'], 5, 1_000, |e, at| (e, at)),
            vec![('a', 5), ('b', 1_005), ('c', 2_005)]
        );
    }
}
