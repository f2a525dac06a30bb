//! Authorization and key-state checks: the two gates every operation passes (DESIGN.md §4).
//!
//! An [`Authorized<A>`] is the proof an operation needs; only this module makes one: [`authorize`]
//! for actions on no key (the caller's roles decide) and `Kms::authorize_key` (in `access.rs`)
//! for actions on a key (roles, then the key policy and grants). Operations that touch key
//! material or change a key take one by value, so an operation cannot forget the check.

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
    /// The caller's address (for `aws:SourceIp` conditions).
    pub(crate) source_ip: Option<std::net::IpAddr>,
}

impl Caller {
    /// Attaches the request's audit scope: a state change the request makes then commits in
    /// the same transaction as its audit record.
    pub fn with_audit(mut self, scope: std::sync::Arc<crate::audit::AuditScope>) -> Self {
        self.audit = Some(scope);
        self
    }

    /// Records where the request came from (`aws:SourceIp` in key policy conditions).
    pub fn with_source_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.source_ip = Some(ip);
        self
    }

    /// The caller's roles.
    pub fn roles(&self) -> &[Role] {
        &self.roles
    }

    /// As the policy evaluator sees it.
    pub(crate) fn subject(&self) -> crate::policy::Subject<'_> {
        crate::policy::Subject { tenant: &self.tenant, name: &self.name }
    }

    /// The caller's tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The caller's principal name.
    pub fn name(&self) -> &PrincipalName {
        &self.name
    }

    /// Whether the caller may manage `principal`'s credentials: its own, or anyone's in its
    /// tenant as a tenant admin.
    pub(crate) fn may_manage(&self, principal: &PrincipalName, action: Action) -> Result<(), KmsError> {
        if *principal == self.name || self.roles.contains(&Role::TenantAdmin) {
            return Ok(());
        }
        Err(denied(self, action, &format!("principal {principal}")))
    }

    /// The caller's ARN (IAM-style, as AWS error messages name callers).
    pub fn arn(&self) -> String {
        format!("arn:aws:iam::{}:user/{}", self.tenant, self.name)
    }
}

