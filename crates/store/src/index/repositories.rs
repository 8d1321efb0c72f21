//! The repositories the store holds, for the catalog: every name with a blob linked, a
//! manifest or a tag in it.

use redb::{ReadableDatabase, ReadableTable};

use super::{Index, LINKS, MANIFESTS, TAGS};
use crate::error::Result;

impl Index {
    /// Up to `n` repository names after `last`, in lexical order. A few seeks per name: each
    /// name found is skipped whole in every table (`name\x01` sorts right after
    /// `name\0<anything>` and before any longer name such as `name/sub`).
    pub(crate) fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let tx = self.db.begin_read()?;
        let links = tx.open_table(LINKS)?;
        let manifests = tx.open_table(MANIFESTS)?;
        let tags = tx.open_table(TAGS)?;
        let mut from = last.map_or_else(String::new, |l| format!("{l}\x01"));
        let mut out = Vec::new();
        while out.len() < n {
            let next = [
                first_name(&links, &from)?,
                first_name(&manifests, &from)?,
                first_name(&tags, &from)?,
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(name) = next else { break };
            from = format!("{name}\x01");
            out.push(name);
        }
        Ok(out)
    }
}

/// The repository of the first key at or after `from` in a table keyed `repo\0...`.
fn first_name<V: redb::Value + 'static>(
    table: &impl ReadableTable<&'static str, V>,
    from: &str,
) -> Result<Option<String>> {
    match table.range(from..)?.next() {
        Some(item) => Ok(item?
            .0
            .value()
            .split_once('\0')
            .map(|(name, _)| name.to_owned())),
        None => Ok(None),
    }
}
