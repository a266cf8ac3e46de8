//! Following many ledgers from one task.
//!
//! A reader that tails many partitions (an MQTT connection subscribed to
//! `#`, say) would otherwise need a task per partition, each parked on the
//! ledger's end `watch` and handing what it reads to the reader through a
//! channel: one more task wake-up, allocation and hand-off per message.
//! Instead the reader makes one [`ReadySet`] and registers it with each
//! ledger under a token of its choosing ([`Ledger::follow`]). When a
//! ledger's end moves, or the ledger closes, its token is queued on the set
//! (at most once until the reader takes it) and the set's waiter woken.
//! The reader takes the ready tokens, reads those ledgers itself, and waits
//! on the one set again.
//!
//! No wake-up is lost: a token is queued after the end it announces is
//! published, and taken (its queued flag cleared) under the same lock
//! before the reader looks at the end. Whichever comes second sees the
//! other: either the reader reads the new end, or the writer queues the
//! token again.
//!
//! [`Ledger::follow`]: super::Ledger::follow

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

/// The tokens of the followed ledgers that moved, and one waiter.
#[derive(Debug, Default)]
pub struct ReadySet {
    state: Mutex<Ready>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Ready {
    tokens: Vec<u32>,
    /// `queued[t]`: token `t` is in `tokens`.
    queued: Vec<bool>,
}

impl ReadySet {
    /// A new, empty set.
    pub fn new() -> Arc<ReadySet> {
        Arc::new(ReadySet::default())
    }

    /// Queues `token` (unless it is queued already) and wakes the waiter.
    pub fn mark(&self, token: u32) {
        let i = token as usize;
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.queued.len() <= i {
                s.queued.resize(i + 1, false);
            }
            if s.queued[i] {
                return;
            }
            s.queued[i] = true;
            s.tokens.push(token);
        }
        self.notify.notify_one();
    }

    /// Moves the queued tokens to the end of `into`, in the order they were
    /// queued; each can be queued again from now on.
    pub fn take_into(&self, into: &mut VecDeque<u32>) {
        self.drain(|t| into.push_back(t));
    }

    /// Forgets the queued tokens, which can be queued again from now on (a
    /// reader of one ledger needs only the wake-up).
    pub fn clear(&self) {
        self.drain(|_| {});
    }

    fn drain(&self, mut each: impl FnMut(u32)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Ready { tokens, queued } = &mut *s;
        for t in tokens.drain(..) {
            queued[t as usize] = false;
            each(t);
        }
    }

    /// Waits until a token is queued after the last wait returned (or was
    /// queued while nobody waited). Wake-ups may be spurious: take the
    /// tokens and check.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

/// One ledger's registration in a [`ReadySet`]; the ledger forgets it when
/// this is dropped.
#[derive(Debug)]
pub struct Follow {
    _inner: Arc<Follower>,
}

#[derive(Debug)]
pub(super) struct Follower {
    set: Arc<ReadySet>,
    token: u32,
}

/// The followers of one ledger.
#[derive(Debug, Default)]
pub(super) struct Followers {
    list: Mutex<Vec<Weak<Follower>>>,
}

impl Followers {
    /// Registers `set` under `token`; the token is queued at once, so the
    /// reader looks at what is already there.
    pub(super) fn add(&self, set: &Arc<ReadySet>, token: u32) -> Follow {
        let inner = Arc::new(Follower {
            set: set.clone(),
            token,
        });
        {
            let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(&inner));
        }
        set.mark(token);
        Follow { _inner: inner }
    }

    /// Queues every live follower's token (after the end moved, or at
    /// close) and forgets the dropped ones.
    pub(super) fn wake(&self) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| match w.upgrade() {
            Some(f) => {
                f.set.mark(f.token);
                true
            }
            None => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_queued_once_until_taken() {
        let set = ReadySet::new();
        set.mark(3);
        set.mark(1);
        set.mark(3);
        let mut q = VecDeque::new();
        set.take_into(&mut q);
        assert_eq!(q, [3, 1]);
        set.mark(3);
        set.take_into(&mut q);
        assert_eq!(q, [3, 1, 3]);
    }

    #[test]
    fn a_dropped_follow_is_not_woken() {
        let set = ReadySet::new();
        let followers = Followers::default();
        let a = followers.add(&set, 0);
        let b = followers.add(&set, 1);
        let mut q = VecDeque::new();
        set.take_into(&mut q);
        assert_eq!(q, [0, 1], "a new follow is ready at once");
        drop(a);
        followers.wake();
        q.clear();
        set.take_into(&mut q);
        assert_eq!(q, [1]);
        assert_eq!(followers.list.lock().unwrap().len(), 1);
        drop(b);
    }

    #[tokio::test]
    async fn a_mark_before_the_wait_is_not_lost() {
        let set = ReadySet::new();
        set.mark(0);
        tokio::time::timeout(std::time::Duration::from_secs(5), set.wait())
            .await
            .expect("the stored wake-up is seen");
    }
}
