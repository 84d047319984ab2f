//! Generated VirtualService routes for property tests.

use proptest::prelude::*;

/// A route: (subset index 0..4, weight or none).
pub type Route = Vec<(usize, Option<u32>)>;

/// Routes of 1 to `max` destinations over distinct subsets 0..4 whose weights validate as Istio
/// checks them: one destination with or without `weight: 100`; several summing to 100, where a
/// missing weight counts as 0 (so only a zero weight may be left out).
pub fn route(max: usize) -> impl Strategy<Value = Route> {
    (1usize..=max.clamp(1, 4)).prop_flat_map(|n| {
        let subsets = proptest::sample::subsequence(vec![0usize, 1, 2, 3], n).prop_shuffle();
        let cuts = proptest::collection::vec(0u32..=100, n - 1);
        let missing = proptest::collection::vec(any::<bool>(), n);
        (subsets, cuts, missing).prop_map(move |(subsets, mut cuts, missing)| {
            if n == 1 {
                return vec![(subsets[0], if missing[0] { None } else { Some(100) })];
            }
            cuts.sort();
            let mut weights = Vec::new();
            let mut last = 0;
            for c in cuts.iter().chain(std::iter::once(&100)) {
                weights.push(c - last);
                last = *c;
            }
            let zipped = subsets.into_iter().zip(weights).zip(missing);
            zipped.map(|((s, w), m)| (s, if m && w == 0 { None } else { Some(w) })).collect()
        })
    })
}
