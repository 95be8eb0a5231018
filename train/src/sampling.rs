//! Which examples an epoch visits, in what order: class-balanced draws or a plain shuffle.

use adaptd_adapters::tensor::SeededRng;

/// Training samples per class; a label outside `0..classes` counts for none.
pub fn class_counts(labels: &[i64], classes: usize) -> Vec<usize> {
    let mut counts = vec![0usize; classes];
    for &label in labels {
        if let Some(count) = usize::try_from(label).ok().and_then(|l| counts.get_mut(l)) {
            *count += 1;
        }
    }
    counts
}

/// One epoch's sample order: a shuffle, or (class-balanced) an equal share of the epoch for each
/// class present, each share drawn from a fresh shuffle of that class and repeated only when the
/// class is smaller than its share. Drawing with replacement instead leaves about a third of the
/// samples unseen each epoch; measured on the blurred-and-dropped digits, that cost 6 points.
pub fn epoch_order(labels: &[i64], class_counts: &[usize], balanced: bool, rng: &mut SeededRng) -> Vec<usize> {
    let n = labels.len();
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, rng);
    if !balanced {
        return order;
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); class_counts.len()];
    for &i in &order {
        // A label outside `class_counts` has no class to draw it for: a balanced epoch leaves it out.
        if let Some(members) = usize::try_from(labels[i]).ok().and_then(|l| by_class.get_mut(l)) {
            members.push(i);
        }
    }
    by_class.retain(|members| !members.is_empty());
    if by_class.is_empty() {
        return order;
    }
    // The remainder of n over the classes goes to classes chosen at random, one each.
    let (share, remainder) = (n / by_class.len(), n % by_class.len());
    let mut extra: Vec<usize> = (0..by_class.len()).collect();
    shuffle(&mut extra, rng);
    extra.truncate(remainder);
    let mut balanced_order = Vec::with_capacity(n);
    for (class, members) in by_class.iter().enumerate() {
        let quota = share + usize::from(extra.contains(&class));
        balanced_order.extend(members.iter().cycle().take(quota));
    }
    shuffle(&mut balanced_order, rng);
    balanced_order
}

fn shuffle(items: &mut [usize], rng: &mut SeededRng) {
    for i in (1..items.len()).rev() {
        items.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(labels: &[i64], classes: usize) -> Vec<usize> {
        let mut c = vec![0; classes];
        for &l in labels {
            c[l as usize] += 1;
        }
        c
    }

    #[test]
    fn a_balanced_epoch_over_balanced_classes_sees_every_sample_once() {
        let labels: Vec<i64> = (0..300).map(|i| i % 3).collect();
        let mut order = epoch_order(&labels, &counts(&labels, 3), true, &mut SeededRng::new(7));
        assert_ne!(order, (0..300).collect::<Vec<_>>(), "shuffled");
        order.sort_unstable();
        assert_eq!(order, (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn a_balanced_epoch_gives_each_class_an_equal_share_without_repeats_where_the_class_has_enough() {
        // 90 of class 0, 8 of class 1, 2 of class 2 (and class 3 absent).
        let labels: Vec<i64> = (0..100)
            .map(|i| {
                if i < 90 {
                    0
                } else if i < 98 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let order = epoch_order(&labels, &counts(&labels, 4), true, &mut SeededRng::new(1));
        assert_eq!(order.len(), 100);
        let per_class = counts(&order.iter().map(|&i| labels[i]).collect::<Vec<_>>(), 4);
        assert!(per_class[..3].iter().all(|&c| c == 33 || c == 34), "{per_class:?}");
        assert_eq!(per_class[3], 0);
        let mut common: Vec<usize> = order.iter().copied().filter(|&i| labels[i] == 0).collect();
        common.sort_unstable();
        common.dedup();
        assert_eq!(common.len(), per_class[0], "class 0 has more members than its share: none repeats");
        let rare: std::collections::HashSet<usize> = order.iter().copied().filter(|&i| labels[i] == 2).collect();
        assert_eq!(rare.len(), 2, "a class smaller than its share repeats all of its members");
    }

    #[test]
    fn an_unbalanced_epoch_is_a_permutation() {
        let labels = vec![0i64; 50];
        let mut order = epoch_order(&labels, &counts(&labels, 1), false, &mut SeededRng::new(3));
        order.sort_unstable();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
    }
}