macro_rules! actions {
    (@material UsesMaterial) => { true };
    (@material $($other:ident)?) => { false };
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

            /// The action with this AWS name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $(stringify!($name) => Some(Action::$name),)* _ => None }
            }

            /// Whether the action uses a key version's material (the cryptographic operations:
            /// the ones whose marker type is [`UsesMaterial`]).
            pub fn uses_material(self) -> bool {
                match self { $(Action::$name => actions!(@material $($marker)?)),* }
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
    /// UpdateKeyDescription
    UpdateKeyDescription,
    /// Create a tenant (custody)
    CreateTenant,
    /// List tenants (custody)
    ListTenants,
    /// Create a principal (custody)
    CreatePrincipal,
    /// List principals (custody)
    ListPrincipals,
    /// Describe a principal (custody)
    DescribePrincipal,
    /// Enable, disable or change the roles of a principal (custody)
    UpdatePrincipal,
    /// Delete a principal (custody)
    DeletePrincipal,
    /// Issue a client certificate for a principal (custody)
    IssueCertificate,
    /// Issue a server certificate (custody)
    IssueServerCertificate,
    /// Revoke certificates (custody)
    RevokeCertificate,
    /// List issued certificates (custody)
    ListCertificates,
    /// Renew one's own client certificate with the current one (custody)
    RenewCertificate,
    /// Roll the internal CA over to a new one (custody)
    RotateCa,
    /// Replace the root key and re-seal everything under the new one (custody)
    RotateRoot,
    /// Read the root key's generation and any rotation under way (custody)
    DescribeRoot,
    /// Who can / explain (custody)
    ExplainAccess,
    /// Check the store's integrity (custody)
    CheckStore,
    /// Create a backup, read the destruction ledger (custody)
    CreateBackup,
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

/// Which roles may take `action` at all. For actions on a key the key policy (or a grant) must
/// allow it too; for the others this is the whole decision.
pub fn roles_for(action: Action) -> &'static [Role] {
    use Action::*;
    use Role::*;
    match action {
        CreateKey | EnableKey | DisableKey | ScheduleKeyDeletion | CancelKeyDeletion | EnableKeyRotation
        | DisableKeyRotation | RotateKeyOnDemand | TagResource | UntagResource | UpdateKeyDescription | CreateAlias
        | UpdateAlias | DeleteAlias | PutKeyPolicy | CreateGrant | RevokeGrant => &[KeyAdmin],
        // Listed, not `uses_material()`: this match stays exhaustive, so a new action must be
        // given its roles here.
        Encrypt
        | Decrypt
        | ReEncryptFrom
        | ReEncryptTo
        | GenerateDataKey
        | GenerateDataKeyWithoutPlaintext
        | GenerateMac
        | VerifyMac
        | GenerateRandom => &[KeyUser],
        DescribeKey | ListKeys | ListAliases | GetKeyRotationStatus | ListKeyRotations | ListResourceTags
        | GetKeyPolicy | ListKeyPolicies | ListGrants | ListRetirableGrants => &[KeyAdmin, KeyUser, Auditor],
        // Retiring is checked against the grant's retiring principal and grantee instead.
        RetireGrant => &[TenantAdmin, KeyAdmin, KeyUser, Auditor, SecurityOfficer],
        // Principals manage their own access keys; a tenant admin manages everyone's (the
        // operations check which).
        CreateAccessKey | ListAccessKeys | UpdateAccessKey | DeleteAccessKey => {
            &[TenantAdmin, KeyAdmin, KeyUser, Auditor, SecurityOfficer]
        }
        ReadAudit => &[Auditor],
        ExplainAccess => &[Auditor, KeyAdmin],
        CheckStore => &[SecurityOfficer, Auditor],
        CreateBackup => &[SecurityOfficer],
        CreateTenant | ListTenants => &[SecurityOfficer],
        CreatePrincipal | UpdatePrincipal | DeletePrincipal | IssueCertificate => &[TenantAdmin],
        // A tenant admin revokes its tenant's certificates; a security officer any (the
        // operation checks which).
        RevokeCertificate | ListCertificates => &[TenantAdmin, SecurityOfficer],
        IssueServerCertificate | RotateCa | RotateRoot => &[SecurityOfficer],
        DescribeRoot => &[SecurityOfficer, Auditor],
        // Every principal renews its own certificate (the operation checks it is its own).
        RenewCertificate => &[TenantAdmin, KeyAdmin, KeyUser, Auditor, SecurityOfficer],
        ListPrincipals | DescribePrincipal => &[TenantAdmin, Auditor],
    }
}

/// Whether `roles` include one that may take `action`.
pub fn role_permits(roles: &[Role], action: Action) -> bool {
    roles_for(action).iter().any(|r| roles.contains(r))
}

/// The refusal every denied action gets (AWS's wording).
pub(crate) fn denied(caller: &Caller, action: Action, resource: &str) -> KmsError {
    KmsError::AccessDenied(format!(
        "User: {} is not authorized to perform: kms:{} on resource: {resource}",
        caller.arn(),
        action.name()
    ))
}

/// The decision for an action on no key: the caller's roles.
pub fn authorize<A: ActionKind>(caller: &Caller) -> Result<Authorized<A>, KmsError> {
    if role_permits(&caller.roles, A::ACTION) {
        return Ok(Authorized { _action: PhantomData });
    }
    Err(denied(caller, A::ACTION, &format!("account {}", caller.tenant)))
}

/// Proof for an action on a key, once `Kms::authorize_key` has decided.
pub(crate) fn allowed<A: ActionKind>() -> Authorized<A> {
    Authorized { _action: PhantomData }
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
            a if a.uses_material() || matches!(a, EnableKeyRotation | DisableKeyRotation | RotateKeyOnDemand) => {
                Err(KmsError::Disabled(format!("{arn} is disabled.")))
            }
            CancelKeyDeletion => Err(invalid()),
            _ => Ok(()),
        },
        KeyState::PendingDeletion => match action {
            CancelKeyDeletion => Ok(()),
            a if a.uses_material() => {
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
    let macs = matches!(action, GenerateMac | VerifyMac);
    let encrypts = action.uses_material() && !macs;
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
