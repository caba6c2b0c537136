//! The agent's tables: containers by id, and within each container its processes
//! (the init, exec id `""`, and the exec'd ones) with their stdio ends, stream
//! attachments and exit statuses.
//!
//! [`Table`] is a plain id-keyed map with id reservation (so that a slow create
//! cannot race a second create of the same id). [`ProcEntry`] is everything the
//! RPCs and the stream listener share about one process.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use bulkhead_protocol::stream::{StreamAck, StreamKind};
use tokio::sync::{watch, Notify};

use crate::exit::ExitStatus;
use crate::process::Process;

/// Why a table operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The id is in use (or being created).
    #[error("{0} already exists")]
    AlreadyExists(String),
}

/// Entries by id, with reservations for entries being made.
#[derive(Debug)]
pub struct Table<T> {
    inner: Mutex<TableInner<T>>,
}

#[derive(Debug)]
struct TableInner<T> {
    entries: HashMap<String, Arc<T>>,
    reserved: HashSet<String>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            inner: Mutex::new(TableInner {
                entries: HashMap::new(),
                reserved: HashSet::new(),
            }),
        }
    }
}

/// Holds an id reserved in a [`Table`] until it is filled or dropped.
#[must_use = "a reservation is released when dropped"]
pub struct Reservation<'a, T> {
    table: &'a Table<T>,
    id: Option<String>,
}

impl<T> Reservation<'_, T> {
    /// Puts `value` under the reserved id and returns it.
    pub fn fill(mut self, value: Arc<T>) -> Arc<T> {
        if let Some(id) = self.id.take() {
            let mut inner = self.table.lock();
            inner.reserved.remove(&id);
            inner.entries.insert(id, Arc::clone(&value));
        }
        value
    }
}

impl<T> Drop for Reservation<'_, T> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.table.lock().reserved.remove(&id);
        }
    }
}

