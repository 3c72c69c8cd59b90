//! Long-term credentials (RFC 8489 §9.2: MD5 and SHA-256 password
//! algorithms, USERHASH, the nonce cookie) and the TURN REST API
//! (draft-uberti-behave-turn-rest, coturn's `use-auth-secret`).
//!
//! Everything here is pure computation: the caller passes the current UNIX
//! time in seconds. Nonces are stateless: a nonce carries its issue time and
//! an HMAC over that time and the client's IP address, so the server keeps no
//! per-client state before a client authenticates.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;

use crate::stun::Message;
use crate::turn::directory::{Directory, Lookup, Wanted};

/// A long-term credential key: MD5(username ":" realm ":" password), 16 bytes.
pub type Key = [u8; 16];

/// A long-term key for PASSWORD-ALGORITHM SHA-256:
/// SHA-256(username ":" realm ":" password), 32 bytes (RFC 8489 §9.2.2).
pub type Sha256Key = [u8; 32];

/// The password as the key derivations use it: SASLprep'd, or as given
/// when SASLprep rejects it.
fn prepared(password: &str) -> Cow<'_, str> {
    stringprep::saslprep(password).unwrap_or(Cow::Borrowed(password))
}

/// Derives the long-term key MD5(username:realm:SASLprep(password))
/// (RFC 8489 §9.2.2). A password that SASLprep rejects is used unprepared.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> Key {
    let mut h = Md5::new();
    for part in [username, ":", realm, ":", &prepared(password)] {
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// Derives the SHA-256 long-term key
/// SHA-256(username:realm:SASLprep(password)) (RFC 8489 §9.2.2).
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> Sha256Key {
    let mut h = Sha256::new();
    for part in [username, ":", realm, ":", &prepared(password)] {
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// The USERHASH of `username` in `realm`: SHA-256(username ":" realm),
/// 32 bytes (RFC 8489 §14.4).
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [username, ":", realm] {
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// A password algorithm (RFC 8489 §14.11, §18.5): how the long-term key is
/// derived from the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    /// 0x0001: MD5(username:realm:password), the RFC 5389 key.
    Md5,
    /// 0x0002: SHA-256(username:realm:password).
    Sha256,
}

impl PasswordAlgorithm {
    /// Its number in PASSWORD-ALGORITHM(S).
    pub const fn code(self) -> u16 {
        match self {
            PasswordAlgorithm::Md5 => 1,
            PasswordAlgorithm::Sha256 => 2,
        }
    }

    /// The algorithm numbered `code`, if it is one of these.
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(PasswordAlgorithm::Md5),
            2 => Some(PasswordAlgorithm::Sha256),
            _ => None,
        }
    }

    /// Its name in the configuration (`md5`, `sha256`).
    pub const fn name(self) -> &'static str {
        match self {
            PasswordAlgorithm::Md5 => "md5",
            PasswordAlgorithm::Sha256 => "sha256",
        }
    }

    /// Parses a configuration name: `md5`, `sha256` or `sha-256`, any case.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "md5" => Some(PasswordAlgorithm::Md5),
            "sha256" | "sha-256" => Some(PasswordAlgorithm::Sha256),
            _ => None,
        }
    }

    /// The PASSWORD-ALGORITHMS value listing `algorithms` in order: each a
    /// 16-bit number and a zero parameter length (RFC 8489 §14.11).
    pub fn encode_list(algorithms: &[PasswordAlgorithm]) -> Vec<u8> {
        algorithms
            .iter()
            .flat_map(|a| {
                let c = a.code().to_be_bytes();
                [c[0], c[1], 0, 0]
            })
            .collect()
    }
}

/// The key a request was verified with, and so the key its responses are
/// signed with: 16 bytes (MD5) or 32 (SHA-256).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LongTermKey {
    Md5(Key),
    Sha256(Sha256Key),
}

impl LongTermKey {
    /// The key bytes, as HMAC takes them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            LongTermKey::Md5(k) => k,
            LongTermKey::Sha256(k) => k,
        }
    }

    /// The password algorithm it was derived with.
    pub fn algorithm(&self) -> PasswordAlgorithm {
        match self {
            LongTermKey::Md5(_) => PasswordAlgorithm::Md5,
            LongTermKey::Sha256(_) => PasswordAlgorithm::Sha256,
        }
    }
}

