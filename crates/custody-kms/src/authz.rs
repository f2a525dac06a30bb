//! Authorization and key-state checks: the two gates every operation passes (DESIGN.md §4).
//!
//! [`authorize`] is the only way to get an [`Authorized<A>`]; the operations that touch key
//! material or change a key take one by value, so an operation cannot forget the check. In this
//! version the rule is simple (an administrator of the key's tenant may do everything); key
//! policies and grants plug into [`authorize`] without changing any operation.

use std::marker::PhantomData;

use crate::error::KmsError;
use crate::ids::{PrincipalName, TenantId};
use crate::model::{KeyRecord, KeyState, Role};

/// An authenticated caller. Only the service constructs one (from a verified credential).
#[derive(Debug, Clone)]
pub struct Caller {
    pub(crate) tenant: TenantId,
    pub(crate) name: PrincipalName,
    pub(crate) roles: Vec<Role>,
    /// The request's audit record, written together with any state change it makes.
    pub(crate) audit: Option<std::sync::Arc<crate::audit::AuditScope>>,
}

impl Caller {
    /// Attaches the request's audit scope: a state change the request makes then commits in
    /// the same transaction as its audit record.
    pub fn with_audit(mut self, scope: std::sync::Arc<crate::audit::AuditScope>) -> Self {
        self.audit = Some(scope);
        self
    }

    /// The caller's tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The caller's principal name.
    pub fn name(&self) -> &PrincipalName {
        &self.name
    }

    /// The caller's ARN (IAM-style, as AWS error messages name callers).
    pub fn arn(&self) -> String {
        format!("arn:aws:iam::{}:user/{}", self.tenant, self.name)
    }
}

