//! Waiting for OOM kills: the kernel raises a "file modified" event on a cgroup's
//! `memory.events` whenever a counter in it changes, so a blocked inotify read
//! notices an OOM kill at once, without polling.

use std::io;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::os::fd::AsFd;

use crate::cgroup::Cgroup;

/// Blocks until `memory.events`' `oom_kill` counter of `cgroup` is above `seen`,
/// and returns it; returns the unchanged count when `timeout` passes first.
pub fn wait_for_oom_kill(cgroup: &Cgroup, seen: u64, timeout: Duration) -> io::Result<u64> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
    inotify.add_watch(
        &cgroup.dir().join("memory.events"),
        AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DELETE_SELF,
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        // Read after arming the watch, so that no change is missed in between.
        let count = cgroup.memory_events()?.oom_kill;
        if count > seen {
            return Ok(count);
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Ok(count);
        };
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(err) => return Err(err.into()),
        }
        // Drain the events; their content does not matter, the counter does.
        while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
    }
}
