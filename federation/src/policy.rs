//! When to poll a bundle endpoint again, and whether a fetched bundle replaces the
//! stored one (Federation spec §4.1, §4.2, §6.2; SECURITY.md §3.11 items 108, 110, 112).

use std::time::Duration;

use crate::bundle::SpiffeBundle;

/// Poll scheduling of one federation relationship.
///
/// The next poll is the bundle's `spiffe_refresh_hint` (spec §4.1) bounded to
/// [`min_interval`, `max_interval`]; a bundle without a hint (or a hint of 0) uses
/// `default_interval`. After a failure the poll is retried sooner, with a backoff that
/// starts at `min_interval` and doubles, but never later than the regular interval, so
/// the last good bundle is kept and the endpoint is not hammered (spec §6.2). A caller
/// that wants to retry strictly at the next polling interval (SECURITY.md item 110's
/// wording) uses [`RefreshPolicy::next_refresh`] after a failure too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Shortest delay between polls. Default 10 s.
    pub min_interval: Duration,
    /// Longest delay between polls. Default 1 h.
    pub max_interval: Duration,
    /// Delay when no hint is known. Default 5 min (spec §4.1, bundle spec §6.1).
    pub default_interval: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(10),
            max_interval: Duration::from_secs(3600),
            default_interval: Duration::from_secs(300),
        }
    }
}

impl RefreshPolicy {
    fn bound(&self, delay: Duration) -> Duration {
        // Not `Ord::clamp`, which panics when the bounds are inverted by configuration:
        // the minimum wins then.
        delay.min(self.max_interval).max(self.min_interval)
    }

    /// The delay before the next poll, from the bundle now in force (the stored one, or
    /// the one just stored), if any.
    pub fn next_refresh(&self, bundle: Option<&SpiffeBundle>) -> Duration {
        let hint = bundle
            .and_then(|b| b.refresh_hint)
            .filter(|hint| !hint.is_zero());
        self.bound(hint.unwrap_or(self.default_interval))
    }

    /// The delay before retrying after `consecutive_failures` failed polls (1 for the
    /// first failure): `min_interval` doubled per further failure, at most
    /// [`Self::next_refresh`].
    pub fn retry_after_failure(
        &self,
        bundle: Option<&SpiffeBundle>,
        consecutive_failures: u32,
    ) -> Duration {
        let doublings = consecutive_failures.saturating_sub(1).min(30);
        let backoff = self.min_interval.saturating_mul(1 << doublings);
        self.bound(backoff.min(self.next_refresh(bundle)))
    }
}

/// What to do with a fetched bundle.
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Store it (and distribute it): it is new.
    Store,
    /// Identical to the stored bundle: nothing to do.
    Unchanged,
    /// Its sequence number is lower than the stored one: keep the stored bundle
    /// (spec §4.2, item 108). An operator who rebuilt the peer domain accepts it with
    /// `accept_lower_sequence`.
    IgnoreLowerSequence {
        /// Sequence of the stored bundle.
        stored: u64,
        /// Sequence of the fetched bundle.
        fetched: u64,
    },
    /// It has no authority: keep the stored bundle and alert (item 112).
    RejectEmpty,
    /// It is for another trust domain than the stored one: a caller bug, refused
    /// (bundles are never merged across trust domains, spec §4.2).
    RejectTrustDomainMismatch,
}