macro_rules! actions {
    ($($(#[$doc:meta])* $name:ident $(: $marker:ident)?),* $(,)?) => {
        /// Every action the service performs, by its AWS name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Action { $($(#[$doc])* $name),* }

        impl Action {
            /// The AWS action name (as in `kms:Encrypt`).
            pub fn name(self) -> &'static str {
                match self { $(Action::$name => stringify!($name)),* }
            }
        }

        /// Zero-sized marker types, one per action, for [`Authorized`].
        pub mod act {
            $(
                $(#[$doc])*
                #[derive(Debug)]
                pub struct $name;
                impl super::ActionKind for $name { const ACTION: super::Action = super::Action::$name; }
                $(impl super::$marker for $name {})?
            )*
        }
    };
}

actions! {
    /// CreateKey
    CreateKey,
    /// DescribeKey
    DescribeKey,
    /// ListKeys
    ListKeys,
    /// CreateAlias
    CreateAlias,
    /// ListAliases
    ListAliases,
    /// UpdateAlias
    UpdateAlias,
    /// DeleteAlias
    DeleteAlias,
    /// EnableKey
    EnableKey,
    /// DisableKey
    DisableKey,
    /// ScheduleKeyDeletion
    ScheduleKeyDeletion,
    /// CancelKeyDeletion
    CancelKeyDeletion,
    /// EnableKeyRotation
    EnableKeyRotation,
    /// DisableKeyRotation
    DisableKeyRotation,
    /// GetKeyRotationStatus
    GetKeyRotationStatus,
    /// RotateKeyOnDemand
    RotateKeyOnDemand: CreatesMaterial,
    /// ListKeyRotations
    ListKeyRotations,
    /// TagResource
    TagResource,
    /// UntagResource
    UntagResource,
    /// ListResourceTags
    ListResourceTags,
    /// Encrypt
    Encrypt: UsesMaterial,
    /// Decrypt
    Decrypt: UsesMaterial,
    /// ReEncrypt, on the source key
    ReEncryptFrom: UsesMaterial,
    /// ReEncrypt, on the destination key
    ReEncryptTo: UsesMaterial,
    /// GenerateDataKey
    GenerateDataKey: UsesMaterial,
    /// GenerateDataKeyWithoutPlaintext
    GenerateDataKeyWithoutPlaintext: UsesMaterial,
    /// GenerateRandom
    GenerateRandom,
    /// GenerateMac
    GenerateMac: UsesMaterial,
    /// VerifyMac
    VerifyMac: UsesMaterial,
    /// GetKeyPolicy
    GetKeyPolicy,
    /// PutKeyPolicy
    PutKeyPolicy,
    /// ListKeyPolicies
    ListKeyPolicies,
    /// CreateGrant
    CreateGrant,
    /// ListGrants
    ListGrants,
    /// RetireGrant
    RetireGrant,
    /// RevokeGrant
    RevokeGrant,
    /// ListRetirableGrants
    ListRetirableGrants,
    /// Create an access key (custody)
    CreateAccessKey,
    /// List access keys (custody)
    ListAccessKeys,
    /// Enable or disable an access key (custody)
    UpdateAccessKey,
    /// Delete an access key (custody)
    DeleteAccessKey,
    /// Read the audit trail (custody)
    ReadAudit,
}

/// Implemented by the marker type of each action.
pub trait ActionKind {
    /// The action.
    const ACTION: Action;
}

/// Actions that may unwrap a key version's material.
pub trait UsesMaterial: ActionKind {}

/// Actions that may create key versions (CreateKey creates its first version under its own proof).
pub trait CreatesMaterial: ActionKind {}

impl CreatesMaterial for act::CreateKey {}

/// Proof that the caller may perform `A` on the resource it was checked against.
/// Only [`authorize`] constructs one.
#[derive(Debug)]
#[must_use]
pub struct Authorized<A: ActionKind> {
    _action: PhantomData<fn() -> A>,
}

/// The one authorization decision. `key` is `None` for actions on no key (CreateKey, ListKeys,
/// GenerateRandom), which are checked against the caller's tenant.
pub fn authorize<A: ActionKind>(caller: &Caller, key: Option<&KeyRecord>) -> Result<Authorized<A>, KmsError> {
    let same_tenant = key.is_none_or(|k| k.tenant == caller.tenant);
    if same_tenant && caller.roles.contains(&Role::Administrator) {
        return Ok(Authorized { _action: PhantomData });
    }
    let resource = match key {
        Some(k) => format!("key/{}", k.id),
        None => format!("account {}", caller.tenant),
    };
    Err(KmsError::AccessDenied(format!(
        "User: {} is not authorized to perform: kms:{} on resource: {resource}",
        caller.arn(),
        A::ACTION.name()
    )))
}

/// The key-state table (AWS's "key states and their effect", one place). `arn` names the key in
/// the message.
pub fn check_state(key: &KeyRecord, action: Action, arn: &str) -> Result<(), KmsError> {
    use Action::*;
    check_usage(key, action, arn)?;
    let always = matches!(
        action,
        DescribeKey
            | ListKeys
            | ListAliases
            | ListResourceTags
            | GetKeyRotationStatus
            | ListKeyRotations
            | DeleteAlias
            | GetKeyPolicy
            | ListKeyPolicies
            | ListGrants
            | RetireGrant
            | RevokeGrant
    );
    let state = key.state;
    let invalid = || KmsError::InvalidState(format!("{arn} is {}.", state_phrase(state)));
    match state {
        KeyState::Enabled => match action {
            CancelKeyDeletion => Err(invalid()),
            _ => Ok(()),
        },
        _ if always => Ok(()),
        KeyState::Disabled => match action {
            Encrypt
            | Decrypt
            | ReEncryptFrom
            | ReEncryptTo
            | GenerateDataKey
            | GenerateDataKeyWithoutPlaintext
            | GenerateMac
            | VerifyMac
            | EnableKeyRotation
            | DisableKeyRotation
            | RotateKeyOnDemand => Err(KmsError::Disabled(format!("{arn} is disabled."))),
            CancelKeyDeletion => Err(invalid()),
            _ => Ok(()),
        },
        KeyState::PendingDeletion => match action {
            CancelKeyDeletion => Ok(()),
            Encrypt
            | Decrypt
            | ReEncryptFrom
            | ReEncryptTo
            | GenerateDataKey
            | GenerateDataKeyWithoutPlaintext
            | GenerateMac
            | VerifyMac => {
                // DESIGN.md §5: use of a key pending deletion is a signal worth an alert.
                tracing::warn!(key_id = %key.id, action = action.name(), "attempt to use a key pending deletion");
                Err(invalid())
            }
            _ => Err(invalid()),
        },
        KeyState::Destroyed => Err(invalid()),
    }
}

/// Operations a key's usage allows (AWS: InvalidKeyUsageException otherwise); automatic and
/// on-demand rotation exist only for symmetric encryption keys.
fn check_usage(key: &KeyRecord, action: Action, arn: &str) -> Result<(), KmsError> {
    use Action::*;
    let hmac = key.spec.mac_algorithm().is_some();
    let encrypts = matches!(
        action,
        Encrypt | Decrypt | ReEncryptFrom | ReEncryptTo | GenerateDataKey | GenerateDataKeyWithoutPlaintext
    );
    let macs = matches!(action, GenerateMac | VerifyMac);
    if (encrypts && hmac) || (macs && !hmac) {
        let usage = key.spec.usage();
        return Err(KmsError::InvalidKeyUsage(format!(
            "{arn} key usage is {usage} which is not valid for {}.",
            action.name()
        )));
    }
    if hmac && matches!(action, EnableKeyRotation | RotateKeyOnDemand) {
        return Err(KmsError::UnsupportedOperation(format!(
            "{arn} is an HMAC key; only symmetric encryption keys rotate."
        )));
    }
    Ok(())
}

fn state_phrase(state: KeyState) -> &'static str {
    match state {
        KeyState::Enabled => "enabled",
        KeyState::Disabled => "disabled",
        KeyState::PendingDeletion => "pending deletion",
        KeyState::Destroyed => "destroyed",
    }
}

/// The scheduler's own authority for the work it does by itself (automatic rotation).
pub(crate) fn scheduler<A: ActionKind>() -> Authorized<A> {
    Authorized { _action: PhantomData }
}
