//! The lifecycle rules: which authority transitions are allowed, and, when one is not, what
//! the operator should do instead. The store applies a transition atomically and asks these
//! rules inside its transaction ([`Store::activate_authority`], [`Store::retire_authority`]);
//! the rules themselves live here, pure, with their tests.

use crate::audit::EventRow;
use crate::store::{AuthorityState, Leaves, Standing, Store, TransitionError};

/// Why a transition was refused. Each message says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// No such authority.
    #[error("no authority with id {0}; `ca-server root status` lists them")]
    NoSuchAuthority(i64),
    /// Activating the active authority.
    #[error("authority {0} is already active")]
    AlreadyActive(i64),
    /// Activating a retired authority.
    #[error(
        "authority {0} is retired: its root has left the bundle and proxies no longer trust \
         it; prepare a new authority (`ca-server root prepare`) instead"
    )]
    Retired(i64),
    /// Activating an expired authority.
    #[error("authority {id} expired at {}; prepare a new authority instead", crate::rfc3339::secs_text(*.not_after))]
    Expired {
        /// The authority.
        id: i64,
        /// Its notAfter, unix seconds.
        not_after: i64,
    },
    /// Retiring the active authority.
    #[error(
        "authority {0} is active and would leave nothing to sign with: activate another \
         authority first (`ca-server root activate ID`), then retire this one once its \
         certificates have expired"
    )]
    RetiringActive(i64),
    /// Retiring a retired authority.
    #[error("authority {0} is already retired")]
    AlreadyRetired(i64),
    /// Activating a tainted authority.
    #[error(
        "authority {0} is tainted (marked compromised) and may not sign again; prepare a new \
         authority (`ca-server root prepare`) instead"
    )]
    ActivatingTainted(i64),
    /// Tainting the active authority.
    #[error(
        "authority {0} is active: activate another authority first (`ca-server root prepare`, \
         then `root activate ID`), then taint this one, so its holders have somewhere to go"
    )]
    TaintingActive(i64),
    /// Tainting a retired authority.
    #[error("authority {0} is retired: its root has already left the bundle")]
    TaintingRetired(i64),
    /// Tainting a tainted authority.
    #[error("authority {0} is already tainted")]
    AlreadyTainted(i64),
    /// Retiring a tainted authority that some holder's newest certificate still comes from.
    #[error(
        "{} holder(s) still have no certificate newer than authority {id}'s (the last of its \
         certificates expires at {}); their agents renew when they see the taint: wait until \
         `ca-server root status` shows none live, or pass --force",
        .leaves.live,
        .leaves.last_expiry.map(crate::rfc3339::secs_text).unwrap_or_default()
    )]
    TaintedStillLive {
        /// The authority.
        id: i64,
        /// Its certificates.
        leaves: Leaves,
    },
    /// Retiring an authority whose workload certificates are still valid.
    #[error(
        "{} unexpired certificate(s) chain to authority {id}, the last until {}; retiring it \
         now would make their holders fail mTLS with peers that drop its root. Wait until \
         then, or pass --force",
        .leaves.unexpired,
        .leaves.last_expiry.map(crate::rfc3339::secs_text).unwrap_or_default()
    )]
    StillInUse {
        /// The authority.
        id: i64,
        /// Its unexpired workload certificates.
        leaves: Leaves,
    },
}

/// Whether authority `id`, standing as `standing`, may become active at `now` (unix seconds):
/// only a prepared one, or a retiring one (a rollback), that has not expired.
pub fn may_activate(id: i64, standing: Option<&Standing>, now: i64) -> Result<(), LifecycleError> {
    let s = standing.ok_or(LifecycleError::NoSuchAuthority(id))?;
    match s.state {
        AuthorityState::Prepared | AuthorityState::Retiring => {}
        AuthorityState::Active => return Err(LifecycleError::AlreadyActive(id)),
        AuthorityState::Retired => return Err(LifecycleError::Retired(id)),
    }
    if s.tainted {
        return Err(LifecycleError::ActivatingTainted(id));
    }
    if s.not_after <= now {
        return Err(LifecycleError::Expired {
            id,
            not_after: s.not_after,
        });
    }
    Ok(())
}

/// Whether authority `id` may be retired: never the active one; a prepared or retiring one
/// once no unexpired workload SVID chains to it, a tainted one once no holder's newest
/// certificate comes from it (its holders have moved on), or either at once with `force`.
pub fn may_retire(
    id: i64,
    standing: Option<&Standing>,
    leaves: &Leaves,
    force: bool,
) -> Result<(), LifecycleError> {
    let s = standing.ok_or(LifecycleError::NoSuchAuthority(id))?;
    match s.state {
        AuthorityState::Prepared | AuthorityState::Retiring => {}
        AuthorityState::Active => return Err(LifecycleError::RetiringActive(id)),
        AuthorityState::Retired => return Err(LifecycleError::AlreadyRetired(id)),
    }
    if force {
        return Ok(());
    }
    if s.tainted {
        if leaves.live > 0 {
            return Err(LifecycleError::TaintedStillLive {
                id,
                leaves: leaves.clone(),
            });
        }
    } else if leaves.unexpired > 0 {
        return Err(LifecycleError::StillInUse {
            id,
            leaves: leaves.clone(),
        });
    }
    Ok(())
}