impl fmt::Debug for LongTermKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are secrets: never print them.
        write!(f, "LongTermKey({})", self.algorithm().name())
    }
}

/// A user's long-term keys: MD5 always, SHA-256 when the password itself
/// is known (a `user=name:0x<hex>` entry or a user database holds only the
/// MD5 key).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UserKeys {
    pub md5: Key,
    pub sha256: Option<Sha256Key>,
}

impl UserKeys {
    /// Both keys of `username` in `realm` with `password`.
    pub fn from_password(username: &str, realm: &str, password: &str) -> Self {
        UserKeys {
            md5: long_term_key(username, realm, password),
            sha256: Some(long_term_key_sha256(username, realm, password)),
        }
    }

    /// The key for `algorithm`, if this user has one.
    pub fn get(&self, algorithm: PasswordAlgorithm) -> Option<LongTermKey> {
        match algorithm {
            PasswordAlgorithm::Md5 => Some(LongTermKey::Md5(self.md5)),
            PasswordAlgorithm::Sha256 => self.sha256.map(LongTermKey::Sha256),
        }
    }
}

impl From<Key> for UserKeys {
    fn from(md5: Key) -> Self {
        UserKeys { md5, sha256: None }
    }
}

impl fmt::Debug for UserKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserKeys")
            .field("sha256", &self.sha256.is_some())
            .finish_non_exhaustive()
    }
}

/// The configuration's users (`user=` lines) in the default realm: keys by
/// name, and names by USERHASH so that a request carrying USERHASH finds
/// its user without hashing every name.
#[derive(Clone, Default)]
pub struct StaticUsers {
    by_name: HashMap<String, UserKeys>,
    by_hash: HashMap<[u8; 32], String>,
}

impl StaticUsers {
    /// The users of `realm` (the default realm), as (name, keys).
    pub fn new(realm: &str, users: impl IntoIterator<Item = (String, UserKeys)>) -> Self {
        let by_name: HashMap<String, UserKeys> = users.into_iter().collect();
        let by_hash = by_name
            .keys()
            .map(|name| (userhash(name, realm), name.clone()))
            .collect();
        StaticUsers { by_name, by_hash }
    }

    /// The keys of `name`.
    pub fn get(&self, name: &str) -> Option<&UserKeys> {
        self.by_name.get(name)
    }

    /// The user whose USERHASH is `hash`.
    pub fn by_userhash(&self, hash: &[u8]) -> Option<&str> {
        let hash: &[u8; 32] = hash.try_into().ok()?;
        self.by_hash.get(hash).map(String::as_str)
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Whether every user has a SHA-256 key (none was given as a bare MD5
    /// key).
    pub fn all_have_sha256(&self) -> bool {
        self.by_name.values().all(|k| k.sha256.is_some())
    }
}

/// The TURN REST API password for `username`: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let mut mac =
        <Hmac<Sha1> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Parses a REST API username into its expiry time (UNIX seconds).
///
/// Accepted forms, as coturn: `<expiry>`, `<expiry><sep><user>` and
/// `<user><sep><expiry>`. Returns `None` when no part is a timestamp.
pub fn rest_expiry(username: &str, separator: char) -> Option<u64> {
    let parse = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match username.split_once(separator) {
        None => parse(username),
        Some((first, rest)) => parse(first).or_else(|| {
            let (_, last) = username.rsplit_once(separator).unwrap_or(("", rest));
            parse(last)
        }),
    }
}

/// The user part of a REST API username: `alice` from `<expiry>:alice` or
/// `alice:<expiry>`; the whole username when it has no timestamp part or no
/// user part. Quotas count per user, not per credential.
pub fn rest_user(username: &str, separator: char) -> &str {
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some((first, rest)) = username.split_once(separator)
        && numeric(first)
        && !rest.is_empty()
    {
        return rest;
    }
    if let Some((rest, last)) = username.rsplit_once(separator)
        && numeric(last)
        && !rest.is_empty()
    {
        return rest;
    }
    username
}

/// A user entry from `user=name:password` or `user=name:0x<32 hex>`.
#[derive(Clone)]
pub struct StaticUser {
    pub name: String,
    pub key: Key,
}

impl fmt::Debug for StaticUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are secrets: never print them.
        f.debug_struct("StaticUser")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Which credential mechanism is in force.
#[derive(Clone)]
pub enum Mechanism {
    /// No authentication at all (coturn's default when nothing is configured).
    None,
    /// Long-term credentials with static users (and the user database).
    LongTerm(StaticUsers),
    /// TURN REST API: every secret is tried in order (rotation).
    RestApi {
        secrets: Vec<Vec<u8>>,
        separator: char,
    },
}

impl fmt::Debug for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mechanism::None => f.write_str("None"),
            Mechanism::LongTerm(users) => write!(f, "LongTerm({} users)", users.len()),
            Mechanism::RestApi { secrets, separator } => {
                write!(
                    f,
                    "RestApi({} secrets, separator {separator:?})",
                    secrets.len()
                )
            }
        }
    }
}

