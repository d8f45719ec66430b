//! Queue names for recipient ids of any bytes: AMQP names are at most 255 bytes, and a name
//! must never be shared by two recipients or carry a byte a broker treats specially.

use sha2::{Digest, Sha256};

use crate::hex;
use crate::message::RecipientId;

/// The longest queue name AMQP 0-9-1 allows (a short string).
pub(super) const MAX_NAME: usize = 255;

/// The queue that holds `recipient`'s records: `<prefix>.<hex of the id>` when that fits in
/// 255 bytes, else `<prefix>.h.<hex of the id's SHA-256>`. The two forms cannot meet: a hex
/// name has no `h` and no second dot. A hashed name's records carry the full id, checked on
/// read (see `record.rs`), so even a hash collision would not leak a record.
pub(super) fn queue_name(prefix: &str, recipient: &RecipientId) -> QueueName {
    let id = recipient.as_bytes();
    if prefix.len() + 1 + 2 * id.len() <= MAX_NAME {
        QueueName {
            name: format!("{prefix}.{}", hex::encode(id)),
            hashed: false,
        }
    } else {
        let digest = Sha256::digest(id);
        QueueName {
            name: format!("{prefix}.h.{}", hex::encode(&digest)),
            hashed: true,
        }
    }
}

/// The queue that holds `recipient`'s ledger (see `ledger.rs`): `<prefix>.l.<hex of the id>`
/// when that fits in 255 bytes, else `<prefix>.l.h.<hex of the id's SHA-256>`. Neither can
/// be a record queue's name: those go on after the prefix with hex digits or `h.`.
pub(super) fn ledger_name(prefix: &str, recipient: &RecipientId) -> String {
    queue_name(&format!("{prefix}.l"), recipient).name
}

/// A recipient's queue name, and whether it is a hash (then records carry the id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct QueueName {
    pub(super) name: String,
    pub(super) hashed: bool,
}

/// Checks a prefix: ASCII letters, digits, `_`, `-` and `.`, 1 to 64 bytes, not the
/// broker's reserved `amq.`.
pub(super) fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.len() > 64 {
        return Err(format!("must be 1 to 64 bytes, is {}", prefix.len()));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "may hold ASCII letters, digits, '_', '-' and '.' only, not {bad:?}"
        ));
    }
    if prefix.starts_with("amq.") || prefix == "amq" {
        return Err("must not start with amq. (reserved by the broker)".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_are_hex_and_long_ids_are_hashed_within_the_limit() {
        let short = RecipientId::new("bob").unwrap();
        assert_eq!(
            queue_name("oq", &short),
            QueueName {
                name: "oq.626f62".to_owned(),
                hashed: false
            }
        );
        let long = RecipientId::new([0xffu8; 255]).unwrap();
        let name = queue_name("oq", &long);
        assert!(name.hashed && name.name.starts_with("oq.h.") && name.name.len() <= MAX_NAME);
        let prefix = "p".repeat(64);
        let edge = RecipientId::new(vec![7u8; (MAX_NAME - 65) / 2]).unwrap();
        assert!(queue_name(&prefix, &edge).name.len() <= MAX_NAME);
        assert_eq!(ledger_name("oq", &short), "oq.l.626f62");
        assert!(ledger_name(&prefix, &edge).len() <= MAX_NAME);
        assert!(ledger_name("oq", &long).starts_with("oq.l.h."));
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("oq").is_ok());
        assert!(check_prefix("app.oq-1").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("a b").is_err());
        assert!(check_prefix("amq.x").is_err());
        assert!(check_prefix(&"x".repeat(65)).is_err());
    }
}
