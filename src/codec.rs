//! Encoding, in one place so it can be replaced: typed payloads through serde and bincode 2, and
//! the framing of a stored record body (raw, or lz4-compressed with the `compression` feature).
//!
//! A record body is the data then one tag byte (a trailer, so decoding a raw body is a
//! truncation, not a copy):
//! - `0`: the payload as sent;
//! - `1`: an lz4 block followed by the decompressed length as a little-endian `u32`.
//!
//! Decoding checks the declared length against a cap before allocating, so a corrupt or hostile
//! record cannot make the reader allocate without bound (a decompression bomb).

use bytes::Bytes;

use crate::error::Error;

const TAG_RAW: u8 = 0;
const TAG_LZ4: u8 = 1;

/// Longest length a decoded payload may declare for one string or collection: bincode
/// allocates what a length prefix says, so a 9-byte hostile payload could otherwise ask for
/// exabytes.
const DECODE_LIMIT: usize = 16 << 20;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Serializes `value` for a payload ([`Envelope::encode`](crate::Envelope::encode) uses this).
///
/// # Errors
/// [`Error::Codec`] if serde fails.
pub fn to_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    let codec_error = |e: bincode::error::EncodeError| Error::Codec(e.to_string());
    // Sized first, then written into one allocation with a byte to spare for the body's tag
    // (`encode_body`): growing a buffer as bincode writes would reallocate and copy it
    // several times for a payload of a few hundred bytes.
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, bincode_config()).map_err(codec_error)?;
    let mut out = Vec::with_capacity(size.bytes_written + 1);
    bincode::serde::encode_into_writer(value, VecWriter(&mut out), bincode_config())
        .map_err(codec_error)?;
    Ok(out)
}

