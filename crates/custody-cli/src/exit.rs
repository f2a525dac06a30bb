//! Exit codes: each means one thing, so scripts can branch on them.

use custody_client::ClientError;

/// Success.
pub const OK: u8 = 0;
/// The request failed for another reason (server error, I/O).
pub const FAILURE: u8 = 1;
/// Bad command line (clap's own code).
pub const USAGE: u8 = 2;
/// Cannot reach the server, or TLS failed, or local configuration is unusable.
pub const UNREACHABLE: u8 = 3;
/// Not authenticated or not authorized.
pub const DENIED: u8 = 4;
/// The key or alias does not exist.
pub const NOT_FOUND: u8 = 5;
/// The key's state does not allow this (disabled, pending deletion, destroyed).
pub const KEY_STATE: u8 = 6;
/// The ciphertext is invalid for this key and encryption context.
pub const INVALID_CIPHERTEXT: u8 = 7;
/// The server is sealed.
pub const SEALED: u8 = 8;
/// The request was invalid (validation, already exists, unsupported).
pub const INVALID_REQUEST: u8 = 9;

/// An error to print and the exit code to leave with.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// Message for stderr.
    pub message: String,
}

impl CliError {
    /// A failure with a message.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Api { code, .. } => match code.as_str() {
                "UnrecognizedClientException" | "AccessDeniedException" | "MissingAuthenticationTokenException" => {
                    DENIED
                }
                "NotFoundException" => NOT_FOUND,
                "DisabledException" | "KMSInvalidStateException" => KEY_STATE,
                "InvalidCiphertextException" | "IncorrectKeyException" => INVALID_CIPHERTEXT,
                "ServiceUnavailableException" => SEALED,
                "ValidationException"
                | "AlreadyExistsException"
                | "InvalidAliasNameException"
                | "UnsupportedOperationException"
                | "SerializationException"
                | "InvalidShareException" => INVALID_REQUEST,
                _ => FAILURE,
            },
            ClientError::Connect { .. } | ClientError::Config(_) => UNREACHABLE,
            _ => FAILURE,
        };
        let hint = match code {
            SEALED => "\nhint: the server is sealed; run `custody unseal`",
            UNREACHABLE => "\nhint: is the server running? check --endpoint / CUSTODY_ENDPOINT and the profile",
            _ => "",
        };
        Self::new(code, format!("{e}{hint}"))
    }
}
