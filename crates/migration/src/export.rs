//! The migration's view of an opened export stack.

use understudy_bitmap::Persister;
use understudy_stack::ExportStack;

use crate::source::SourceExport;

impl SourceExport {
    /// The layers the migration reaches (switch, filter, store, journal)
    /// of a stack opened by [`ExportStack::open`], and its persister (to
    /// keep running while the export is served).
    pub fn from_stack(stack: ExportStack) -> (Self, Persister) {
        let ExportStack {
            name,
            image,
            format,
            block: _,
            journal,
            store,
            filter,
            switch,
            persister,
        } = stack;
        let export = SourceExport {
            name,
            image,
            format,
            switch,
            filter,
            store,
            journal,
        };
        (export, persister)
    }
}
