//! Chats per minute over the last hour (the dashboard's chart): 60 atomic slots, one per minute
//! of the hour, each holding which minute it counts and how many chats it saw. Recording is one
//! compare-and-swap; nothing grows with time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Minutes kept.
pub const MINUTES: usize = 60;
/// Low bits of a slot hold the count, high bits the minute (since the Unix epoch).
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

#[derive(Debug)]
pub struct ChatsPerMinute {
    slots: [AtomicU64; MINUTES],
}

impl Default for ChatsPerMinute {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl ChatsPerMinute {
    /// One chat answered in `minute` (minutes since the Unix epoch).
    pub fn record(&self, minute: u64) {
        let slot = &self.slots[(minute % MINUTES as u64) as usize];
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
            Some(if packed >> COUNT_BITS == minute {
                // Saturates at 16.7 M chats a minute rather than spilling into the minute.
                packed + u64::from(packed & COUNT_MASK < COUNT_MASK)
            } else {
                (minute << COUNT_BITS) | 1
            })
        });
    }

    /// The 60 minutes up to and including `now` (oldest first): (minute, chats).
    pub fn last_hour(&self, now: u64) -> Vec<(u64, u64)> {
        (0..MINUTES as u64)
            .rev()
            .filter_map(|back| now.checked_sub(back))
            .map(|minute| {
                let packed = self.slots[(minute % MINUTES as u64) as usize].load(Ordering::Relaxed);
                let chats = if packed >> COUNT_BITS == minute {
                    packed & COUNT_MASK
                } else {
                    0
                };
                (minute, chats)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_minute_and_forgets_after_an_hour() {
        let a = ChatsPerMinute::default();
        let t = 29_000_000;
        a.record(t);
        a.record(t);
        a.record(t + 1);
        let hour = a.last_hour(t + 1);
        assert_eq!(hour.len(), 60);
        assert_eq!(hour[58], (t, 2));
        assert_eq!(hour[59], (t + 1, 1));
        assert_eq!(hour.iter().map(|(_, c)| c).sum::<u64>(), 3);
        // An hour later minute t's slot counts minute t + 60; t + 1 is still within the hour.
        a.record(t + 60);
        let later = a.last_hour(t + 60);
        assert_eq!(later[0], (t + 1, 1));
        assert_eq!(later[59], (t + 60, 1));
        assert_eq!(later.iter().map(|(_, c)| c).sum::<u64>(), 2);
        // Two hours on, nothing recorded is within the hour.
        assert_eq!(a.last_hour(t + 200).iter().map(|(_, c)| c).sum::<u64>(), 0);
    }
}