/// Appends to a vector that already has the room (see [`to_bytes`]).
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Deserializes a payload made by [`to_bytes`]; trailing bytes are an error.
///
/// # Errors
/// [`Error::Codec`] if `bytes` is not a complete encoding of `T`.
pub fn from_bytes<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode_config())
        .map_err(|e| Error::Codec(e.to_string()))?;
    if used != bytes.len() {
        return Err(Error::Codec(format!(
            "{} trailing bytes after the value",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Frames `payload` as a record body, compressing it when it is at least `compress_at` bytes
/// long and compression makes it smaller.
pub fn encode_body(payload: Vec<u8>, compress_at: Option<usize>) -> Vec<u8> {
    #[cfg(feature = "compression")]
    if let Some(threshold) = compress_at
        && payload.len() >= threshold
        && let Ok(len) = u32::try_from(payload.len())
    {
        let mut body = lz4_flex::block::compress(&payload);
        if body.len() + 5 < payload.len() + 1 {
            body.extend_from_slice(&len.to_le_bytes());
            body.push(TAG_LZ4);
            return body;
        }
    }
    #[cfg(not(feature = "compression"))]
    let _ = compress_at;
    // The payload's own buffer, grown by one byte for the tag: usually in place (the
    // allocator rounds sizes up), so a raw body costs no copy.
    let mut body = payload;
    body.reserve_exact(1);
    body.push(TAG_RAW);
    body
}

/// Reads a record body back into its payload. A raw body is returned in place, without
/// copying (the payload shares the body's buffer); a compressed one is refused if it declares
/// more than `max_len` bytes.
///
/// # Errors
/// [`Error::Codec`] for an empty body, an unknown tag, a declared length over `max_len`, or
/// compressed data that does not decode to exactly the declared length;
/// [`Error::UnsupportedRecord`] for a compressed body when the `compression` feature is off
/// (the record is fine; this build cannot read it).
pub fn decode_body(body: impl Into<Bytes>, max_len: usize) -> Result<Bytes, Error> {
    let mut body = body.into();
    let (&tag, rest) = body
        .split_last()
        .ok_or_else(|| Error::Codec("empty record body".into()))?;
    match tag {
        // Already in memory: no cap needed, and none that a lowered limit could trip.
        TAG_RAW => {
            let len = rest.len();
            body.truncate(len);
            Ok(body)
        }
        TAG_LZ4 => decode_lz4(rest, max_len).map(Bytes::from),
        other => Err(Error::Codec(format!("unknown record tag {other}"))),
    }
}

#[cfg(feature = "compression")]
fn decode_lz4(data: &[u8], max_len: usize) -> Result<Vec<u8>, Error> {
    let (compressed, len) = data
        .split_last_chunk::<4>()
        .ok_or_else(|| Error::Codec("compressed record shorter than its header".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > max_len {
        return Err(Error::Codec(format!(
            "compressed record declares {len} bytes, over the cap of {max_len}"
        )));
    }
    let mut out = vec![0u8; len];
    let written = lz4_flex::block::decompress_into(compressed, &mut out)
        .map_err(|e| Error::Codec(format!("corrupt compressed record: {e}")))?;
    if written != len {
        return Err(Error::Codec(format!(
            "compressed record decoded to {written} bytes, header said {len}"
        )));
    }
    Ok(out)
}

#[cfg(not(feature = "compression"))]
fn decode_lz4(_data: &[u8], _max_len: usize) -> Result<Vec<u8>, Error> {
    Err(Error::UnsupportedRecord {
        reason: "it is lz4-compressed; build with the `compression` feature to read it".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same bytes as bincode's own `encode_to_vec`, in one buffer that also holds the
    /// body's tag: framing it as a raw body does not move it.
    #[test]
    fn a_typed_payload_is_encoded_once_with_room_for_the_tag() {
        let value = (7u64, "x".repeat(300), vec![1u8; 50], Some(-3i32));
        let bytes = to_bytes(&value).unwrap();
        assert_eq!(
            bytes,
            bincode::serde::encode_to_vec(&value, bincode_config()).unwrap()
        );
        // `Vec::with_capacity` gives exactly what it is asked for; a buffer grown as written
        // would have doubled past it.
        assert_eq!(bytes.capacity(), bytes.len() + 1);
        let (at, len) = (bytes.as_ptr(), bytes.len());
        let body = encode_body(bytes, None);
        assert_eq!((body.as_ptr(), body.len()), (at, len + 1));
    }

    #[test]
    fn typed_round_trip_and_trailing_bytes() {
        let value = (42u32, String::from("hi"), vec![1u8, 2, 3]);
        let bytes = to_bytes(&value).unwrap();
        assert_eq!(from_bytes::<(u32, String, Vec<u8>)>(&bytes).unwrap(), value);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            from_bytes::<(u32, String, Vec<u8>)>(&longer),
            Err(Error::Codec(_))
        ));
    }

    #[test]
    fn raw_body_round_trip_and_cap() {
        let body = encode_body(b"hello".to_vec(), None);
        assert_eq!(decode_body(body.clone(), 5).unwrap(), &b"hello"[..]);
        assert_eq!(
            decode_body(body, 4).unwrap(),
            &b"hello"[..],
            "raw bodies have no cap"
        );
        assert!(decode_body(vec![], 10).is_err());
        assert!(decode_body(vec![1, 2, 9], 10).is_err());
    }

    #[test]
    fn hostile_length_prefixes_are_errors_not_allocations() {
        // A String whose varint length prefix says 2^62 bytes.
        let bomb = [0xFD, 0, 0, 0, 0, 0, 0, 0, 0x40];
        assert!(matches!(from_bytes::<String>(&bomb), Err(Error::Codec(_))));
        assert!(matches!(from_bytes::<Vec<u8>>(&bomb), Err(Error::Codec(_))));
    }

    #[cfg(feature = "compression")]
    #[test]
    fn compressed_round_trip_and_bomb() {
        let payload = vec![7u8; 10_000];
        let body = encode_body(payload.clone(), Some(64));
        assert_eq!(body.last(), Some(&TAG_LZ4));
        assert!(body.len() < 200);
        assert_eq!(decode_body(body.clone(), 10_000).unwrap(), payload);
        let n = body.len();
        // Declares more than the cap: refused before allocating.
        let mut bomb = body.clone();
        bomb[n - 5..n - 1].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_body(bomb, 10_000).is_err());
        // Declares less than it holds: refused, not truncated silently.
        let mut short = body.clone();
        short[n - 5..n - 1].copy_from_slice(&100u32.to_le_bytes());
        assert!(decode_body(short, 10_000).is_err());
        // Small or incompressible payloads stay raw.
        assert_eq!(
            encode_body(b"abc".to_vec(), Some(64)).last(),
            Some(&TAG_RAW)
        );
    }
}
