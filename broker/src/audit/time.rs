//! RFC 3339 timestamps in UTC (`2025-06-01T12:34:56.123456Z`), without a
//! date library: civil dates from days since the epoch (Howard Hinnant's
//! algorithm), valid for every year 0000..=9999.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (0 for a clock set before 1970).
pub fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date.
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

/// The parts of a timestamp.
fn split(micros: i64) -> (i64, i64, i64, i64, i64, i64, i64) {
    let days = micros.div_euclid(MICROS_PER_DAY);
    let rest = micros.rem_euclid(MICROS_PER_DAY);
    let (y, mo, d) = civil_from_days(days);
    let secs = rest / 1_000_000;
    (
        y,
        mo,
        d,
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        rest % 1_000_000,
    )
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn rfc3339(micros: i64) -> String {
    let (y, mo, d, h, mi, s, us) = split(micros);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z")
}

/// `YYYYMMDDTHHMMSSZ`, for file names.
pub fn compact(micros: i64) -> String {
    let (y, mo, d, h, mi, s, _) = split(micros);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// Parses exactly the form [`rfc3339`] writes, back to microseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 27 {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = b.get(from..to)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let punct = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ];
    if punct.iter().any(|&(i, c)| b.get(i) != Some(&c)) {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, s, us) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 26)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let max_day = *month_days.get(usize::try_from(mo).ok()?.checked_sub(1)?)?;
    if d < 1 || d > max_day || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    Some(days * MICROS_PER_DAY + ((h * 60 + mi) * 60 + s) * 1_000_000 + us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29T23:59:59.999999Z, a leap day.
        assert_eq!(rfc3339(951_868_799_999_999), "2000-02-29T23:59:59.999999Z");
        assert_eq!(
            rfc3339(1_748_781_296_123_456),
            "2025-06-01T12:34:56.123456Z"
        );
        assert_eq!(compact(1_748_781_296_123_456), "20250601T123456Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_748_781_296_123_456);
        assert_eq!(micros(t), 1_748_781_296_123_456);
    }

    #[test]
    fn round_trip() {
        let mut t: i64 = 0;
        while t < 4_102_444_800_000_000 {
            let text = rfc3339(t);
            assert_eq!(parse_rfc3339(&text), Some(t), "{text}");
            t += 86_399_999_937;
        }
    }

    #[test]
    fn rejects_other_forms() {
        for bad in [
            "",
            "2025-06-01T12:34:56Z",
            "2025-06-01T12:34:56.123456+00:00",
            "2025-06-01 12:34:56.123456Z",
            "2025-13-01T12:34:56.123456Z",
            "2025-02-30T12:34:56.123456Z",
            "2025-06-01T24:00:00.000000Z",
            "2025-06-01T12:34:5a.123456Z",
            "+025-06-01T12:34:56.123456Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
