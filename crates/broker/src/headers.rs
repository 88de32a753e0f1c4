//! Headers-exchange matching (RabbitMQ semantics): `x-match` is `all` (default), `any`,
//! `all-with-x` or `any-with-x`; binding arguments whose name starts with `x-` are
//! ignored unless a `-with-x` mode is used. A binding argument of type void matches any
//! message header of that name.

use holdfast_codec::{AMQPValue, FieldTable};

/// Whether a message with `headers` matches a binding with `arguments`.
#[must_use]
pub fn headers_match(arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = match arguments.inner().get("x-match") {
        Some(AMQPValue::LongString(mode)) => String::from_utf8_lossy(mode.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(mode)) => mode.as_str().to_owned(),
        _ => "all".to_owned(),
    };
    let (any, with_x) = match mode.as_str() {
        "any" => (true, false),
        "any-with-x" => (true, true),
        "all-with-x" => (false, true),
        _ => (false, false),
    };
    let mut considered = arguments
        .inner()
        .iter()
        .filter(|(name, _)| name.as_str() != "x-match")
        .filter(|(name, _)| with_x || !name.as_str().starts_with("x-"))
        .peekable();
    if considered.peek().is_none() {
        // RabbitMQ: an `all` binding with nothing to compare matches everything; `any`
        // matches nothing.
        return !any;
    }
    let mut matches = considered.map(|(name, expected)| {
        let actual = headers.and_then(|headers| headers.inner().get(name));
        match (expected, actual) {
            (_, None) => false,
            (AMQPValue::Void, Some(_)) => true,
            (expected, Some(actual)) => values_equal(expected, actual),
        }
    });
    if any {
        matches.any(|hit| hit)
    } else {
        matches.all(|hit| hit)
    }
}

/// Clients encode the same string as short or long string, and the same number at
/// different widths; compare the way RabbitMQ's Erlang terms compare.
fn values_equal(left: &AMQPValue, right: &AMQPValue) -> bool {
    fn text(value: &AMQPValue) -> Option<&[u8]> {
        match value {
            AMQPValue::LongString(s) => Some(s.as_bytes()),
            AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
            _ => None,
        }
    }
    fn integer(value: &AMQPValue) -> Option<i128> {
        match value {
            AMQPValue::Timestamp(v) => Some(i128::from(*v)),
            other => crate::arguments::integer(other),
        }
    }
    if let (Some(a), Some(b)) = (text(left), text(right)) {
        return a == b;
    }
    if let (Some(a), Some(b)) = (integer(left), integer(right)) {
        return a == b;
    }
    left == right
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_codec::{LongString, ShortString};

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (name, value) in pairs {
            table.insert(ShortString::from(*name), value.clone());
        }
        table
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn all_any_and_x_keys() {
        let message = table(&[("format", text("pdf")), ("type", text("report"))]);
        let all = table(&[("format", text("pdf")), ("type", text("report"))]);
        assert!(headers_match(&all, Some(&message)));
        let all_miss = table(&[("format", text("pdf")), ("type", text("log"))]);
        assert!(!headers_match(&all_miss, Some(&message)));
        let any = table(&[
            ("x-match", text("any")),
            ("format", text("zip")),
            ("type", text("report")),
        ]);
        assert!(headers_match(&any, Some(&message)));
        assert!(!headers_match(&any, None));
        let with_x = table(&[("x-match", text("all-with-x")), ("x-tenant", text("a"))]);
        assert!(!headers_match(&with_x, Some(&message)));
        let tenant = table(&[("x-tenant", text("a"))]);
        assert!(headers_match(&with_x, Some(&tenant)));
        let presence = table(&[("format", AMQPValue::Void)]);
        assert!(headers_match(&presence, Some(&message)));
        let widths = table(&[("n", AMQPValue::LongInt(5))]);
        assert!(headers_match(
            &widths,
            Some(&table(&[("n", AMQPValue::ShortShortUInt(5))]))
        ));
        assert!(headers_match(&FieldTable::default(), None));
    }
}