/// Whether authority `id` may be tainted: a prepared or retiring one not tainted yet.
pub fn may_taint(id: i64, standing: Option<&Standing>) -> Result<(), LifecycleError> {
    let s = standing.ok_or(LifecycleError::NoSuchAuthority(id))?;
    match s.state {
        AuthorityState::Prepared | AuthorityState::Retiring => {}
        AuthorityState::Active => return Err(LifecycleError::TaintingActive(id)),
        AuthorityState::Retired => return Err(LifecycleError::TaintingRetired(id)),
    }
    if s.tainted {
        return Err(LifecycleError::AlreadyTainted(id));
    }
    Ok(())
}

/// Why a transition did not happen: the rules refused, or the store failed.
pub type TransitionFailed = TransitionError<LifecycleError>;

/// Activates authority `id` if the rules allow it; returns the one that was active before.
pub async fn activate(
    store: &Store,
    id: i64,
    event: EventRow,
) -> Result<Option<i64>, TransitionFailed> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    store
        .activate_authority(id, event, now, |s| may_activate(id, s, now))
        .await
}

/// Taints authority `id` if the rules allow it.
pub async fn taint(store: &Store, id: i64, event: EventRow) -> Result<(), TransitionFailed> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    store
        .taint_authority(id, event, now, |s| may_taint(id, s))
        .await
}

/// Retires authority `id` if the rules allow it.
pub async fn retire(
    store: &Store,
    id: i64,
    force: bool,
    event: EventRow,
) -> Result<(), TransitionFailed> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    store
        .retire_authority(id, event, now, |s, leaves| may_retire(id, s, leaves, force))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(state: AuthorityState, not_after: i64) -> Standing {
        Standing {
            state,
            not_after,
            tainted: false,
        }
    }

    #[test]
    fn which_authorities_may_become_active() {
        let now = 1_000;
        for state in [AuthorityState::Prepared, AuthorityState::Retiring] {
            assert_eq!(may_activate(3, Some(&standing(state, 2_000)), now), Ok(()));
        }
        assert_eq!(
            may_activate(3, Some(&standing(AuthorityState::Active, 2_000)), now),
            Err(LifecycleError::AlreadyActive(3))
        );
        assert_eq!(
            may_activate(3, Some(&standing(AuthorityState::Retired, 2_000)), now),
            Err(LifecycleError::Retired(3))
        );
        assert_eq!(
            may_activate(3, Some(&standing(AuthorityState::Prepared, now)), now),
            Err(LifecycleError::Expired {
                id: 3,
                not_after: now
            })
        );
        assert_eq!(
            may_activate(9, None, now),
            Err(LifecycleError::NoSuchAuthority(9))
        );
    }

    #[test]
    fn which_authorities_may_retire() {
        let none = Leaves::default();
        let some = Leaves {
            unexpired: 2,
            last_expiry: Some(5_000),
            live: 1,
        };
        let retiring = standing(AuthorityState::Retiring, 9_000);
        assert_eq!(may_retire(3, Some(&retiring), &none, false), Ok(()));
        assert!(matches!(
            may_retire(3, Some(&retiring), &some, false),
            Err(LifecycleError::StillInUse { id: 3, .. })
        ));
        assert_eq!(may_retire(3, Some(&retiring), &some, true), Ok(()));
        // Never the active one, not even with --force.
        assert_eq!(
            may_retire(
                3,
                Some(&standing(AuthorityState::Active, 9_000)),
                &none,
                true
            ),
            Err(LifecycleError::RetiringActive(3))
        );
        assert_eq!(
            may_retire(
                3,
                Some(&standing(AuthorityState::Retired, 9_000)),
                &none,
                false
            ),
            Err(LifecycleError::AlreadyRetired(3))
        );
    }

    #[test]
    fn a_tainted_authority_retires_once_its_holders_moved_on_and_never_signs_again() {
        let tainted = Standing {
            tainted: true,
            ..standing(AuthorityState::Retiring, 9_000)
        };
        // Unexpired certificates, but every holder has a newer one: it may go.
        let replaced = Leaves {
            unexpired: 5,
            last_expiry: Some(5_000),
            live: 0,
        };
        assert_eq!(may_retire(3, Some(&tainted), &replaced, false), Ok(()));
        let held = Leaves {
            live: 2,
            ..replaced
        };
        assert!(matches!(
            may_retire(3, Some(&tainted), &held, false),
            Err(LifecycleError::TaintedStillLive { id: 3, .. })
        ));
        assert_eq!(may_retire(3, Some(&tainted), &held, true), Ok(()));
        assert_eq!(
            may_activate(3, Some(&tainted), 1_000),
            Err(LifecycleError::ActivatingTainted(3))
        );
        // Which may be tainted.
        for state in [AuthorityState::Prepared, AuthorityState::Retiring] {
            assert_eq!(may_taint(3, Some(&standing(state, 9_000))), Ok(()));
        }
        assert_eq!(
            may_taint(3, Some(&standing(AuthorityState::Active, 9_000))),
            Err(LifecycleError::TaintingActive(3))
        );
        assert_eq!(
            may_taint(3, Some(&standing(AuthorityState::Retired, 9_000))),
            Err(LifecycleError::TaintingRetired(3))
        );
        assert_eq!(
            may_taint(3, Some(&tainted)),
            Err(LifecycleError::AlreadyTainted(3))
        );
    }
}
