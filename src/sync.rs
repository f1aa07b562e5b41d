//! Locking without panics: a poisoned lock only means another thread panicked while holding it;
//! what it guards (buffers, maps of idle connections) is still valid, so the lock is taken anyway.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
