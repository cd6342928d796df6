//! What the fuzz targets share: reading request parts out of fuzz input.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The headers written as `name: value` lines (value trimmed). A line that is no valid header is
/// skipped: the targets test what the gateway does with headers hyper would hand it, not hyper's parser.
pub fn header_lines<'a>(lines: impl Iterator<Item = &'a [u8]>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    headers
}
