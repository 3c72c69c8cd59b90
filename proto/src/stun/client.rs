//! The client side of a STUN/TURN request: one builder for everything that
//! sends requests to a server (the core's tests and simulation, the
//! integration tests and `turnbench`).

use super::{Class, MessageWriter, attr};

/// Long-term credentials to sign a request with (RFC 8489 §9.2.3): the
/// USERNAME, REALM and NONCE to send and the key for MESSAGE-INTEGRITY
/// (for a password, `auth::long_term_key(username, realm, password)`).
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    pub username: &'a str,
    pub realm: &'a str,
    pub nonce: &'a [u8],
    /// The 16-byte long-term key.
    pub key: &'a [u8],
}

impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never print it.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

impl MessageWriter<'_> {
    /// Adds USERNAME, REALM and NONCE, then MESSAGE-INTEGRITY with the key
    /// (RFC 8489 §9.2.3): the end of a signed request, but for FINGERPRINT.
    pub fn sign(&mut self, creds: &Credentials<'_>) -> &mut Self {
        self.attr(attr::USERNAME, creds.username.as_bytes())
            .attr(attr::REALM, creds.realm.as_bytes())
            .attr(attr::NONCE, creds.nonce)
            .integrity(creds.key)
    }
}

/// Writes a request into `out` (cleared first): `attrs` adds the method's
/// attributes, then the request is signed with `creds` when given
/// ([`MessageWriter::sign`]) and gets FINGERPRINT when `fingerprint` is set.
pub fn write_request(
    out: &mut Vec<u8>,
    method: u16,
    tid: &[u8; 12],
    attrs: impl FnOnce(&mut MessageWriter<'_>),
    creds: Option<&Credentials<'_>>,
    fingerprint: bool,
) {
    let mut w = MessageWriter::new(out, method, Class::Request, tid);
    attrs(&mut w);
    if let Some(c) = creds {
        w.sign(c);
    }
    if fingerprint {
        w.fingerprint();
    }
}

/// [`write_request`] into a new buffer.
pub fn request(
    method: u16,
    tid: &[u8; 12],
    attrs: impl FnOnce(&mut MessageWriter<'_>),
    creds: Option<&Credentials<'_>>,
    fingerprint: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    write_request(&mut out, method, tid, attrs, creds, fingerprint);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{Message, method};

    #[test]
    fn a_signed_request_verifies_with_its_key() {
        let key = [7u8; 16];
        let creds = Credentials {
            username: "alice",
            realm: "example.org",
            nonce: b"n0nce",
            key: &key,
        };
        let raw = request(
            method::ALLOCATE,
            &[1; 12],
            |w| {
                w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            },
            Some(&creds),
            true,
        );
        let m = Message::parse(&raw).unwrap();
        assert!(m.verify_integrity(&key) && m.fingerprint_ok() && m.has_fingerprint());
        assert_eq!(m.text(attr::USERNAME), Some(Ok("alice")));
        assert_eq!(m.get(attr::NONCE), Some(&b"n0nce"[..]));
        assert!(!format!("{creds:?}").contains('7'));
        let plain = request(method::BINDING, &[2; 12], |_| {}, None, false);
        let m = Message::parse(&plain).unwrap();
        assert!(!m.has_integrity() && !m.has_fingerprint());
    }
}
