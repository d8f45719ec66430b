//! FNV-1a, the one non-cryptographic hash the crate writes by hand: stable across builds,
//! platforms and versions, where a name or a bucket stored outside the process depends on it.

// The 32-bit hash is Redis's alone (its key buckets); a build without it still tests it.
/// The 32-bit offset basis: where a hash of nothing starts.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const OFFSET_32: u32 = 0x811c_9dc5;
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
const PRIME_32: u32 = 0x0100_0193;
/// The 64-bit offset basis (the names Redis and PostgreSQL derive; hashing of recipient ids
/// continues from a seed of its own).
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
pub(crate) const OFFSET_64: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME_64: u64 = 0x0100_0000_01b3;

/// Continues the 32-bit FNV-1a `hash` over `bytes` (start from [`OFFSET_32`]).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn fnv1a_32(mut hash: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        hash = (hash ^ u32::from(byte)).wrapping_mul(PRIME_32);
    }
    hash
}

/// Continues the 64-bit FNV-1a `hash` over `bytes` (start from [`OFFSET_64`]).
pub(crate) fn fnv1a_64(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME_64);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_test_vectors() {
        assert_eq!(fnv1a_32(OFFSET_32, b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(OFFSET_32, b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(OFFSET_32, b"foobar"), 0xbf9c_f968);
        assert_eq!(fnv1a_64(OFFSET_64, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(OFFSET_64, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(OFFSET_64, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_hash_continues_over_pieces() {
        assert_eq!(
            fnv1a_64(fnv1a_64(OFFSET_64, b"foo"), b"bar"),
            fnv1a_64(OFFSET_64, b"foobar")
        );
    }
}
