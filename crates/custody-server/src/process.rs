//! Keeping secrets out of swap and core dumps, for the server process (`custody server` and
//! `custody dev` call [`harden`] before starting; an in-process server in a test does not).
//!
//! - Core dumps are impossible: `RLIMIT_CORE` is 0 (soft and hard) and the process is not
//!   dumpable (`PR_SET_DUMPABLE` 0, which also keeps other processes of the same user from
//!   attaching a debugger or reading its memory through /proc).
//! - All memory is locked (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`): key material, the
//!   root key and data keys can never be written to swap. Pages are locked as they are touched,
//!   so only the memory in use is locked. This needs `CAP_IPC_LOCK` or a `RLIMIT_MEMLOCK` without
//!   a limit (the kernel counts whole mappings, thread stacks included); the process raises the
//!   limit if it may, and if memory still cannot be locked refuses to start, unless
//!   `danger_allow_swap` is set.
//!
//! No `unsafe`: rustix wraps these calls safely.

use rustix::mm::{mlockall, MlockAllFlags};
use rustix::process::{getrlimit, set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};

/// What [`harden`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardening {
    /// All memory is locked.
    pub memory_locked: bool,
}

/// Disables core dumps and locks all memory. Fails (with what to do) if memory cannot be locked,
/// unless `allow_swap`, which logs a warning instead.
pub fn harden(allow_swap: bool) -> Result<Hardening, String> {
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })
        .map_err(|e| format!("cannot disable core dumps (RLIMIT_CORE): {e}"))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot make the process non-dumpable (PR_SET_DUMPABLE): {e}"))?;
    match lock_memory() {
        Ok(()) => Ok(Hardening { memory_locked: true }),
        Err(why) if allow_swap => {
            tracing::warn!(reason = %why, "danger_allow_swap is set: memory is NOT locked, secrets may reach swap");
            Ok(Hardening { memory_locked: false })
        }
        Err(why) => Err(format!(
            "{why}. custody locks its memory so that keys never reach swap. Allow it: `ulimit -l unlimited`, \
             LimitMEMLOCK=infinity in a systemd unit, or `--ulimit memlock=-1` for a container; or set \
             danger_allow_swap = true (CUSTODY_DANGER_ALLOW_SWAP) to run without (development only)"
        )),
    }
}

fn lock_memory() -> Result<(), String> {
    let limit = getrlimit(Resource::Memlock);
    // Raising the hard limit needs CAP_SYS_RESOURCE; the soft one may go up to the hard one.
    // With CAP_IPC_LOCK the limit does not apply at all, so the lock is tried either way.
    let unlimited =
        limit.current.is_none() || setrlimit(Resource::Memlock, Rlimit { current: None, maximum: None }).is_ok();
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => {
            tracing::info!("memory locked (mlockall): secrets cannot reach swap");
            Ok(())
        }
        Err(e) if !unlimited => Err(format!(
            "the locked-memory limit (RLIMIT_MEMLOCK) is {} bytes, cannot be raised, and is too small to lock memory (mlockall: {e})",
            limit.current.unwrap_or(0)
        )),
        Err(e) => Err(format!("cannot lock memory (mlockall): {e}")),
    }
}
