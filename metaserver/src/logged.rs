//! A redb table that remembers every change made through it, so that a transaction's effect can
//! be written to the write-ahead log (`wal`) as plain key/value puts and deletes.
//!
//! Reads go straight to the table (through `Deref`); the only ways to change it are the methods
//! here, so no write can bypass the log: `Deref` gives no `&mut Table`.

use std::borrow::Borrow;
use std::ops::{Deref, RangeBounds};

use redb::{AccessGuard, Key, ReadableTable, StorageError, Table, TableHandle, Value};

/// One change to one table, in its stored (byte) form: the value, or `None` for a delete.
pub type RawChange = (Vec<u8>, Option<Vec<u8>>);

pub struct Logged<'t, K: Key + 'static, V: Value + 'static> {
    table: Table<'t, K, V>,
    changes: Vec<RawChange>,
}

impl<'t, K: Key + 'static, V: Value + 'static> Logged<'t, K, V> {
    pub fn new(table: Table<'t, K, V>) -> Self {
        Logged {
            table,
            changes: Vec::new(),
        }
    }

    /// The table, for code that takes any readable table.
    pub fn table(&self) -> &Table<'t, K, V> {
        &self.table
    }

    /// The changes made so far, in order; the log is left empty.
    pub fn take_changes(&mut self) -> Vec<RawChange> {
        std::mem::take(&mut self.changes)
    }

    pub fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<Option<AccessGuard<'_, V>>, StorageError> {
        let raw_key = K::as_bytes(key.borrow()).as_ref().to_vec();
        let raw_value = V::as_bytes(value.borrow()).as_ref().to_vec();
        let old = self.table.insert(key, value)?;
        self.changes.push((raw_key, Some(raw_value)));
        Ok(old)
    }

    pub fn remove<'a>(
        &mut self,
        key: impl Borrow<K::SelfType<'a>>,
    ) -> Result<Option<AccessGuard<'_, V>>, StorageError> {
        let raw_key = K::as_bytes(key.borrow()).as_ref().to_vec();
        let old = self.table.remove(key)?;
        if old.is_some() {
            self.changes.push((raw_key, None));
        }
        Ok(old)
    }

    /// Keeps, within `range`, only the entries for which `keep` is true (as redb's `retain_in`).
    pub fn retain_in<'a, KR, F>(&mut self, range: impl RangeBounds<KR> + 'a, mut keep: F) -> Result<(), StorageError>
    where
        KR: Borrow<K::SelfType<'a>> + 'a,
        F: for<'f> FnMut(K::SelfType<'f>, V::SelfType<'f>) -> bool,
    {
        let mut doomed: Vec<Vec<u8>> = Vec::new();
        for item in self.table.range(range)? {
            let (key, value) = item?;
            if !keep(key.value(), value.value()) {
                doomed.push(K::as_bytes(&key.value()).as_ref().to_vec());
            }
        }
        for raw_key in doomed {
            self.table.remove(K::from_bytes(&raw_key))?;
            self.changes.push((raw_key, None));
        }
        Ok(())
    }
}

impl<'t, K: Key + 'static, V: Value + 'static> Deref for Logged<'t, K, V> {
    type Target = Table<'t, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

/// Applies logged changes (from [`Logged::take_changes`]) to a table.
///
/// The bytes must have come from a table of the same key and value types: the decoders of
/// redb's fixed-width types assume the right length. The log's records are checksummed, so a
/// damaged record never gets this far.
pub fn apply_changes<K: Key + 'static, V: Value + 'static>(
    table: &mut Table<'_, K, V>,
    changes: &[RawChange],
) -> Result<(), StorageError> {
    let fits = |width: Option<usize>, raw: &[u8]| width.is_none_or(|w| w == raw.len());
    for (raw_key, raw_value) in changes {
        let value_fits = raw_value.as_deref().is_none_or(|v| fits(V::fixed_width(), v));
        if !fits(K::fixed_width(), raw_key) || !value_fits {
            return Err(StorageError::Corrupted(format!(
                "a logged change to table {} has a key or value of the wrong width",
                table.name()
            )));
        }
        let key = K::from_bytes(raw_key);
        match raw_value {
            Some(raw_value) => {
                table.insert(key, V::from_bytes(raw_value))?;
            }
            None => {
                table.remove(key)?;
            }
        }
    }
    Ok(())
}
