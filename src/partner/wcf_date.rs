//! WCF JSON dates: `/Date(<ms since the Unix epoch, UTC>[+-]HHMM)/` to RFC 3339.
//!
//! The offset, when present, is the partner server's local offset at that instant; the result is
//! given in that offset so callers see what the partner meant. No offset means UTC (`Z`).
//! `DateTime.MinValue` (year 1, in whatever offset) is WCF's "no date" and becomes `None`.

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// Why a WCF date string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WcfDateError {
    /// Not of the form `/Date(…)/`.
    #[error("not a /Date(ms±HHMM)/ value")]
    Shape,
    /// The milliseconds are not an integer.
    #[error("the milliseconds are not an integer")]
    Millis,
    /// The offset is not `±HHMM` with minutes below 60 and hours below 24.
    #[error("the offset is not ±HHMM")]
    Offset,
    /// The instant cannot be represented as an RFC 3339 date (outside years 1–9999).
    #[error("the instant is out of range")]
    Range,
}

/// Parses a WCF date into RFC 3339; `Ok(None)` for WCF's "no date" (`DateTime.MinValue`).
pub fn parse_wcf_date(raw: &str) -> Result<Option<String>, WcfDateError> {
    let inner = raw
        .trim()
        .strip_prefix("/Date(")
        .and_then(|s| s.strip_suffix(")/"))
        .ok_or(WcfDateError::Shape)?;

    // The sign of the offset is the first `+` or `-` after the first character (which may be the
    // sign of the milliseconds).
    let split = inner
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == '+' || c == '-')
        .map(|(i, _)| i);
    let (millis, offset) = match split {
        Some(i) => (&inner[..i], Some(&inner[i..])),
        None => (inner, None),
    };

    let digits = millis.strip_prefix('-').unwrap_or(millis);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WcfDateError::Millis);
    }
    let millis: i64 = millis.parse().map_err(|_| WcfDateError::Millis)?;
    let offset = offset.map(parse_offset).transpose()?;

    let utc = OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .map_err(|_| WcfDateError::Range)?;
    let local = match offset {
        Some(o) => utc.checked_to_offset(o).ok_or(WcfDateError::Range)?,
        None => utc,
    };
    // DateTime.MinValue is serialized as year 1 in the server's offset, which in UTC can fall on
    // either side of the year boundary; nothing real happened before year 2.
    if utc.year() <= 1 || local.year() <= 1 {
        return Ok(None);
    }
    local
        .format(&Rfc3339)
        .map(Some)
        .map_err(|_| WcfDateError::Range)
}

fn parse_offset(s: &str) -> Result<UtcOffset, WcfDateError> {
    let (sign, rest) = s.split_at(1);
    let sign: i8 = if sign == "-" { -1 } else { 1 };
    if rest.len() != 4 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WcfDateError::Offset);
    }
    let hours: i8 = rest[..2].parse().map_err(|_| WcfDateError::Offset)?;
    let minutes: i8 = rest[2..].parse().map_err(|_| WcfDateError::Offset)?;
    if hours > 23 || minutes > 59 {
        return Err(WcfDateError::Offset);
    }
    UtcOffset::from_hms(sign * hours, sign * minutes, 0).map_err(|_| WcfDateError::Offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> Option<String> {
        parse_wcf_date(raw).unwrap()
    }

    #[test]
    fn negative_offset_is_kept() {
        assert_eq!(
            ok("/Date(1550761010000-0500)/").as_deref(),
            Some("2019-02-21T09:56:50-05:00")
        );
    }

    #[test]
    fn positive_offset_is_kept() {
        assert_eq!(
            ok("/Date(1550761010000+0530)/").as_deref(),
            Some("2019-02-21T20:26:50+05:30")
        );
    }

    #[test]
    fn no_offset_means_utc() {
        assert_eq!(
            ok("/Date(1550761010000)/").as_deref(),
            Some("2019-02-21T14:56:50Z")
        );
    }

    #[test]
    fn zero_offset_is_utc() {
        assert_eq!(
            ok("/Date(0+0000)/").as_deref(),
            Some("1970-01-01T00:00:00Z")
        );
    }

    #[test]
    fn milliseconds_are_kept() {
        assert_eq!(
            ok("/Date(1550761010123)/").as_deref(),
            Some("2019-02-21T14:56:50.123Z")
        );
    }

    #[test]
    fn negative_milliseconds_are_before_1970() {
        assert_eq!(
            ok("/Date(-86400000-0500)/").as_deref(),
            Some("1969-12-30T19:00:00-05:00")
        );
        assert_eq!(
            ok("/Date(-1)/").as_deref(),
            Some("1969-12-31T23:59:59.999Z")
        );
    }

    #[test]
    fn min_value_in_any_offset_is_no_date() {
        assert_eq!(ok("/Date(-62135578800000-0500)/"), None);
        assert_eq!(ok("/Date(-62135596800000)/"), None);
        assert_eq!(ok("/Date(-62135596800000+0000)/"), None);
        assert_eq!(ok("/Date(-62135629200000+0900)/"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

        /// Any input: no panic.
        #[test]
        fn parse_never_panics(raw in "\\PC{0,40}|/Date\\([-+0-9]{0,24}\\)/") {
            let _ = parse_wcf_date(&raw);
        }

        /// Every representable instant and offset round-trips to the same instant and offset.
        #[test]
        fn valid_dates_round_trip(
            ms in -62_135_596_800_000i64..=253_402_300_799_999,
            negative in proptest::bool::ANY,
            hours in 0u8..24,
            minutes in 0u8..60,
        ) {
            let sign = if negative { '-' } else { '+' };
            let raw = format!("/Date({ms}{sign}{hours:02}{minutes:02})/");
            match parse_wcf_date(&raw) {
                Ok(Some(text)) => {
                    let parsed = OffsetDateTime::parse(&text, &Rfc3339).expect("RFC 3339");
                    proptest::prop_assert_eq!(parsed.unix_timestamp_nanos(), i128::from(ms) * 1_000_000);
                    let seconds = (i32::from(hours) * 3600 + i32::from(minutes) * 60) * if negative { -1 } else { 1 };
                    proptest::prop_assert_eq!(parsed.offset().whole_seconds(), seconds);
                }
                Ok(None) => proptest::prop_assert!(ms < -62_104_060_800_000 + 86_400_000, "only year 1 is no date: {}", raw),
                Err(WcfDateError::Range) => proptest::prop_assert!(ms > 253_402_000_000_000, "only the far end overflows: {}", raw),
                Err(e) => proptest::prop_assert!(false, "{}: {}", raw, e),
            }
        }
    }

    #[test]
    fn malformed_values_are_errors() {
        let cases = [
            ("", WcfDateError::Shape),
            ("2019-02-21T09:56:50Z", WcfDateError::Shape),
            ("/Date()/", WcfDateError::Millis),
            ("/Date(abc)/", WcfDateError::Millis),
            ("/Date(1.5)/", WcfDateError::Millis),
            ("/Date(--5)/", WcfDateError::Millis),
            ("/Date(99999999999999999999)/", WcfDateError::Millis),
            ("/Date(0+05)/", WcfDateError::Offset),
            ("/Date(0+0560)/", WcfDateError::Offset),
            ("/Date(0+2500)/", WcfDateError::Offset),
            ("/Date(0-05:00)/", WcfDateError::Offset),
            ("/Date(0+0500", WcfDateError::Shape),
            ("/Date(9999999999999999)/", WcfDateError::Range),
            ("/Date(-999999999999999)/", WcfDateError::Range),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_wcf_date(input), Err(expected), "{input:?}");
        }
    }
}
