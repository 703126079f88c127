//! Hints for common slips, shown in an error's `hint`: specific to one mistake, with the
//! value the client probably meant.
//!
//! - Epoch **seconds** where tally takes milliseconds: a number that read as milliseconds
//!   lands in January or February 1970, where no event can be, but read as seconds is a
//!   date between 2000 and 2100.
//! - A `+` in a query string that arrived as a space: form encoding decodes `+` to a
//!   space, so `from=2026-01-01T00:00:00+01:00` reaches the server as
//!   `2026-01-01T00:00:00 01:00` unless the `+` is sent as `%2B`.

use std::ops::Range;

/// Epoch seconds of 2000-01-01 and 2100-01-01: the numbers that are plausible dates in
/// seconds (and, read as milliseconds, times in the first 48 days of 1970).
const PLAUSIBLE_SECONDS: Range<i64> = 946_684_800..4_102_444_800;

/// A hint when `value` of `field` looks like epoch seconds.
pub(crate) fn epoch_seconds(field: &str, value: i64) -> Option<String> {
    if !PLAUSIBLE_SECONDS.contains(&value) {
        return None;
    }
    let date = jiff::Timestamp::from_second(value).ok()?;
    Some(format!("{field} {value} looks like epoch seconds ({date}); tally takes epoch milliseconds: {}", value * 1000))
}

/// The first hint of `from` and `to` (each as given, in milliseconds) looking like epoch
/// seconds.
pub(crate) fn range_in_seconds(from: Option<i64>, to: Option<i64>) -> Option<String> {
    let from = from.and_then(|ms| epoch_seconds("from", ms));
    from.or_else(|| to.and_then(|ms| epoch_seconds("to", ms)))
}

/// A hint when query parameter `field`'s `value` holds a space that was probably a `+`:
/// `value` with it (the last one, or every one) back as `+` is `accepted`.
pub(crate) fn plus_as_space(field: &str, value: &str, accepted: impl Fn(&str) -> bool) -> Option<String> {
    let (before, after) = value.rsplit_once(' ')?;
    let meant = [format!("{before}+{after}"), value.replace(' ', "+")].into_iter().find(|meant| accepted(meant))?;
    Some(format!(
        "a + in a query string arrives as a space; percent-encode it as %2B: {field}={}",
        meant.replace('+', "%2B").replace(' ', "%20")
    ))
}

/// A hint for a `tz` that is an offset whose `+` arrived as a space (` 05:30`): tz takes
/// IANA names, so even encoded it is refused; say both.
pub(crate) fn offset_as_tz(value: &str) -> Option<String> {
    let offset = value.strip_prefix(' ')?;
    let (hours, minutes) = offset.split_once(':').unwrap_or((offset, "00"));
    let digits = |text: &str| (1..=2).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit());
    if !digits(hours) || !digits(minutes) {
        return None;
    }
    Some(format!(
        "a + in a query string arrives as a space (percent-encode it as %2B), so this was +{offset}; \
         tz takes an IANA time zone name (e.g. Asia/Kolkata or Etc/GMT-5), not an offset: \
         give the offset in from and to instead (e.g. from=2026-01-01T00:00:00%2B{offset})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_recognised_only_where_they_are_plausible_dates() {
        let hint = epoch_seconds("ts", 1_767_225_600).unwrap();
        assert_eq!(
            hint,
            "ts 1767225600 looks like epoch seconds (2026-01-01T00:00:00Z); tally takes epoch milliseconds: 1767225600000"
        );
        for not_seconds in [0, 10, 946_684_799, 4_102_444_800, 1_767_225_600_000, -1_767_225_600] {
            assert_eq!(epoch_seconds("ts", not_seconds), None, "{not_seconds}");
        }
        assert!(range_in_seconds(Some(0), Some(1_767_225_600)).unwrap().starts_with("to 1767225600 "));
        assert!(range_in_seconds(Some(1_767_225_600), Some(1_767_225_600)).unwrap().starts_with("from "));
        assert_eq!(range_in_seconds(None, Some(1_767_225_600_000)), None);
    }

    #[test]
    fn a_plus_that_became_a_space_is_hinted_with_the_encoded_value() {
        let parses = |text: &str| text.parse::<jiff::Timestamp>().is_ok();
        assert_eq!(
            plus_as_space("from", "2026-01-01T00:00:00 01:00", parses).unwrap(),
            "a + in a query string arrives as a space; percent-encode it as %2B: from=2026-01-01T00:00:00%2B01:00"
        );
        // Only the last space was a +: the other one stays (encoded).
        assert!(
            plus_as_space("from", "2026-01-01 00:00:00 01:00", parses)
                .unwrap()
                .ends_with("from=2026-01-01%2000:00:00%2B01:00")
        );
        assert_eq!(plus_as_space("from", "yesterday at noon", parses), None);
        assert_eq!(plus_as_space("from", "2026-01-01T00:00:00Z", parses), None);
        let zone = |name: &str| jiff::tz::TimeZone::get(name).is_ok();
        assert!(plus_as_space("tz", "Etc/GMT 5", zone).unwrap().ends_with("tz=Etc/GMT%2B5"));
    }

    #[test]
    fn an_offset_given_as_tz_is_hinted() {
        let hint = offset_as_tz(" 05:30").unwrap();
        assert!(hint.contains("%2B") && hint.contains("+05:30") && hint.contains("IANA"), "{hint}");
        assert!(offset_as_tz(" 5").unwrap().contains("+5"));
        assert_eq!(offset_as_tz("Europe/Berlin"), None);
        assert_eq!(offset_as_tz(" Berlin"), None);
    }
}
