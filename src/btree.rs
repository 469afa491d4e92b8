//! B-tree upkeep shared by the tables that hold a path or a route each
//! (Loc-RIB, each session's Adj-RIB-In, the kernel mirror).

use std::collections::BTreeMap;

/// A B-tree filled by ascending inserts (a BGP feed, a kernel dump) keeps
/// its nodes about half full: at 1,000,000 entries that is the larger part
/// of what the RIB, the Adj-RIB-In and the kernel mirror cost. Rebuilt
/// from its sorted entries, every node is full. `grown` counts the inserts
/// since the last rebuild; the map is rebuilt once they reach half its
/// size (and `COMPACT_MIN`), so the rebuilds cost O(1) per insert.
pub fn compact_when_grown<K: Ord, V>(map: &mut BTreeMap<K, V>, grown: &mut usize) -> bool {
    const COMPACT_MIN: usize = 65_536;
    if *grown < COMPACT_MIN || *grown < map.len() / 2 {
        return false;
    }
    *map = std::mem::take(map).into_iter().collect();
    *grown = 0;
    true
}

/// [`compact_when_grown`] for a map that also shrinks: its growth counted
/// as its size above `base`, its size at the last rebuild (0 when it was
/// built by inserts).
pub fn compact_past<K: Ord, V>(map: &mut BTreeMap<K, V>, base: &mut usize) -> bool {
    let mut grown = map.len().saturating_sub(*base);
    let rebuilt = compact_when_grown(map, &mut grown);
    if rebuilt {
        *base = map.len();
    }
    rebuilt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grown_map_is_rebuilt_whole_and_only_when_grown_enough() {
        let mut m: BTreeMap<u32, u32> = (0..200_000).map(|i| (i, i * 2)).collect();
        let mut grown = 70_000;
        assert!(
            !compact_when_grown(&mut m, &mut grown),
            "less than half its size"
        );
        assert_eq!(grown, 70_000);
        grown = 100_000;
        assert!(compact_when_grown(&mut m, &mut grown));
        assert_eq!(grown, 0);
        assert_eq!(m.len(), 200_000);
        assert!(
            m.iter()
                .enumerate()
                .all(|(i, (k, v))| *k == i as u32 && *v == k * 2)
        );
        let mut small: BTreeMap<u32, u32> = (0..60_000).map(|i| (i, i)).collect();
        let mut grown = 60_000;
        assert!(
            !compact_when_grown(&mut small, &mut grown),
            "small maps are left alone"
        );
    }
}
