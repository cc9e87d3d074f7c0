//! The event feed: one broadcast channel every `WatchEvents` stream subscribes to. Events carry a
//! sequence number and a timestamp; the kernel pool's events are forwarded into the same feed.
//! They are the daemon's own [`Event`]s; the gRPC edge turns each into a wire message as it
//! streams it.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;

use crate::daemon::model::{Health, SandboxState};

/// How many events a slow subscriber may fall behind before it misses some.
const CAPACITY: usize = 4096;

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventKind {
    /// A device was taken for a sandbox (kernel slot claimed / socket export created).
    Claimed,
    /// The device is connected and serving.
    Connected,
    /// The device was disconnected.
    Disconnected,
    /// The device was given back.
    Released,
    /// A device or claim left by a dead rootfork process was cleaned up.
    Reclaimed,
    /// A sandbox's health changed.
    Health,
    /// A sandbox changed state.
    Sandbox,
    /// A template was imported or deleted.
    Template,
    /// Something failed.
    #[default]
    Error,
}

/// One event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// Position in the feed (from 1; 0 for events built outside it).
    pub seq: u64,
    /// When it was published.
    pub unix_ms: i64,
    /// What it is about.
    pub kind: EventKind,
    /// The sandbox it concerns (empty: none).
    pub sandbox: String,
    /// The template it concerns (empty: none).
    pub template: String,
    /// The kernel slot it concerns.
    pub device_index: Option<u32>,
    /// The sandbox's new state.
    pub state: Option<SandboxState>,
    /// The sandbox's health.
    pub health: Option<Health>,
    /// A human-readable message.
    pub message: String,
}

/// The daemon's event feed.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    seq: AtomicU64,
    /// Kernel slot → the sandbox that claimed it, so that the pool's later events about the slot
    /// (which carry only its index) name the sandbox too.
    slots: parking_lot::Mutex<std::collections::HashMap<u32, String>>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(CAPACITY).0,
            seq: AtomicU64::new(0),
            slots: Default::default(),
        }
    }
}

/// An event being built.
#[derive(Debug, Default)]
pub struct EventBuilder {
    ev: Event,
}

impl EventBuilder {
    /// A sandbox's event.
    pub fn sandbox(mut self, id: &str) -> Self {
        self.ev.sandbox = id.to_owned();
        self
    }
    /// A template's event.
    pub fn template(mut self, name: &str) -> Self {
        self.ev.template = name.to_owned();
        self
    }
    /// About a kernel slot.
    pub fn device(mut self, index: u32) -> Self {
        self.ev.device_index = Some(index);
        self
    }
    /// The sandbox's new state.
    pub fn state(mut self, s: SandboxState) -> Self {
        self.ev.state = Some(s);
        self
    }
    /// The sandbox's health.
    pub fn health(mut self, h: Health) -> Self {
        self.ev.health = Some(h);
        self
    }
    /// The event as is (no sequence number; stamped now), for messages outside the feed.
    pub fn build(mut self) -> Event {
        self.ev.unix_ms = now_unix_ms();
        self.ev
    }
    /// A human-readable message.
    pub fn message(mut self, m: impl Into<String>) -> Self {
        self.ev.message = m.into();
        self
    }
}

impl EventBus {
    /// Starts an event of `kind`.
    pub fn event(kind: EventKind) -> EventBuilder {
        EventBuilder {
            ev: Event {
                kind,
                ..Event::default()
            },
        }
    }

    /// Publishes an event (never blocks; without subscribers it is dropped).
    pub fn emit(&self, b: EventBuilder) {
        let mut ev = b.ev;
        ev.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        ev.unix_ms = now_unix_ms();
        tracing::debug!(kind = ?ev.kind, sandbox = %ev.sandbox, message = %ev.message, "event");
        let _ = self.tx.send(ev);
    }

    /// A new subscription to every future event.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Forwards a kernel pool event.
    pub fn emit_pool(&self, e: &rootfork_kernel::PoolEvent) {
        use rootfork_kernel::PoolEvent as P;
        let owner = |index: &u32, forget: bool| {
            let mut slots = self.slots.lock();
            let s = if forget {
                slots.remove(index)
            } else {
                slots.get(index).cloned()
            };
            s.unwrap_or_default()
        };
        let b = match e {
            P::Claimed { index, sandbox } => {
                self.slots.lock().insert(*index, sandbox.clone());
                Self::event(EventKind::Claimed)
                    .device(*index)
                    .sandbox(sandbox)
            }
            P::Connected { index } => Self::event(EventKind::Connected)
                .device(*index)
                .sandbox(&owner(index, false)),
            P::Disconnected { index } => Self::event(EventKind::Disconnected)
                .device(*index)
                .sandbox(&owner(index, false)),
            P::Released { index } => Self::event(EventKind::Released)
                .device(*index)
                .sandbox(&owner(index, true)),
            P::Reclaimed { index, backend } => Self::event(EventKind::Reclaimed)
                .device(*index)
                .message(backend.clone().unwrap_or_default()),
        };
        self.emit(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rootfork_kernel::PoolEvent as P;

    #[test]
    fn pool_events_name_the_sandbox_of_their_slot() {
        let bus = EventBus::default();
        let mut rx = bus.subscribe();
        bus.emit_pool(&P::Claimed {
            index: 3,
            sandbox: "a".into(),
        });
        bus.emit_pool(&P::Connected { index: 3 });
        bus.emit_pool(&P::Disconnected { index: 3 });
        bus.emit_pool(&P::Released { index: 3 });
        bus.emit_pool(&P::Connected { index: 3 });
        let got: Vec<(EventKind, String, Option<u32>, u64)> = (0..5)
            .map(|_| rx.try_recv().unwrap())
            .map(|e| (e.kind, e.sandbox, e.device_index, e.seq))
            .collect();
        let k = |k: EventKind| k;
        assert_eq!(
            got,
            vec![
                (k(EventKind::Claimed), "a".into(), Some(3), 1),
                (k(EventKind::Connected), "a".into(), Some(3), 2),
                (k(EventKind::Disconnected), "a".into(), Some(3), 3),
                (k(EventKind::Released), "a".into(), Some(3), 4),
                // After the release the slot belongs to nobody.
                (k(EventKind::Connected), String::new(), Some(3), 5),
            ]
        );
    }
}