/// Why a request's credentials were refused: 401 (RFC 8489 §9.2.4), or 438
/// for [`AuthFailure::StaleNonce`]; the kinds are distinguished only in the
/// server's log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuthFailure {
    /// No static user of that name.
    UnknownUser,
    /// A REST username whose expiry time has passed.
    Expired,
    /// A REST username with no timestamp in it.
    BadRestUsername,
    /// MESSAGE-INTEGRITY did not verify with any candidate key.
    BadIntegrity,
    /// The request chose PASSWORD-ALGORITHM SHA-256 and the user has only
    /// an MD5 key (a `0x` key in the configuration or a user database).
    NoSha256Key,
    /// The request carried only MESSAGE-INTEGRITY (HMAC-SHA1) and
    /// `require-sha256` asks for MESSAGE-INTEGRITY-SHA256.
    Sha1Refused,
    /// The NONCE expired (`stale-nonce`) or was not issued by this server
    /// (for example before a restart). Never returned by
    /// [`Authenticator::authenticate`], which does not see nonces.
    StaleNonce,
}

impl AuthFailure {
    /// Every kind, in the order of [`AuthFailure::index`].
    pub const ALL: [AuthFailure; 7] = [
        AuthFailure::UnknownUser,
        AuthFailure::Expired,
        AuthFailure::BadRestUsername,
        AuthFailure::BadIntegrity,
        AuthFailure::StaleNonce,
        AuthFailure::NoSha256Key,
        AuthFailure::Sha1Refused,
    ];

    /// Its position in [`AuthFailure::ALL`] (for counter arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short label for metrics (`turn_auth_failures_total{reason}`).
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Expired => "expired",
            AuthFailure::BadRestUsername => "bad_rest_username",
            AuthFailure::BadIntegrity => "bad_integrity",
            AuthFailure::StaleNonce => "stale_nonce",
            AuthFailure::NoSha256Key => "no_sha256_key",
            AuthFailure::Sha1Refused => "sha1_refused",
        }
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthFailure::UnknownUser => "unknown user",
            AuthFailure::Expired => "REST credential expired",
            AuthFailure::BadRestUsername => "REST username has no timestamp",
            AuthFailure::BadIntegrity => "wrong password (MESSAGE-INTEGRITY mismatch)",
            AuthFailure::StaleNonce => "stale or foreign nonce",
            AuthFailure::NoSha256Key => {
                "PASSWORD-ALGORITHM SHA-256 but the user has only an MD5 key"
            }
            AuthFailure::Sha1Refused => {
                "MESSAGE-INTEGRITY-SHA256 required (require-sha256), request had SHA-1 only"
            }
        })
    }
}

/// The outcome of checking a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The message's integrity verified with `key`; `from_directory` when
    /// the key came from the user database rather than the configuration.
    Ok {
        key: LongTermKey,
        from_directory: bool,
    },
    Refused(AuthFailure),
    /// The directory must be asked first.
    Pending(Wanted),
}

/// Credential checking: the configuration's users or secrets (for the
/// default realm) and, for any realm, the [`Directory`]'s.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// The default realm: sent in 401 responses to requests of no other
    /// realm (an ORIGIN the directory maps), and the realm of the
    /// configuration's users and secrets.
    pub realm: Arc<str>,
    pub mechanism: Mechanism,
}

impl Authenticator {
    /// Whether requests must be authenticated at all.
    pub fn enabled(&self) -> bool {
        !matches!(self.mechanism, Mechanism::None)
    }

