//! [`JournalConfig`]: what an [`EpochDisk`](super::EpochDisk) is opened with.

use super::policy::FlushPolicy;
use crate::error::JournalError;
use crate::format::{MAX_CAPACITY, MIN_CAPACITY, REC_ALIGN};

/// Configuration of an [`EpochDisk`].
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// Bytes of the record ring (a multiple of 512, 64 KiB ..= 64 GiB). It
    /// also bounds the memory of the read overlay. Default: 128 MiB.
    pub capacity: u64,
    /// Flush policy. Default: [`FlushPolicy::Durable`].
    pub policy: FlushPolicy,
    /// Semantic journaling: data writes of at least this many bytes may go
    /// to the image in place when ordering allows. `None` journals every
    /// write (strict prefix consistency). Default: `None`.
    pub in_place_min: Option<u64>,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            capacity: 128 << 20,
            policy: FlushPolicy::Durable,
            in_place_min: None,
        }
    }
}

impl JournalConfig {
    /// Check the values; the error says which value to use instead.
    pub fn sanitize(&self) -> Result<(), JournalError> {
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&self.capacity)
            || !self.capacity.is_multiple_of(REC_ALIGN)
        {
            return Err(JournalError::Config {
                reason: format!(
                    "capacity {} must be a multiple of 512 between {MIN_CAPACITY} and {MAX_CAPACITY}",
                    self.capacity
                ),
            });
        }
        if let FlushPolicy::Ordered { interval } = self.policy
            && interval.is_zero()
        {
            return Err(JournalError::Config {
                reason: "the ordered flush interval must be positive (default 5 s)".into(),
            });
        }
        if self.in_place_min == Some(0) {
            return Err(JournalError::Config {
                reason: "in_place_min must be positive (e.g. 65536) or unset".into(),
            });
        }
        Ok(())
    }
}