impl<T> Table<T> {
    /// Reserves `id` for an entry about to be made.
    pub fn reserve(&self, id: &str) -> Result<Reservation<'_, T>, TableError> {
        let mut inner = self.lock();
        if inner.entries.contains_key(id) || inner.reserved.contains(id) {
            return Err(TableError::AlreadyExists(id.to_string()));
        }
        inner.reserved.insert(id.to_string());
        Ok(Reservation {
            table: self,
            id: Some(id.to_string()),
        })
    }

    /// The entry with this id.
    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        self.lock().entries.get(id).cloned()
    }

    /// Removes and returns the entry with this id.
    pub fn remove(&self, id: &str) -> Option<Arc<T>> {
        self.lock().entries.remove(id)
    }

    /// Every entry.
    pub fn all(&self) -> Vec<Arc<T>> {
        self.lock().entries.values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, TableInner<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A set of stream kinds (one bit per [`StreamKind`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamSet(u8);

impl StreamSet {
    fn bit(kind: StreamKind) -> u8 {
        match kind {
            StreamKind::Stdin => 1,
            StreamKind::Stdout => 2,
            StreamKind::Stderr => 4,
            StreamKind::Tty => 8,
        }
    }

    /// The streams the host attaches for a process created with these stdio
    /// flags: with a terminal, one `Tty` stream when stdin or stdout is set;
    /// without, one stream per flag.
    pub fn requested(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> Self {
        let mut set = StreamSet::default();
        if terminal {
            if stdin || stdout {
                set.insert(StreamKind::Tty);
            }
        } else {
            for (on, kind) in [
                (stdin, StreamKind::Stdin),
                (stdout, StreamKind::Stdout),
                (stderr, StreamKind::Stderr),
            ] {
                if on {
                    set.insert(kind);
                }
            }
        }
        set
    }

    /// Adds `kind`.
    pub fn insert(&mut self, kind: StreamKind) {
        self.0 |= Self::bit(kind);
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: StreamKind) -> bool {
        self.0 & Self::bit(kind) != 0
    }

    /// Whether every stream of `other` is in this set.
    pub fn contains_all(self, other: StreamSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The kinds in `self` but not in `other`, for messages.
    pub fn missing_from(self, other: StreamSet) -> Vec<StreamKind> {
        [
            StreamKind::Stdin,
            StreamKind::Stdout,
            StreamKind::Stderr,
            StreamKind::Tty,
        ]
        .into_iter()
        .filter(|k| self.contains(*k) && !other.contains(*k))
        .collect()
    }
}

/// The agent's ends of a process's stdio pipes, until a stream takes them.
#[derive(Debug, Default)]
pub struct HostEnds {
    /// Write end of the process's stdin pipe.
    pub stdin: Option<OwnedFd>,
    /// Read end of the process's stdout pipe.
    pub stdout: Option<OwnedFd>,
    /// Read end of the process's stderr pipe.
    pub stderr: Option<OwnedFd>,
}

/// What a stream connection gets when it attaches.
#[derive(Debug)]
pub enum Attached {
    /// A pipe end (stdin: write end; stdout/stderr: read end).
    Pipe(OwnedFd),
    /// The terminal: the pty master arrives once the process exists (an exec's
    /// streams attach before it is made); `None` if it never will.
    Tty,
}

/// The pty master of a process: not yet known, known, or never coming.
#[derive(Debug, Clone)]
pub enum TtyState {
    /// The process is being made.
    Pending,
    /// The master.
    Ready(Arc<OwnedFd>),
    /// The process has no pty (its creation failed).
    Gone,
}

/// How a process ended, and when the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The status.
    pub status: ExitStatus,
    /// When the agent reaped it.
    pub at: SystemTime,
}

/// One process of a container, as the RPCs and the stream listener see it.
#[derive(Debug)]
pub struct ProcEntry {
    requested: StreamSet,
    state: Mutex<(StreamSet, HostEnds)>,
    attached: watch::Sender<StreamSet>,
    tty: watch::Sender<TtyState>,
    process: OnceLock<Arc<Process>>,
    exit: watch::Sender<Option<ExitInfo>>,
    stdin_closed: Notify,
}

impl ProcEntry {
    /// An entry for a process with these requested streams and pipe ends. The
    /// process itself comes later ([`ProcEntry::set_process`]).
    pub fn new(requested: StreamSet, ends: HostEnds) -> Self {
        ProcEntry {
            requested,
            state: Mutex::new((StreamSet::default(), ends)),
            attached: watch::channel(StreamSet::default()).0,
            tty: watch::channel(TtyState::Pending).0,
            process: OnceLock::new(),
            exit: watch::channel(None).0,
            stdin_closed: Notify::new(),
        }
    }

    /// The streams the host said it would attach.
    pub fn requested(&self) -> StreamSet {
        self.requested
    }

    /// Attaches stream `kind`: the ack to send, and on success what to wire.
    pub fn attach(&self, kind: StreamKind) -> Result<Attached, StreamAck> {
        if !self.requested.contains(kind) {
            return Err(StreamAck::NotRequested);
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (attached, ends) = &mut *state;
        if attached.contains(kind) {
            return Err(StreamAck::AlreadyAttached);
        }
        let got = match kind {
            StreamKind::Tty => Attached::Tty,
            StreamKind::Stdin => Attached::Pipe(ends.stdin.take().ok_or(StreamAck::NotRequested)?),
            StreamKind::Stdout => {
                Attached::Pipe(ends.stdout.take().ok_or(StreamAck::NotRequested)?)
            }
            StreamKind::Stderr => {
                Attached::Pipe(ends.stderr.take().ok_or(StreamAck::NotRequested)?)
            }
        };
        attached.insert(kind);
        let now = *attached;
        drop(state);
        self.attached.send_replace(now);
        Ok(got)
    }

    /// Waits until every requested stream is attached.
    pub async fn all_attached(&self) {
        let want = self.requested;
        let mut rx = self.attached.subscribe();
        let _ = rx.wait_for(|s| s.contains_all(want)).await;
    }

    /// The requested streams not attached yet.
    pub fn missing_streams(&self) -> Vec<StreamKind> {
        self.requested.missing_from(*self.attached.borrow())
    }

    /// Closes the process's stdin: drops the pipe end if no stream took it yet,
    /// and tells the stdin stream (if any) to stop and close it.
    pub fn close_stdin(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1.stdin = None;
        drop(state);
        self.stdin_closed.notify_one();
    }

    /// Resolves when [`ProcEntry::close_stdin`] was called.
    pub async fn stdin_closed(&self) {
        self.stdin_closed.notified().await
    }

    /// Publishes the pty master (or that there is none).
    pub fn set_tty(&self, state: TtyState) {
        self.tty.send_replace(state);
    }

    /// The pty master once known; `None` if there will be none.
    pub async fn tty(&self) -> Option<Arc<OwnedFd>> {
        let mut rx = self.tty.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, TtyState::Pending))
            .await
            .ok()?
            .clone();
        match state {
            TtyState::Ready(fd) => Some(fd),
            _ => None,
        }
    }

    /// The pty master if it is known now.
    pub fn tty_now(&self) -> Option<Arc<OwnedFd>> {
        match &*self.tty.borrow() {
            TtyState::Ready(fd) => Some(Arc::clone(fd)),
            _ => None,
        }
    }

    /// Records the process once it exists. Returns false if one was set already.
    pub fn set_process(&self, process: Arc<Process>) -> bool {
        self.process.set(process).is_ok()
    }

    /// The process, once it exists.
    pub fn process(&self) -> Option<&Arc<Process>> {
        self.process.get()
    }

    /// Records how the process ended (once; later calls are ignored).
    pub fn set_exit(&self, info: ExitInfo) {
        self.exit.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(info);
                true
            } else {
                false
            }
        });
    }

    /// How the process ended, if it has.
    pub fn exit_now(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits until the process has ended.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            // The sender lives in self, so this only fails if self is gone,
            // which the borrow of self rules out.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn table_reserves_and_refuses_duplicates() {
        let t: Table<u32> = Table::default();
        let r = t.reserve("a").unwrap();
        assert_eq!(
            t.reserve("a").err(),
            Some(TableError::AlreadyExists("a".into()))
        );
        assert!(t.get("a").is_none());
        r.fill(Arc::new(1));
        assert_eq!(*t.get("a").unwrap(), 1);
        assert!(t.reserve("a").is_err());
        // A dropped reservation frees the id.
        drop(t.reserve("b").unwrap());
        assert!(t.reserve("b").is_ok());
        assert_eq!(t.all().len(), 1);
        assert_eq!(*t.remove("a").unwrap(), 1);
        assert!(t.get("a").is_none());
        assert!(t.remove("a").is_none());
    }

    #[test]
    fn requested_streams() {
        let s = StreamSet::requested(true, true, true, false);
        assert!(s.contains(StreamKind::Stdin) && s.contains(StreamKind::Stderr));
        assert!(!s.contains(StreamKind::Tty));
        let t = StreamSet::requested(false, true, false, true);
        assert!(t.contains(StreamKind::Tty) && !t.contains(StreamKind::Stdout));
        assert!(StreamSet::requested(false, false, false, true).is_empty());
        assert!(StreamSet::requested(false, false, false, false).is_empty());
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
    }

    #[tokio::test]
    async fn attach_once_and_only_what_was_requested() {
        let (r, _w) = pipe();
        let entry = ProcEntry::new(
            StreamSet::requested(false, true, false, false),
            HostEnds {
                stdout: Some(r),
                ..Default::default()
            },
        );
        assert_eq!(entry.missing_streams(), vec![StreamKind::Stdout]);
        assert_eq!(
            entry.attach(StreamKind::Stderr).err(),
            Some(StreamAck::NotRequested)
        );
        let waiter = tokio::time::timeout(Duration::from_millis(50), entry.all_attached());
        assert!(waiter.await.is_err(), "nothing attached yet");
        assert!(matches!(
            entry.attach(StreamKind::Stdout),
            Ok(Attached::Pipe(_))
        ));
        assert_eq!(
            entry.attach(StreamKind::Stdout).err(),
            Some(StreamAck::AlreadyAttached)
        );
        entry.all_attached().await;
        assert!(entry.missing_streams().is_empty());
    }

    #[tokio::test]
    async fn exit_is_kept_for_every_waiter() {
        let entry = Arc::new(ProcEntry::new(StreamSet::default(), HostEnds::default()));
        let e = Arc::clone(&entry);
        let first = tokio::spawn(async move { e.wait().await });
        let info = ExitInfo {
            status: ExitStatus::Exited(7),
            at: SystemTime::now(),
        };
        entry.set_exit(info);
        entry.set_exit(ExitInfo {
            status: ExitStatus::Exited(1),
            at: SystemTime::now(),
        });
        assert_eq!(first.await.unwrap(), info);
        assert_eq!(entry.wait().await, info);
        assert_eq!(entry.exit_now(), Some(info));
    }

    #[tokio::test]
    async fn tty_state() {
        let entry = Arc::new(ProcEntry::new(
            StreamSet::requested(true, true, false, true),
            HostEnds::default(),
        ));
        assert!(matches!(entry.attach(StreamKind::Tty), Ok(Attached::Tty)));
        assert!(entry.tty_now().is_none());
        let e = Arc::clone(&entry);
        let waiter = tokio::spawn(async move { e.tty().await.is_some() });
        let (r, _w) = pipe();
        entry.set_tty(TtyState::Ready(Arc::new(r)));
        assert!(waiter.await.unwrap());
        let gone = ProcEntry::new(StreamSet::default(), HostEnds::default());
        gone.set_tty(TtyState::Gone);
        assert!(gone.tty().await.is_none());
    }
}
