//! Settings in human units: durations (`500ms`, `10s`, `5m`, `2h`, `7d`) and sizes
//! (`4096`, `64KiB`, `256MiB`, `1GiB`, and the decimal `10MB`), in a configuration file,
//! an environment variable or a flag alike. Each prints back the way it would be written.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration, whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub u64);

/// A size, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

const DURATION_UNITS: [(&str, u64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];
const SIZE_UNITS: [(&str, u64); 8] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("kB", 1_000),
    ("B", 1),
];

/// Splits `text` into a number and a unit, and scales the number by the unit.
fn scaled(text: &str, units: &[(&str, u64)], what: &str, example: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit() && c != '_').unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 =
        number.replace('_', "").parse().map_err(|_| format!("{text:?} is not a {what} (e.g. {example})"))?;
    let unit = unit.trim();
    let scale = match units.iter().find(|(name, _)| *name == unit) {
        Some((_, scale)) => *scale,
        None if unit.is_empty() && what == "size" => 1,
        None => {
            let names: Vec<&str> = units.iter().map(|(name, _)| *name).collect();
            return Err(format!(
                "{text:?} is not a {what}: the unit must be one of {} (e.g. {example})",
                names.join(", ")
            ));
        }
    };
    number.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))
}

/// The largest unit that writes `value` exactly.
fn written(value: u64, units: &[(&str, u64)], binary_only: bool) -> String {
    for (name, scale) in units {
        let decimal = !name.contains('i') && *name != "B";
        if value != 0 && value.is_multiple_of(*scale) && !(binary_only && decimal) {
            return format!("{}{name}", value / scale);
        }
    }
    format!("{value}{}", units.last().map_or("", |(name, _)| name))
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(text: &str) -> Result<Duration, String> {
        scaled(text, &DURATION_UNITS, "duration", "500ms, 10s, 5m, 2h, 7d").map(Duration)
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(text: &str) -> Result<Size, String> {
        scaled(text, &SIZE_UNITS, "size", "4096, 64KiB, 256MiB, 1GiB").map(Size)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&written(self.0, &DURATION_UNITS, false))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&written(self.0, &SIZE_UNITS, true))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A duration must carry its unit, in a file as anywhere: a bare number is refused.
impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)
            .map_err(|_| serde::de::Error::custom("a duration is a string with a unit, e.g. \"500ms\", \"10s\""))?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A size is a number of bytes or a string with a unit.
impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(deserializer)
            .map_err(|_| serde::de::Error::custom("a size is a number of bytes or a string, e.g. \"256MiB\""))?
        {
            Written::Bytes(bytes) => Ok(Size(bytes)),
            Written::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_and_print_in_their_largest_exact_unit() {
        for (text, ms, printed) in [
            ("500ms", 500, "500ms"),
            ("10s", 10_000, "10s"),
            ("90s", 90_000, "90s"),
            ("5m", 300_000, "5m"),
            ("2h", 7_200_000, "2h"),
            ("7d", 604_800_000, "7d"),
            ("1500ms", 1_500, "1500ms"),
            ("0s", 0, "0ms"),
        ] {
            let duration: Duration = text.parse().unwrap();
            assert_eq!(duration, Duration(ms), "{text}");
            assert_eq!(duration.to_string(), printed);
            assert_eq!(duration.to_string().parse::<Duration>().unwrap(), duration);
        }
        for bad in ["10", "ten s", "5 weeks", "10sec", "-1s", "99999999999999999999d"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_read_binary_and_decimal_units_and_bare_bytes() {
        for (text, bytes, printed) in [
            ("4096", 4096, "4KiB"),
            ("256MiB", 256 << 20, "256MiB"),
            ("1GiB", 1 << 30, "1GiB"),
            ("10MB", 10_000_000, "10000000B"),
            ("1_000", 1000, "1000B"),
            ("64 KiB", 64 << 10, "64KiB"),
        ] {
            let size: Size = text.parse().unwrap();
            assert_eq!(size, Size(bytes), "{text}");
            assert_eq!(size.to_string(), printed);
            assert_eq!(size.to_string().parse::<Size>().unwrap(), size);
        }
        for bad in ["1 parsec", "MiB", "-5"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
    }

    #[test]
    fn in_toml_a_duration_needs_a_unit_and_a_size_may_be_bytes() {
        #[derive(Deserialize)]
        struct Both {
            duration: Duration,
            size: Size,
        }
        let both: Both = toml::from_str("duration = \"2s\"\nsize = 1024").unwrap();
        assert_eq!((both.duration, both.size), (Duration(2000), Size(1024)));
        let error = toml::from_str::<Both>("duration = 2000\nsize = 1").err().unwrap().to_string();
        assert!(error.contains("a duration is a string with a unit"), "{error}");
    }
}