    /// Checks `msg`'s integrity for `username` in `realm` with the key of
    /// `algorithm` (the request's PASSWORD-ALGORITHM, MD5 without one) and
    /// returns the key it verified with. Keys are looked for in the
    /// configuration (default realm only), then in `dir`. `unix_now` is the
    /// current time in UNIX seconds (REST expiry is accepted while `expiry
    /// >= unix_now`).
    pub fn authenticate(
        &self,
        dir: &dyn Directory,
        realm: &str,
        msg: &Message<'_>,
        username: &str,
        unix_now: u64,
        algorithm: PasswordAlgorithm,
    ) -> Verdict {
        let verify = |key: Option<LongTermKey>, from_directory: bool| match key {
            Some(key) if msg.verify_integrity(key.as_bytes()) => Verdict::Ok {
                key,
                from_directory,
            },
            Some(_) => Verdict::Refused(AuthFailure::BadIntegrity),
            None => Verdict::Refused(AuthFailure::NoSha256Key),
        };
        let default_realm = realm == &*self.realm;
        match &self.mechanism {
            Mechanism::None => Verdict::Ok {
                key: LongTermKey::Md5([0; 16]),
                from_directory: false,
            },
            Mechanism::LongTerm(users) => {
                if let Some(keys) = users.get(username).filter(|_| default_realm) {
                    return verify(keys.get(algorithm), false);
                }
                match dir.user_key(realm, username) {
                    Lookup::Found(key) => verify(UserKeys::from(key).get(algorithm), true),
                    Lookup::Absent => Verdict::Refused(AuthFailure::UnknownUser),
                    Lookup::Pending => Verdict::Pending(Wanted::User {
                        realm: realm.into(),
                        name: username.into(),
                    }),
                }
            }
            Mechanism::RestApi { secrets, separator } => {
                let Some(expiry) = rest_expiry(username, *separator) else {
                    return Verdict::Refused(AuthFailure::BadRestUsername);
                };
                if expiry < unix_now {
                    return Verdict::Refused(AuthFailure::Expired);
                }
                let try_secret = |secret: &[u8]| {
                    let password = rest_password(secret, username);
                    let key = match algorithm {
                        PasswordAlgorithm::Md5 => {
                            LongTermKey::Md5(long_term_key(username, realm, &password))
                        }
                        PasswordAlgorithm::Sha256 => {
                            LongTermKey::Sha256(long_term_key_sha256(username, realm, &password))
                        }
                    };
                    msg.verify_integrity(key.as_bytes()).then_some(key)
                };
                let configured = secrets.iter().filter(|_| default_realm);
                if let Some(key) = configured.filter_map(|s| try_secret(s)).next() {
                    return Verdict::Ok {
                        key,
                        from_directory: false,
                    };
                }
                match dir.secrets(realm) {
                    Lookup::Found(list) => match list.iter().find_map(|s| try_secret(s)) {
                        Some(key) => Verdict::Ok {
                            key,
                            from_directory: false,
                        },
                        None => Verdict::Refused(AuthFailure::BadIntegrity),
                    },
                    Lookup::Absent => Verdict::Refused(AuthFailure::BadIntegrity),
                    Lookup::Pending => Verdict::Pending(Wanted::Secrets {
                        realm: realm.into(),
                    }),
                }
            }
        }
    }

    /// Whether every credential this authenticator holds can give a
    /// SHA-256 key: REST secrets always can, static users when all were
    /// given with a password (not a `0x` MD5 key). Keys from a user
    /// database are MD5 only; the caller accounts for that.
    pub fn sha256_keys_available(&self) -> bool {
        match &self.mechanism {
            Mechanism::None => false,
            Mechanism::LongTerm(users) => users.all_have_sha256(),
            Mechanism::RestApi { .. } => true,
        }
    }

    /// The password algorithms to offer by default (RFC 8489 §9.2.4):
    /// SHA-256 then MD5 when every key can be SHA-256 (`sha256_keys`, this
    /// authenticator's [`Authenticator::sha256_keys_available`] and the
    /// caller's knowledge of a user database), else MD5 alone.
    pub fn default_password_algorithms(sha256_keys: bool) -> Vec<PasswordAlgorithm> {
        if sha256_keys {
            vec![PasswordAlgorithm::Sha256, PasswordAlgorithm::Md5]
        } else {
            vec![PasswordAlgorithm::Md5]
        }
    }

    /// The user whose USERHASH (RFC 8489 §14.4) in `realm` is `hash`: only
    /// the configuration's users of the default realm can be found this
    /// way (a REST username or a database user cannot be derived from its
    /// hash).
    pub fn user_by_hash(&self, realm: &str, hash: &[u8]) -> Option<&str> {
        match &self.mechanism {
            Mechanism::LongTerm(users) if realm == &*self.realm => users.by_userhash(hash),
            _ => None,
        }
    }
}

