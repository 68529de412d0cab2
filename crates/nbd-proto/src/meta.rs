//! Metadata contexts: the names this server offers and how client queries
//! select them.
//!
//! Supported namespaces:
//!
//! | query                       | `LIST_META_CONTEXT`        | `SET_META_CONTEXT` |
//! |-----------------------------|----------------------------|--------------------|
//! | `base:`                     | `base:allocation`          | ignored            |
//! | `base:allocation`           | `base:allocation`          | selects it         |
//! | `qemu:`                     | every dirty bitmap context | ignored            |
//! | `qemu:dirty-bitmap:`        | every dirty bitmap context | ignored            |
//! | `qemu:dirty-bitmap:NAME`    | that bitmap, if it exists  | selects it         |
//! | `understudy:`               | `understudy:order`, if offered | ignored        |
//! | `understudy:order`          | `understudy:order`, if offered | selects it     |
//! | anything else with a colon  | ignored                    | ignored            |
//! | no colon                    | `REP_ERR_INVALID`          | `REP_ERR_INVALID`  |
//!
//! An empty query list lists everything (LIST) or selects nothing (SET), as
//! the protocol requires.

use std::borrow::Cow;

/// Name of the standard allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of QEMU's dirty bitmap contexts (bit 0 = dirty).
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// The understudy write-order extension: selecting it allows
/// [`CMD_ORDER`](crate::wire::CMD_ORDER). It carries no block-status data.
pub const UNDERSTUDY_ORDER: &str = "understudy:order";

/// A metadata context an export can offer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: `STATE_HOLE` / `STATE_ZERO` per extent.
    BaseAllocation,
    /// `qemu:dirty-bitmap:NAME`: `STATE_DIRTY` per extent.
    DirtyBitmap(String),
    /// `understudy:order`: negotiates `CMD_ORDER`; block status reports one
    /// extent with flags 0.
    Order,
}

impl MetaContext {
    /// Full context name as sent on the wire.
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            MetaContext::BaseAllocation => Cow::Borrowed(BASE_ALLOCATION),
            MetaContext::DirtyBitmap(n) => Cow::Owned(format!("{QEMU_DIRTY_BITMAP_PREFIX}{n}")),
            MetaContext::Order => Cow::Borrowed(UNDERSTUDY_ORDER),
        }
    }
}

/// A context chosen by `SET_META_CONTEXT`, with the id used in
/// `BLOCK_STATUS` chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedContext {
    /// Server-chosen id (unique within one connection).
    pub id: u32,
    /// The context.
    pub context: MetaContext,
}

/// Whether the query is being listed or set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueryMode {
    List,
    Set,
}

/// A query string did not name a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NoNamespace;

/// Append to `out` every context in `available` that `query` matches, in
/// `available` order, skipping ones already in `out`.
pub(crate) fn match_query(
    query: &str,
    mode: QueryMode,
    available: &[MetaContext],
    out: &mut Vec<MetaContext>,
) -> Result<(), NoNamespace> {
    let Some((ns, leaf)) = query.split_once(':') else {
        return Err(NoNamespace);
    };
    if ns.is_empty() {
        return Err(NoNamespace);
    }
    let mut add = |c: &MetaContext| {
        if !out.contains(c) {
            out.push(c.clone());
        }
    };
    match (ns, leaf, mode) {
        ("base", "", QueryMode::List) => available
            .iter()
            .filter(|c| matches!(c, MetaContext::BaseAllocation))
            .for_each(&mut add),
        ("base", "allocation", _) => available
            .iter()
            .filter(|c| matches!(c, MetaContext::BaseAllocation))
            .for_each(&mut add),
        ("qemu", "" | "dirty-bitmap:", QueryMode::List) => available
            .iter()
            .filter(|c| matches!(c, MetaContext::DirtyBitmap(_)))
            .for_each(&mut add),
        ("qemu", leaf, _) => {
            if let Some(name) = leaf.strip_prefix("dirty-bitmap:")
                && !name.is_empty()
            {
                available
                    .iter()
                    .filter(|c| matches!(c, MetaContext::DirtyBitmap(n) if n == name))
                    .for_each(&mut add);
            }
        }
        ("understudy", "", QueryMode::List) | ("understudy", "order", _) => available
            .iter()
            .filter(|c| matches!(c, MetaContext::Order))
            .for_each(&mut add),
        // Unknown namespaces and SET wildcards select nothing.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avail() -> Vec<MetaContext> {
        vec![
            MetaContext::BaseAllocation,
            MetaContext::DirtyBitmap("b0".into()),
            MetaContext::DirtyBitmap("b1".into()),
            MetaContext::Order,
        ]
    }

    fn run(q: &str, mode: QueryMode) -> Result<Vec<String>, NoNamespace> {
        let mut out = Vec::new();
        match_query(q, mode, &avail(), &mut out)?;
        Ok(out.iter().map(|c| c.name().into_owned()).collect())
    }

    #[test]
    fn list_wildcards() {
        assert_eq!(run("base:", QueryMode::List).unwrap(), ["base:allocation"]);
        assert_eq!(
            run("qemu:", QueryMode::List).unwrap(),
            ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
        );
        assert_eq!(
            run("qemu:dirty-bitmap:", QueryMode::List).unwrap(),
            ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
        );
    }

    #[test]
    fn set_ignores_wildcards_and_unknowns() {
        assert!(run("base:", QueryMode::Set).unwrap().is_empty());
        assert!(run("qemu:", QueryMode::Set).unwrap().is_empty());
        assert!(
            run("qemu:dirty-bitmap:", QueryMode::Set)
                .unwrap()
                .is_empty()
        );
        assert!(run("base:nope", QueryMode::Set).unwrap().is_empty());
        assert!(run("x-foo:bar", QueryMode::Set).unwrap().is_empty());
        assert!(
            run("qemu:dirty-bitmap:zz", QueryMode::Set)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            run("qemu:dirty-bitmap:b1", QueryMode::Set).unwrap(),
            ["qemu:dirty-bitmap:b1"]
        );
        assert_eq!(
            run("base:allocation", QueryMode::Set).unwrap(),
            ["base:allocation"]
        );
    }

    #[test]
    fn order_context() {
        assert_eq!(
            run("understudy:", QueryMode::List).unwrap(),
            ["understudy:order"]
        );
        assert_eq!(
            run("understudy:order", QueryMode::List).unwrap(),
            ["understudy:order"]
        );
        assert_eq!(
            run("understudy:order", QueryMode::Set).unwrap(),
            ["understudy:order"]
        );
        assert!(run("understudy:", QueryMode::Set).unwrap().is_empty());
        assert!(run("understudy:orderx", QueryMode::Set).unwrap().is_empty());
        // Not offered (an export without a journal): never selected.
        let mut out = Vec::new();
        match_query(
            "understudy:order",
            QueryMode::Set,
            &[MetaContext::BaseAllocation],
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn missing_namespace_is_rejected() {
        assert_eq!(run("allocation", QueryMode::Set), Err(NoNamespace));
        assert_eq!(run(":x", QueryMode::List), Err(NoNamespace));
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut out = Vec::new();
        match_query("base:allocation", QueryMode::Set, &avail(), &mut out).unwrap();
        match_query("base:allocation", QueryMode::Set, &avail(), &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }
}
