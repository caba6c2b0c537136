//! The agent's cgroup v2 statistics in containerd's types (`ctr task metrics`,
//! the kubelet's container stats through CRI).

use bulkhead_protocol::agent::StatsContainerResponse;
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;

/// The type URL containerd registers for cgroup v2 metrics.
pub const CGROUPS_V2_METRICS_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Converts the agent's statistics. "No limit" reads as `u64::MAX` for memory
/// and 0 for pids, as containerd's own cgroup v2 reader reports them.
pub fn to_metrics(stats: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        let mut c = CPUStat::new();
        c.usage_usec = cpu.usage_usec;
        c.user_usec = cpu.user_usec;
        c.system_usec = cpu.system_usec;
        c.nr_periods = cpu.nr_periods;
        c.nr_throttled = cpu.nr_throttled;
        c.throttled_usec = cpu.throttled_usec;
        m.cpu = Some(c).into();
    }
    if let Some(mem) = stats.memory.as_ref() {
        let mut s = MemoryStat::new();
        s.usage = mem.current;
        s.usage_limit = mem.max.unwrap_or(u64::MAX);
        s.anon = mem.anon;
        s.file = mem.file;
        s.kernel_stack = 0;
        s.slab = mem.kernel;
        m.memory = Some(s).into();
        let mut e = MemoryEvents::new();
        e.oom = mem.oom;
        e.oom_kill = mem.oom_kill;
        m.memory_events = Some(e).into();
    }
    if let Some(pids) = stats.pids.as_ref() {
        let mut p = PidsStat::new();
        p.current = pids.current;
        p.limit = pids.max.unwrap_or(0);
        m.pids = Some(p).into();
    }
    if let Some(io) = stats.io.as_ref() {
        let mut s = IOStat::new();
        s.usage = io
            .devices
            .iter()
            .map(|d| {
                let mut e = IOEntry::new();
                e.major = u64::from(d.major);
                e.minor = u64::from(d.minor);
                e.rbytes = d.rbytes;
                e.wbytes = d.wbytes;
                e.rios = d.rios;
                e.wios = d.wios;
                e
            })
            .collect();
        m.io = Some(s).into();
    }
    m
}

/// [`to_metrics`] packed the way the Task service's Stats reply carries it.
pub fn to_any(stats: &StatsContainerResponse) -> Result<Any, String> {
    let value = to_metrics(stats)
        .write_to_bytes()
        .map_err(|e| format!("encoding metrics: {e}"))?;
    let mut any = Any::new();
    any.type_url = CGROUPS_V2_METRICS_URL.to_owned();
    any.value = value;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::agent::{CpuStats, IoDeviceStats, IoStats, MemoryStats, PidsStats};

    #[test]
    fn every_counter_lands_in_its_field() {
        let mut stats = StatsContainerResponse::new();
        let mut cpu = CpuStats::new();
        cpu.usage_usec = 10;
        cpu.user_usec = 6;
        cpu.system_usec = 4;
        stats.cpu = Some(cpu).into();
        let mut mem = MemoryStats::new();
        mem.current = 4096;
        mem.anon = 1024;
        mem.oom_kill = 2;
        stats.memory = Some(mem).into();
        let mut pids = PidsStats::new();
        pids.current = 3;
        pids.max = Some(100);
        stats.pids = Some(pids).into();
        let mut io = IoStats::new();
        let mut dev = IoDeviceStats::new();
        dev.major = 254;
        dev.rbytes = 512;
        io.devices.push(dev);
        stats.io = Some(io).into();

        let m = to_metrics(&stats);
        assert_eq!(m.cpu.usage_usec, 10);
        assert_eq!(m.cpu.user_usec, 6);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, u64::MAX, "no limit reads as max");
        assert_eq!(m.memory.anon, 1024);
        assert_eq!(m.memory_events.oom_kill, 2);
        assert_eq!((m.pids.current, m.pids.limit), (3, 100));
        assert_eq!(m.io.usage[0].major, 254);
        assert_eq!(m.io.usage[0].rbytes, 512);

        let any = to_any(&stats).unwrap();
        assert_eq!(any.type_url, CGROUPS_V2_METRICS_URL);
        assert_eq!(Metrics::parse_from_bytes(&any.value).unwrap(), m);
    }
}
