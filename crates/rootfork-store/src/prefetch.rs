//! Fast cold starts: boot traces kept next to their build in the object store, and a parallel
//! background prefetch of a trace's chunks into the chunk cache.
//!
//! [`RemoteStore::prefetch`] returns at once with a [`PrefetchHandle`]; a task on the store's
//! runtime fetches the trace's chunks in trace order, at most
//! [`PrefetchOptions::concurrency`] at a time. Each chunk goes through the same single-flight
//! slot as demand reads ([`Fetcher::fill`](crate::fetch::Fetcher::fill)): a VM read of a chunk
//! being prefetched waits for that fetch, and a chunk already cached or being fetched is skipped.
//! The prefetch stops planning once its chunks would take more than
//! [`PrefetchOptions::max_bytes`] (half the cache budget by default), so it never evicts what it
//! fetched itself. Failures are counted, never raised: a read of a chunk whose prefetch failed
//! fetches it again (or fails with `EIO`, exactly as without prefetch).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use parking_lot::{Condvar, Mutex};
use rootfork_block::layered::{BuildId, BuildMap, MAP_FILE};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::error::{FetchError, StoreError};
use crate::fetch::{Ahead, Fill};
use crate::remote::{BackgroundTask, BuildInfo, Inner, RemoteStore};
use crate::trace::{BootTrace, BOOT_TRACE_FILE};

/// How a prefetch runs.
#[derive(Debug, Clone, Copy)]
pub struct PrefetchOptions {
    /// Chunk fetches in flight at once (at least 1; default 4).
    pub concurrency: usize,
    /// Most bytes of chunks to fetch; `None` (the default) means half the cache budget. Chunks
    /// past the limit are counted as `over_budget` and not fetched.
    pub max_bytes: Option<u64>,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            concurrency: 4,
            max_bytes: None,
        }
    }
}

/// What a prefetch did (so far, or in total once finished). Counted in the store's fetch
/// chunks (a trace recorded with another chunk size is mapped onto them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefetchReport {
    /// Chunks fetched into the cache.
    pub fetched: u64,
    /// Chunks already cached or being fetched by someone else.
    pub skipped: u64,
    /// Chunks whose fetch failed, or whose build's map could not be fetched.
    pub failed: u64,
    /// Chunks not fetched because they exceed the byte limit.
    pub over_budget: u64,
    /// Chunks not started because the prefetch was cancelled.
    pub cancelled: u64,
    /// Whether the prefetch has finished.
    pub finished: bool,
}

#[derive(Default)]
struct State {
    fetched: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    over_budget: AtomicU64,
    cancelled: AtomicU64,
    cancel: AtomicBool,
    done: Mutex<bool>,
    done_cv: Condvar,
    gate: Mutex<Option<Arc<Semaphore>>>,
}

impl State {
    fn report(&self) -> PrefetchReport {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PrefetchReport {
            fetched: g(&self.fetched),
            skipped: g(&self.skipped),
            failed: g(&self.failed),
            over_budget: g(&self.over_budget),
            cancelled: g(&self.cancelled),
            finished: *self.done.lock(),
        }
    }