/// Decides whether `fetched` replaces `stored`.
///
/// - an empty bundle never replaces anything ([`Decision::RejectEmpty`]);
/// - a bundle of another trust domain never replaces anything;
/// - an identical bundle is [`Decision::Unchanged`];
/// - a lower `spiffe_sequence` than the stored one is ignored unless
///   `accept_lower_sequence`;
/// - otherwise it is stored, including when either bundle has no sequence number (the
///   most recent one is then up to date, spec §4.2) or the sequence is equal but the
///   content changed (the peer broke the spec; the latest content wins).
pub fn should_store(
    stored: Option<&SpiffeBundle>,
    fetched: &SpiffeBundle,
    accept_lower_sequence: bool,
) -> Decision {
    if fetched.is_empty() {
        return Decision::RejectEmpty;
    }
    let Some(stored) = stored else {
        return Decision::Store;
    };
    if stored.trust_domain != fetched.trust_domain {
        return Decision::RejectTrustDomainMismatch;
    }
    if stored == fetched {
        return Decision::Unchanged;
    }
    if let (Some(stored_seq), Some(fetched_seq)) = (stored.sequence_number, fetched.sequence_number)
        && fetched_seq < stored_seq
        && !accept_lower_sequence
    {
        return Decision::IgnoreLowerSequence {
            stored: stored_seq,
            fetched: fetched_seq,
        };
    }
    Decision::Store
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_plugin_sdk::TrustDomain;

    fn bundle(td: &str, authority: u8, seq: Option<u64>, hint: Option<u64>) -> SpiffeBundle {
        SpiffeBundle {
            trust_domain: TrustDomain::new(td).unwrap(),
            x509_authorities: vec![vec![authority]],
            jwt_authorities: vec![],
            sequence_number: seq,
            refresh_hint: hint.map(Duration::from_secs),
        }
    }

    #[test]
    fn hint_is_bounded() {
        let policy = RefreshPolicy::default();
        let at = |hint| policy.next_refresh(Some(&bundle("a.org", 1, None, hint)));
        assert_eq!(at(Some(1)), Duration::from_secs(10));
        assert_eq!(at(Some(0)), Duration::from_secs(300));
        assert_eq!(at(Some(120)), Duration::from_secs(120));
        assert_eq!(at(Some(2_419_200)), Duration::from_secs(3600));
        assert_eq!(at(None), Duration::from_secs(300));
        assert_eq!(policy.next_refresh(None), Duration::from_secs(300));
    }

    #[test]
    fn inverted_bounds_do_not_panic() {
        let policy = RefreshPolicy {
            min_interval: Duration::from_secs(60),
            max_interval: Duration::from_secs(1),
            default_interval: Duration::from_secs(5),
        };
        assert_eq!(policy.next_refresh(None), Duration::from_secs(60));
        assert_eq!(policy.retry_after_failure(None, 9), Duration::from_secs(60));
    }

    #[test]
    fn failures_back_off_up_to_the_regular_interval() {
        let policy = RefreshPolicy::default();
        let stored = bundle("a.org", 1, Some(1), Some(60));
        let delays: Vec<u64> = (1..=5)
            .map(|n| policy.retry_after_failure(Some(&stored), n).as_secs())
            .collect();
        assert_eq!(delays, vec![10, 20, 40, 60, 60]);
        assert_eq!(policy.retry_after_failure(None, 0), Duration::from_secs(10));
        assert_eq!(
            policy.retry_after_failure(None, u32::MAX),
            Duration::from_secs(300)
        );
    }

    // SECURITY.md §3.11 item 108.
    #[test]
    fn lower_sequence_is_ignored_unless_accepted() {
        let stored = bundle("a.org", 1, Some(7), None);
        let older = bundle("a.org", 2, Some(5), None);
        assert_eq!(
            should_store(Some(&stored), &older, false),
            Decision::IgnoreLowerSequence {
                stored: 7,
                fetched: 5
            }
        );
        assert_eq!(should_store(Some(&stored), &older, true), Decision::Store);
        assert_eq!(
            should_store(Some(&stored), &bundle("a.org", 2, Some(8), None), false),
            Decision::Store
        );
        assert_eq!(
            should_store(Some(&stored), &bundle("a.org", 2, None, None), false),
            Decision::Store
        );
        assert_eq!(
            should_store(Some(&stored), &stored, false),
            Decision::Unchanged
        );
        assert_eq!(should_store(None, &older, false), Decision::Store);
    }

    // SECURITY.md §3.11 item 112.
    #[test]
    fn empty_never_wipes() {
        let stored = bundle("a.org", 1, Some(1), None);
        let mut empty = bundle("a.org", 1, Some(2), None);
        empty.x509_authorities.clear();
        assert_eq!(
            should_store(Some(&stored), &empty, true),
            Decision::RejectEmpty
        );
        assert_eq!(should_store(None, &empty, true), Decision::RejectEmpty);
    }

    #[test]
    fn other_trust_domain_is_refused() {
        let stored = bundle("a.org", 1, Some(1), None);
        assert_eq!(
            should_store(Some(&stored), &bundle("b.org", 2, Some(2), None), false),
            Decision::RejectTrustDomainMismatch
        );
    }
}