/// Result of checking a NONCE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Valid,
    /// Issued by us for this client but older than `stale-nonce`.
    Stale,
    /// Not issued by this process for this client address.
    Invalid,
}

/// The nonce cookie (RFC 8489 §9.2): a nonce starting with it carries the
/// server's STUN Security Features in the next four characters.
pub const NONCE_COOKIE: &[u8; 9] = b"obMatJos2";

/// STUN Security Feature "Password algorithms" (RFC 8489 §18.1, bit 0 of
/// the 24-bit set, the top bit of its first byte): the server offers
/// PASSWORD-ALGORITHMS, and a client's choice is checked against it.
pub const FEATURE_PASSWORD_ALGORITHMS: u8 = 0x80;
/// STUN Security Feature "Username anonymity" (bit 1): USERHASH accepted.
pub const FEATURE_USERNAME_ANONYMITY: u8 = 0x40;

/// Issues and checks stateless nonces.
///
/// A nonce is 37 characters: the nonce cookie `obMatJos2`, four base64
/// characters encoding the security features (RFC 8489 §9.2; only the
/// first byte of the 24 bits is used), then 24 hex characters: 8 for the
/// issue time (UNIX seconds, low 32 bits) and 16 for the first 8 bytes of
/// HMAC-SHA1(secret, time ‖ features ‖ client IP). The features are under
/// the HMAC, so a man in the middle cannot bid them down. The secret is
/// random per process, so nonces from before a restart get 438.
#[derive(Clone)]
pub struct NonceIssuer {
    secret: [u8; 32],
    /// Nonce lifetime in seconds; `None` = never stale (`stale-nonce=0`).
    lifetime: Option<u64>,
}

impl fmt::Debug for NonceIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceIssuer")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Length of every nonce this server issues, characters.
pub const NONCE_LEN: usize = 9 + 4 + 24;

impl NonceIssuer {
    /// `lifetime` in seconds, `None` for nonces that never go stale.
    pub fn new(secret: [u8; 32], lifetime: Option<u64>) -> Self {
        NonceIssuer { secret, lifetime }
    }

    fn tag(&self, time: u32, features: u8, ip: IpAddr) -> [u8; 8] {
        let mut mac =
            <Hmac<Sha1> as KeyInit>::new_from_slice(&self.secret).expect("any key length");
        mac.update(&time.to_be_bytes());
        mac.update(&[features]);
        match ip {
            IpAddr::V4(a) => mac.update(&a.octets()),
            IpAddr::V6(a) => mac.update(&a.octets()),
        }
        let out = mac.finalize().into_bytes();
        out[..8].try_into().expect("SHA-1 output is 20 bytes")
    }

    /// A fresh nonce for a client at `ip`, at time `unix_now` (seconds),
    /// announcing `features` (the first byte of the security features:
    /// [`FEATURE_PASSWORD_ALGORITHMS`] | [`FEATURE_USERNAME_ANONYMITY`]).
    pub fn issue(&self, unix_now: u64, ip: IpAddr, features: u8) -> [u8; NONCE_LEN] {
        let time = unix_now as u32;
        let mut raw = [0u8; 12];
        raw[..4].copy_from_slice(&time.to_be_bytes());
        raw[4..].copy_from_slice(&self.tag(time, features, ip));
        let mut out = [0u8; NONCE_LEN];
        out[..9].copy_from_slice(NONCE_COOKIE);
        base64::engine::general_purpose::STANDARD
            .encode_slice([features, 0, 0], &mut out[9..13])
            .expect("3 bytes are 4 base64 characters");
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in raw.iter().enumerate() {
            out[13 + 2 * i] = HEX[usize::from(b >> 4)];
            out[13 + 2 * i + 1] = HEX[usize::from(b & 15)];
        }
        out
    }

    /// The security features a nonce of this server's format announces
    /// (first byte), or `None` when it is not of that format. Says nothing
    /// about whether the nonce is genuine: see [`NonceIssuer::check`].
    pub fn features_of(nonce: &[u8]) -> Option<u8> {
        if nonce.len() != NONCE_LEN || !nonce.starts_with(NONCE_COOKIE) {
            return None;
        }
        let mut bits = [0u8; 3];
        match base64::engine::general_purpose::STANDARD.decode_slice(&nonce[9..13], &mut bits) {
            Ok(3) if bits[1] == 0 && bits[2] == 0 => Some(bits[0]),
            _ => None,
        }
    }