    fn tally(&self, fill: Fill) {
        let c = match fill {
            Fill::Fetched => &self.fetched,
            Fill::Present => &self.skipped,
            Fill::Failed(_) => &self.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Marks the prefetch finished when its task ends, however it ends (also if the store's
/// runtime shuts down under it), so [`PrefetchHandle::wait`] never hangs.
struct Finish(Arc<State>);

impl Drop for Finish {
    fn drop(&mut self) {
        *self.0.done.lock() = true;
        self.0.done_cv.notify_all();
    }
}

/// A running prefetch. Dropping the handle lets the prefetch run to its end; [`cancel`]
/// stops it early.
///
/// [`cancel`]: PrefetchHandle::cancel
#[derive(Clone)]
pub struct PrefetchHandle {
    state: Arc<State>,
}

impl std::fmt::Debug for PrefetchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PrefetchHandle")
            .field(&self.state.report())
            .finish()
    }
}

impl PrefetchHandle {
    /// Stops starting new chunk fetches; those in flight complete (and stay cached).
    pub fn cancel(&self) {
        self.state.cancel.store(true, Ordering::Relaxed);
        if let Some(gate) = self.state.gate.lock().as_ref() {
            gate.close();
        }
    }

    /// The counts so far.
    pub fn report(&self) -> PrefetchReport {
        self.state.report()
    }

    /// Whether the prefetch has finished.
    pub fn is_finished(&self) -> bool {
        *self.state.done.lock()
    }

    /// Blocks until the prefetch has finished and returns its counts. Call it from a plain
    /// thread (or `spawn_blocking`), not from the store's runtime.
    pub fn wait(&self) -> PrefetchReport {
        let mut done = self.state.done.lock();
        while !*done {
            self.state.done_cv.wait(&mut done);
        }
        drop(done);
        self.state.report()
    }
}

impl RemoteStore {
    /// Starts fetching the chunks `trace` lists into the cache, in trace order, in the
    /// background, with the default [`PrefetchOptions`]. Returns at once; never fails (see
    /// [`PrefetchReport`] for what happened). Best started just before (or right after) the
    /// template is opened: builds the store has already opened need no map fetch.
    pub fn prefetch(&self, trace: &BootTrace) -> PrefetchHandle {
        self.prefetch_with(trace, PrefetchOptions::default())
    }

    /// [`prefetch`](Self::prefetch) with explicit options.
    pub fn prefetch_with(&self, trace: &BootTrace, opts: PrefetchOptions) -> PrefetchHandle {
        let state = Arc::new(State::default());
        let gate = Arc::new(Semaphore::new(opts.concurrency.max(1)));
        *state.gate.lock() = Some(gate.clone());
        let finish = Finish(state.clone());
        let task = BackgroundTask::new(&self.inner);
        let inner = self.inner.clone();
        let trace = trace.clone();
        let st = state.clone();
        self.bridge().handle().spawn(async move {
            let _finish = finish;
            let _task = task;
            run(inner, trace, opts, gate, st).await;
        });
        PrefetchHandle { state }
    }

    /// Stores `trace` as the boot trace of the template whose top build is `top`
    /// (`<prefix>/<top>/boot-trace`), replacing any previous one.
    pub fn put_boot_trace(&self, top: &BuildId, trace: &BootTrace) -> Result<(), StoreError> {
        let key = self.key(top, BOOT_TRACE_FILE);
        let store = self.object_store().clone();
        let payload = PutPayload::from(trace.encode());
        let path = ObjectPath::from(key.as_str());
        self.bridge()
            .run(async move { store.put(&path, payload).await })?
            .map_err(|source| StoreError::Request {
                context: format!("uploading {key}"),
                source,
            })?;
        Ok(())
    }

    /// The boot trace stored for `top`. A missing trace is
    /// `StoreError::Fetch(FetchError::NotFound)`, a damaged one `StoreError::Trace`; callers
    /// can ignore either and start without prefetch.
    pub fn boot_trace(&self, top: &BuildId) -> Result<BootTrace, StoreError> {
        let key = self.key(top, BOOT_TRACE_FILE);
        let bytes = self.inner.fetcher.fetch_object(&key)?;
        Ok(BootTrace::decode(&bytes)?)
    }
}

/// The fetch information of `build`: registered when the store opened it, else fetched.
async fn resolve(inner: &Arc<Inner>, build: BuildId, prefix_key: String) -> Option<Arc<BuildInfo>> {
    if let Some(info) = inner.builds.lock().get(&build) {
        return Some(info.clone());
    }
    let map_key = format!("{prefix_key}{MAP_FILE}");
    let bytes = match inner.fetcher.fetch_object_async(&map_key).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(%build, error = %e, "prefetch: map fetch failed");
            return None;
        }
    };
    let map = BuildMap::decode(&bytes, &build.to_string()).ok()?;
    if map.header.id != build {
        return None;
    }
    Some(inner.build_info(
        &map,
        format!("{prefix_key}{}", rootfork_block::layered::DATA_FILE),
    ))
}

/// The prefetch task.
async fn run(
    inner: Arc<Inner>,
    trace: BootTrace,
    opts: PrefetchOptions,
    gate: Arc<Semaphore>,
    state: Arc<State>,
) {
    // The builds, then the plan: the store's chunks covering each trace entry, in order, once.
    let mut infos: HashMap<BuildId, Option<Arc<BuildInfo>>> = HashMap::new();
    for c in &trace.chunks {
        if let std::collections::hash_map::Entry::Vacant(slot) = infos.entry(c.build) {
            let prefix_key = object_dir(&inner.prefix, &c.build);
            slot.insert(resolve(&inner, c.build, prefix_key).await);
        }
    }
    let mut plan = Vec::new();
    let mut seen = HashSet::new();
    for c in &trace.chunks {
        let Some(info) = infos.get(&c.build).cloned().flatten() else {
            state.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(first_byte) = c.index.checked_mul(c.chunk_size) else {
            state.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let last_byte = first_byte.saturating_add(c.chunk_size - 1);
        let (first, last) = (first_byte / info.chunk, last_byte / info.chunk);
        if first >= info.chunks() {
            state.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        for index in first..=last.min(info.chunks() - 1) {
            if seen.insert((info.id, index)) {
                plan.push((info.clone(), index));
            }
        }
    }
    let limit = opts.max_bytes.unwrap_or(inner.cache_budget / 2);
    let mut planned = 0u64;
    let mut running = JoinSet::new();
    for (n, (info, index)) in plan.iter().enumerate() {
        let (key, range) = info.chunk_at(*index);
        planned += range.end - range.start;
        if planned > limit {
            state
                .over_budget
                .fetch_add((plan.len() - n) as u64, Ordering::Relaxed);
            break;
        }
        let permit = match gate.clone().acquire_owned().await {
            Ok(p) if !state.cancel.load(Ordering::Relaxed) => p,
            _ => {
                state
                    .cancelled
                    .fetch_add((plan.len() - n) as u64, Ordering::Relaxed);
                break;
            }
        };
        let (inner, info) = (inner.clone(), info.clone());
        running.spawn(async move {
            let r = inner
                .fetcher
                .fill(key, &info.key, range, &info.verify, Ahead::Prefetch)
                .await;
            drop(permit);
            r
        });
        while let Some(done) = running.try_join_next() {
            state.tally(done.unwrap_or(Fill::Failed(FetchError::Shutdown)));
        }
    }
    while let Some(done) = running.join_next().await {
        state.tally(done.unwrap_or(Fill::Failed(FetchError::Shutdown)));
    }
}

/// `<prefix>/<build>/` (or `<build>/` without a prefix).
fn object_dir(prefix: &str, build: &BuildId) -> String {
    if prefix.is_empty() {
        format!("{build}/")
    } else {
        format!("{prefix}/{build}/")
    }
}
