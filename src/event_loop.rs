//! Plumbing the mio-driven modules share: tokens that say which component
//! and which connection an event is for, and a timer heap, so the exporter,
//! importers, discovery and services can run in one `mio::Poll` (dipusd) or
//! each in its own (the single applets).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use mio::Token;

/// The component an event belongs to: the top byte of the token.
pub const fn token(component: u8, id: usize) -> Token {
    Token(((component as usize) << 56) | (id & ((1 << 56) - 1)))
}

pub const fn component(token: Token) -> u8 {
    (token.0 >> 56) as u8
}

pub const fn id(token: Token) -> usize {
    token.0 & ((1 << 56) - 1)
}

/// Deadlines by key; stale entries (re-armed or cancelled) are the
/// caller's to recognise when they fire.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Timers {
    pub fn at(&mut self, when: Instant, key: usize) {
        self.heap.push(Reverse((when, key)));
    }

    pub fn after(&mut self, delay: Duration, key: usize) {
        self.at(Instant::now() + delay, key);
    }

    /// How long a poll may sleep before the next deadline.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.heap.peek().map(|Reverse((when, _))| when.saturating_duration_since(now))
    }

    /// Entries for `key` not yet expired.
    #[cfg(test)]
    pub fn pending(&self, key: usize) -> usize {
        self.heap.iter().filter(|Reverse((_, k))| *k == key).count()
    }

    /// Keys whose deadline has passed.
    pub fn expired(&mut self, now: Instant) -> Vec<usize> {
        let mut keys = Vec::new();
        while let Some(Reverse((when, key))) = self.heap.peek().copied() {
            if when > now {
                break;
            }
            self.heap.pop();
            keys.push(key);
        }
        keys
    }
}

/// The smaller of two optional timeouts.
pub fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// One `poll`: waits for events or `timeout`. An interrupting signal is
/// not an error (its byte is in the signal pipe): the caller just goes
/// round its loop again and finds no events.
pub fn wait(poll: &mut mio::Poll, events: &mut mio::Events, timeout: Option<Duration>) -> std::io::Result<()> {
    match poll.poll(events, timeout) {
        Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        result => result,
    }
}

/// Registers `output`, where a client prints its lines, under `token`,
/// so that its reader going away wakes the loop even while there is
/// nothing to print ([`output_gone`] says so). False where the descriptor
/// cannot be polled (a regular file, /dev/null): such an output never goes
/// away.
pub fn register_output(registry: &mio::Registry, output: std::os::fd::RawFd, token: Token) -> bool {
    registry.register(&mut mio::unix::SourceFd(&output), token, mio::Interest::WRITABLE).is_ok()
}

/// Whether an event on an output registered by [`register_output`] says
/// its reader has gone (`| head -1` exited).
pub fn output_gone(event: &mio::event::Event) -> bool {
    event.is_error() || event.is_write_closed()
}

/// What an event says a descriptor can do. Hang-ups and errors count as
/// both: the next read or write reports them.
/// Whether the peer has closed its sending side (or the descriptor broke):
/// what [`crate::relay::Relay::set_read_closed`] wants to know.
pub fn read_closed(event: &mio::event::Event) -> bool {
    event.is_read_closed() || event.is_error()
}

pub fn readiness(event: &mio::event::Event) -> (bool, bool) {
    let broken = event.is_error();
    (event.is_readable() || event.is_read_closed() || broken, event.is_writable() || event.is_write_closed() || broken)
}