    /// Checks a nonce presented by a client at `ip` at time `unix_now`.
    pub fn check(&self, nonce: &[u8], unix_now: u64, ip: IpAddr) -> NonceCheck {
        let Some(features) = Self::features_of(nonce) else {
            return NonceCheck::Invalid;
        };
        let hex = &nonce[13..];
        let mut raw = [0u8; 12];
        for (i, r) in raw.iter_mut().enumerate() {
            let hi = (hex[2 * i] as char).to_digit(16);
            let lo = (hex[2 * i + 1] as char).to_digit(16);
            match (hi, lo) {
                (Some(h), Some(l)) => *r = (h * 16 + l) as u8,
                _ => return NonceCheck::Invalid,
            }
        }
        let time = u32::from_be_bytes(raw[..4].try_into().expect("4 bytes"));
        let tag = self.tag(time, features, ip);
        // Constant-time comparison of the tag.
        let diff = tag
            .iter()
            .zip(&raw[4..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return NonceCheck::Invalid;
        }
        let age = (unix_now as u32).wrapping_sub(time);
        match self.lifetime {
            // A nonce "from the future" (age wraps to a huge value) is stale too.
            Some(l) if u64::from(age) >= l => NonceCheck::Stale,
            _ => NonceCheck::Valid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{Class, MessageWriter, attr, method};
    use crate::turn::directory::NoDirectory;

    fn signed(username: &str, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        MessageWriter::new(&mut out, method::ALLOCATE, Class::Request, &[9; 12])
            .attr(attr::USERNAME, username.as_bytes())
            .integrity(key);
        out
    }

    #[test]
    fn key_matches_turnadmin() {
        // `turnadmin -k -u ninefingers -r north.gov -p youhavetoberealistic`
        let key = long_term_key("ninefingers", "north.gov", "youhavetoberealistic");
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "bc807ee29df3c9ffa736523fb2c4e8ee");
    }

    #[test]
    fn rest_usernames() {
        assert_eq!(rest_expiry("1700000000", ':'), Some(1_700_000_000));
        assert_eq!(rest_expiry("1700000000:alice", ':'), Some(1_700_000_000));
        assert_eq!(rest_expiry("alice:1700000000", ':'), Some(1_700_000_000));
        assert_eq!(
            rest_expiry("alice:bob:1700000000", ':'),
            Some(1_700_000_000)
        );
        assert_eq!(rest_expiry("1700000000-alice", '-'), Some(1_700_000_000));
        assert_eq!(rest_expiry("alice", ':'), None);
        assert_eq!(rest_expiry("alice:bob", ':'), None);
        assert_eq!(rest_expiry("", ':'), None);
        assert_eq!(rest_expiry("17x:alice", ':'), None);
        assert_eq!(rest_expiry("99999999999999999999999", ':'), None);
        assert_eq!(rest_user("1700000000:alice", ':'), "alice");
        assert_eq!(rest_user("alice:1700000000", ':'), "alice");
        assert_eq!(rest_user("1700000000", ':'), "1700000000");
        assert_eq!(rest_user("alice", ':'), "alice");
        assert_eq!(rest_user("1700000000-bob", '-'), "bob");
    }

    #[test]
    fn rest_password_known_value() {
        // echo -n "1700000000:alice" | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(
            rest_password(b"secret", "1700000000:alice"),
            "d8soP47RbdIKLDUOpnJPVQyq5Ts="
        );
    }

    #[test]
    fn long_term_users() {
        let key = long_term_key("alice", "example.org", "pw");
        let auth = Authenticator {
            realm: "example.org".into(),
            mechanism: Mechanism::LongTerm(StaticUsers::new(
                "example.org",
                [("alice".to_string(), key.into())],
            )),
        };
        let raw = signed("alice", &key);
        let m = Message::parse(&raw).unwrap();
        assert_eq!(
            auth.authenticate(
                &NoDirectory,
                &auth.realm,
                &m,
                "alice",
                0,
                PasswordAlgorithm::Md5
            ),
            ok(key)
        );
        assert_eq!(
            auth.authenticate(
                &NoDirectory,
                &auth.realm,
                &m,
                "bob",
                0,
                PasswordAlgorithm::Md5
            ),
            Verdict::Refused(AuthFailure::UnknownUser)
        );
        let raw = signed("alice", &long_term_key("alice", "example.org", "wrong"));
        let m = Message::parse(&raw).unwrap();
        assert_eq!(
            auth.authenticate(
                &NoDirectory,
                &auth.realm,
                &m,
                "alice",
                0,
                PasswordAlgorithm::Md5
            ),
            Verdict::Refused(AuthFailure::BadIntegrity)
        );
    }

    #[test]
    fn rest_secrets_rotate_and_expire() {
        let auth = Authenticator {
            realm: "r".into(),
            mechanism: Mechanism::RestApi {
                secrets: vec![b"old".to_vec(), b"new".to_vec()],
                separator: ':',
            },
        };
        let now = 1_800_000_000u64;
        for secret in [&b"old"[..], b"new"] {
            let user = format!("{}:alice", now + 60);
            let key = long_term_key(&user, "r", &rest_password(secret, &user));
            let raw = signed(&user, &key);
            let m = Message::parse(&raw).unwrap();
            assert_eq!(
                auth.authenticate(
                    &NoDirectory,
                    &auth.realm,
                    &m,
                    &user,
                    now,
                    PasswordAlgorithm::Md5
                ),
                ok(key)
            );
            // The same credential after its expiry.
            assert_eq!(
                auth.authenticate(
                    &NoDirectory,
                    &auth.realm,
                    &m,
                    &user,
                    now + 61,
                    PasswordAlgorithm::Md5
                ),
                Verdict::Refused(AuthFailure::Expired)
            );
        }
        let user = format!("{}", now + 60);
        let key = long_term_key(&user, "r", &rest_password(b"other", &user));
        let raw = signed(&user, &key);
        let m = Message::parse(&raw).unwrap();
        assert_eq!(
            auth.authenticate(
                &NoDirectory,
                &auth.realm,
                &m,
                &user,
                now,
                PasswordAlgorithm::Md5
            ),
            Verdict::Refused(AuthFailure::BadIntegrity)
        );
        assert_eq!(
            auth.authenticate(
                &NoDirectory,
                &auth.realm,
                &m,
                "alice",
                now,
                PasswordAlgorithm::Md5
            ),
            Verdict::Refused(AuthFailure::BadRestUsername)
        );
    }

    fn ok(key: Key) -> Verdict {
        Verdict::Ok {
            key: LongTermKey::Md5(key),
            from_directory: false,
        }
    }

    /// A directory with one user and one secret in realm "db.org", and
    /// "pending.org" whose every lookup is pending.
    struct TestDirectory;

    impl Directory for TestDirectory {
        fn user_key(&self, realm: &str, user: &str) -> Lookup<Key> {
            match (realm, user) {
                ("db.org", "carol") => Lookup::Found(long_term_key("carol", "db.org", "cpw")),
                ("pending.org", _) => Lookup::Pending,
                _ => Lookup::Absent,
            }
        }
        fn secrets(&self, realm: &str) -> Lookup<crate::turn::directory::Secrets> {
            match realm {
                "db.org" => Lookup::Found(vec![b"dbsecret".to_vec().into_boxed_slice()].into()),
                "pending.org" => Lookup::Pending,
                _ => Lookup::Absent,
            }
        }
        fn realm_of_origin(&self, _: &str) -> Option<Arc<str>> {
            None
        }
        fn realm_settings(&self, _: &str) -> Option<Arc<crate::turn::directory::RealmSettings>> {
            None
        }
    }

    #[test]
    fn directory_users_and_secrets_beside_the_configuration() {
        let alice = long_term_key("alice", "example.org", "pw");
        let auth = Authenticator {
            realm: "example.org".into(),
            mechanism: Mechanism::LongTerm(StaticUsers::new(
                "example.org",
                [("alice".to_string(), alice.into())],
            )),
        };
        let carol = long_term_key("carol", "db.org", "cpw");
        let raw = signed("carol", &carol);
        let m = Message::parse(&raw).unwrap();
        let d = TestDirectory;
        assert_eq!(
            auth.authenticate(&d, "db.org", &m, "carol", 0, PasswordAlgorithm::Md5),
            Verdict::Ok {
                key: LongTermKey::Md5(carol),
                from_directory: true
            }
        );
        assert_eq!(
            auth.authenticate(&d, "pending.org", &m, "carol", 0, PasswordAlgorithm::Md5),
            Verdict::Pending(Wanted::User {
                realm: "pending.org".into(),
                name: "carol".into()
            })
        );
        // The configuration's users belong to the default realm only.
        let raw = signed("alice", &alice);
        let m = Message::parse(&raw).unwrap();
        assert_eq!(
            auth.authenticate(&d, "example.org", &m, "alice", 0, PasswordAlgorithm::Md5),
            ok(alice)
        );
        assert_eq!(
            auth.authenticate(&d, "db.org", &m, "alice", 0, PasswordAlgorithm::Md5),
            Verdict::Refused(AuthFailure::UnknownUser)
        );
        let rest = Authenticator {
            realm: "example.org".into(),
            mechanism: Mechanism::RestApi {
                secrets: vec![b"file".to_vec()],
                separator: ':',
            },
        };
        let user = "1900000000:dave";
        for (realm, secret, want) in [
            ("db.org", &b"dbsecret"[..], true),
            ("example.org", b"file", true),
            ("example.org", b"dbsecret", false),
            ("db.org", b"file", false),
        ] {
            let key = long_term_key(user, realm, &rest_password(secret, user));
            let raw = signed(user, &key);
            let m = Message::parse(&raw).unwrap();
            let v = rest.authenticate(&d, realm, &m, user, 1_800_000_000, PasswordAlgorithm::Md5);
            assert_eq!(
                matches!(v, Verdict::Ok { .. }),
                want,
                "{realm} {secret:?}: {v:?}"
            );
        }
        let raw = signed(user, &[0; 16]);
        let m = Message::parse(&raw).unwrap();
        assert_eq!(
            rest.authenticate(
                &d,
                "pending.org",
                &m,
                user,
                1_800_000_000,
                PasswordAlgorithm::Md5
            ),
            Verdict::Pending(Wanted::Secrets {
                realm: "pending.org".into()
            })
        );
    }

    #[test]
    fn nonces() {
        let n = NonceIssuer::new([5; 32], Some(600));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let nonce = n.issue(1000, ip, 0);
        assert!(nonce.starts_with(b"obMatJos2AAAA"));
        assert!(nonce[13..].iter().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(n.check(&nonce, 1000, ip), NonceCheck::Valid);
        assert_eq!(n.check(&nonce, 1599, ip), NonceCheck::Valid);
        assert_eq!(n.check(&nonce, 1600, ip), NonceCheck::Stale);
        assert_eq!(n.check(&nonce, 999, ip), NonceCheck::Stale);
        assert_eq!(n.check(&nonce, 1000, other), NonceCheck::Invalid);
        let mut bad = nonce;
        bad[23] = if bad[23] == b'0' { b'1' } else { b'0' };
        assert_eq!(n.check(&bad, 1000, ip), NonceCheck::Invalid);
        assert_eq!(n.check(b"short", 1000, ip), NonceCheck::Invalid);
        assert_eq!(n.check(&[b'z'; NONCE_LEN], 1000, ip), NonceCheck::Invalid);
        // Another process (another secret) never accepts it.
        assert_eq!(
            NonceIssuer::new([6; 32], None).check(&nonce, 1000, ip),
            NonceCheck::Invalid
        );
        // The security features are announced after the cookie and are
        // under the HMAC: changing them (a bid-down) invalidates the nonce.
        let featured = n.issue(
            1000,
            ip,
            FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY,
        );
        assert!(featured.starts_with(b"obMatJos2wAAA"));
        assert_eq!(NonceIssuer::features_of(&featured), Some(0xC0));
        assert_eq!(n.check(&featured, 1000, ip), NonceCheck::Valid);
        let mut bid_down = featured;
        bid_down[9..13].copy_from_slice(b"AAAA");
        assert_eq!(NonceIssuer::features_of(&bid_down), Some(0));
        assert_eq!(n.check(&bid_down, 1000, ip), NonceCheck::Invalid);
        assert_eq!(NonceIssuer::features_of(b"0123456789abcdef01234567"), None);
        // stale-nonce=0: never stale.
        let forever = NonceIssuer::new([5; 32], None);
        assert_eq!(forever.check(&nonce, 1_000_000, ip), NonceCheck::Valid);
    }
}
