//! Pool events (claimed, connected, disconnected, released, reclaimed) delivered to subscribers,
//! for the daemon's logs and metrics.

use std::sync::Arc;

use parking_lot::Mutex;

/// Something that happened to a slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PoolEvent {
    /// The slot was claimed for a sandbox.
    Claimed {
        /// Slot index.
        index: u32,
        /// The sandbox.
        sandbox: String,
    },
    /// The kernel connected the device.
    Connected {
        /// Slot index.
        index: u32,
    },
    /// The device was disconnected and found quiescent.
    Disconnected {
        /// Slot index.
        index: u32,
    },
    /// The claim was given up.
    Released {
        /// Slot index.
        index: u32,
    },
    /// A device or claim left behind by a dead rootfork process was cleaned up.
    Reclaimed {
        /// Slot index.
        index: u32,
        /// Its backend identifier, if the device was still connected.
        backend: Option<String>,
    },
}

/// A subscriber callback. It runs on the thread that caused the event and must not block.
pub type EventSink = Arc<dyn Fn(&PoolEvent) + Send + Sync>;

/// The subscriber list.
#[derive(Default)]
pub(crate) struct Events {
    sinks: Mutex<Vec<EventSink>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("sinks", &self.sinks.lock().len())
            .finish()
    }
}

impl Events {
    pub(crate) fn subscribe(&self, sink: EventSink) {
        self.sinks.lock().push(sink);
    }

    pub(crate) fn emit(&self, ev: PoolEvent) {
        tracing::debug!(?ev, "nbd pool event");
        let sinks = self.sinks.lock().clone();
        for s in sinks {
            s(&ev);
        }
    }
}
