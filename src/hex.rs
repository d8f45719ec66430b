//! Lowercase hex, for message ids and the recipient names in Redis keys.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lowercase hex, two digits a byte.
pub(crate) fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 15)] as char);
    }
    out
}

/// The bytes that hex `text` (lowercase or uppercase) stands for; `None` if it is not hex
/// (an odd length, or a character that is not a digit).
pub(crate) fn decode(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

fn digit(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(encode(&all).as_bytes()), Some(all));
        assert_eq!(encode(&[0x0a, 0xff]), "0aff");
        assert_eq!(decode(b"0AfF"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode(b"abc"), None);
        assert_eq!(decode(b"zz"), None);
        assert_eq!(decode(b"+1"), None);
        assert_eq!(decode(b""), Some(Vec::new()));
    }
}
