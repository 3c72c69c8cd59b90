//! The error codes this server sends, by name (RFC 8489 §14.8 and §18.3,
//! RFC 8656 §19, RFC 8016 §3.3).

use std::fmt;

/// An ERROR-CODE value: the class and number, and the reason phrase sent
/// with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 300: the client should use the server in ALTERNATE-SERVER
    /// (RFC 8489 §14.8).
    TryAlternate,
    /// 400: malformed request (RFC 8489 §14.8).
    BadRequest,
    /// 401: credentials missing or wrong (RFC 8489 §14.8).
    Unauthorized,
    /// 403: forbidden, here a peer the policy refuses (RFC 8656 §19).
    Forbidden,
    /// 404: the mobility ticket names no allocation (RFC 8016 §3.3).
    AllocationNotFound,
    /// 405: mobility is off (RFC 8016 §3.3).
    MobilityForbidden,
    /// 420: a comprehension-required attribute is not understood
    /// (RFC 8489 §14.8).
    UnknownAttribute,
    /// 437: allocation mismatch (RFC 8656 §19).
    AllocationMismatch,
    /// 438: the nonce is no longer valid (RFC 8489 §14.8).
    StaleNonce,
    /// 440: address family not supported (RFC 8656 §19).
    AddressFamilyNotSupported,
    /// 441: the credentials differ from the allocation's (RFC 8656 §19).
    WrongCredentials,
    /// 442: unsupported transport protocol (RFC 8656 §19).
    UnsupportedTransportProtocol,
    /// 443: the peer's family differs from the relay's (RFC 8656 §19).
    PeerAddressFamilyMismatch,
    /// 446: a connection to that peer exists or is being made (RFC 6062 §6.3).
    ConnectionAlreadyExists,
    /// 447: the connection to the peer failed or timed out (RFC 6062 §6.3).
    ConnectionTimeoutOrFailure,
    /// 486: allocation quota reached (RFC 8656 §19).
    AllocationQuotaReached,
    /// 500: server error (RFC 8489 §14.8).
    ServerError,
    /// 508: insufficient capacity (RFC 8656 §19).
    InsufficientCapacity,
}

impl ErrorCode {
    /// The numeric code, 300..=699.
    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::TryAlternate => 300,
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::AllocationNotFound => 404,
            ErrorCode::MobilityForbidden => 405,
            ErrorCode::UnknownAttribute => 420,
            ErrorCode::AllocationMismatch => 437,
            ErrorCode::StaleNonce => 438,
            ErrorCode::AddressFamilyNotSupported => 440,
            ErrorCode::WrongCredentials => 441,
            ErrorCode::UnsupportedTransportProtocol => 442,
            ErrorCode::PeerAddressFamilyMismatch => 443,
            ErrorCode::ConnectionAlreadyExists => 446,
            ErrorCode::ConnectionTimeoutOrFailure => 447,
            ErrorCode::AllocationQuotaReached => 486,
            ErrorCode::ServerError => 500,
            ErrorCode::InsufficientCapacity => 508,
        }
    }

    /// The reason phrase, as the RFCs name the code.
    pub const fn reason(self) -> &'static str {
        match self {
            ErrorCode::TryAlternate => "Try Alternate",
            ErrorCode::BadRequest => "Bad Request",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::AllocationNotFound => "Allocation Not Found",
            ErrorCode::MobilityForbidden => "Mobility Forbidden",
            ErrorCode::UnknownAttribute => "Unknown Attribute",
            ErrorCode::AllocationMismatch => "Allocation Mismatch",
            ErrorCode::StaleNonce => "Stale Nonce",
            ErrorCode::AddressFamilyNotSupported => "Address Family not Supported",
            ErrorCode::WrongCredentials => "Wrong Credentials",
            ErrorCode::UnsupportedTransportProtocol => "Unsupported Transport Protocol",
            ErrorCode::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            ErrorCode::ConnectionAlreadyExists => "Connection Already Exists",
            ErrorCode::ConnectionTimeoutOrFailure => "Connection Timeout or Failure",
            ErrorCode::AllocationQuotaReached => "Allocation Quota Reached",
            ErrorCode::ServerError => "Server Error",
            ErrorCode::InsufficientCapacity => "Insufficient Capacity",
        }
    }

    /// Every code, for tests and tables.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::TryAlternate,
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::AllocationNotFound,
        ErrorCode::MobilityForbidden,
        ErrorCode::UnknownAttribute,
        ErrorCode::AllocationMismatch,
        ErrorCode::StaleNonce,
        ErrorCode::AddressFamilyNotSupported,
        ErrorCode::WrongCredentials,
        ErrorCode::UnsupportedTransportProtocol,
        ErrorCode::PeerAddressFamilyMismatch,
        ErrorCode::ConnectionAlreadyExists,
        ErrorCode::ConnectionTimeoutOrFailure,
        ErrorCode::AllocationQuotaReached,
        ErrorCode::ServerError,
        ErrorCode::InsufficientCapacity,
    ];

    /// The named code for a number, if this server knows it.
    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|e| e.code() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for e in ErrorCode::ALL {
            assert!((300..700).contains(&e.code()), "{e}");
            assert_eq!(ErrorCode::from_code(e.code()), Some(e));
        }
        assert_eq!(ErrorCode::from_code(499), None);
        assert_eq!(ErrorCode::StaleNonce.to_string(), "438 Stale Nonce");
    }
}
