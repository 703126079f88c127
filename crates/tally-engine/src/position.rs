//! Positions: how far in each partition's log a write reached, so that a later query can
//! wait until it sees that write (read-your-writes across nodes).

use std::fmt;

/// Per partition, the log offset just past a write: a query that waits for a position
/// sees every write it names. Written `p:offset,p:offset` (sorted by partition); clients
/// treat it as opaque.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(Vec<(u32, u64)>);

/// Partitions a position names at most (a request touches each partition once).
const POSITION_PARTITIONS_MAX: usize = 4_096;

impl Position {
    pub fn new(mut parts: Vec<(u32, u64)>) -> Position {
        parts.sort_unstable();
        // One entry per partition, the furthest.
        parts.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 = earlier.1.max(later.1);
            }
            same
        });
        Position(parts)
    }

    /// Adds `other`'s parts, keeping the furthest offset of each partition.
    pub fn extend(&mut self, other: &Position) {
        let mut parts = std::mem::take(&mut self.0);
        parts.extend_from_slice(&other.0);
        *self = Position::new(parts);
    }

    pub fn parts(&self) -> &[(u32, u64)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (partition, offset)) in self.0.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(f, "{comma}{partition}:{offset}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Position, String> {
        if text.is_empty() {
            return Ok(Position::default());
        }
        let mut parts = Vec::new();
        for part in text.split(',') {
            if parts.len() == POSITION_PARTITIONS_MAX {
                return Err(format!("a position names at most {POSITION_PARTITIONS_MAX} partitions"));
            }
            let parsed = part.split_once(':').and_then(|(p, o)| Some((p.parse().ok()?, o.parse().ok()?)));
            let Some(part) = parsed else {
                return Err(format!("{part:?} is not partition:offset (pass the \"position\" a write answered)"));
            };
            parts.push(part);
        }
        Ok(Position::new(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_as_written_keeping_the_furthest_offset_of_a_partition() {
        let position = Position::new(vec![(3, 10), (0, 7), (3, 12)]);
        assert_eq!(position.to_string(), "0:7,3:12");
        assert_eq!("0:7,3:12".parse::<Position>().unwrap(), position);
        assert_eq!("".parse::<Position>().unwrap(), Position::default());
        assert!("0:7,x".parse::<Position>().unwrap_err().contains("partition:offset"));
        assert!("0:-1".parse::<Position>().is_err());
        let mut furthest = position.clone();
        furthest.extend(&"3:11,5:2".parse().unwrap());
        assert_eq!(furthest.to_string(), "0:7,3:12,5:2");
    }
}
