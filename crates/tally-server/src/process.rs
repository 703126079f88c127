//! The standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_open_fds`, …), read from `/proc/self` at each scrape and written in the
//! Prometheus text format after the exporter's own output, as Prometheus's own clients
//! do. Elsewhere than Linux there are none.

use std::fmt::Write;

/// Clock ticks per second of `/proc/<pid>/stat`'s times: `USER_HZ`, 100 on every Linux
/// architecture tally builds for.
const TICKS_PER_SECOND: f64 = 100.0;

struct Process {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    start_time_seconds: f64,
    open_fds: f64,
    max_fds: Option<f64>,
    threads: f64,
}

/// Appends the process metrics to `out`; nothing if `/proc` cannot be read.
pub(crate) fn render(out: &mut String) {
    let Some(process) = read() else { return };
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    };
    metric("process_cpu_seconds_total", "counter", "User and system CPU time spent, seconds.", process.cpu_seconds);
    metric("process_resident_memory_bytes", "gauge", "Resident memory size, bytes.", process.resident_bytes);
    metric("process_virtual_memory_bytes", "gauge", "Virtual memory size, bytes.", process.virtual_bytes);
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch, seconds.",
        process.start_time_seconds,
    );
    metric("process_open_fds", "gauge", "Open file descriptors.", process.open_fds);
    if let Some(max_fds) = process.max_fds {
        metric("process_max_fds", "gauge", "The open file descriptor limit.", max_fds);
    }
    metric("process_threads", "gauge", "Operating system threads in the process.", process.threads);
}

fn read() -> Option<Process> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: fields after it
    // are counted from its closing parenthesis; this slice starts at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let (user, system, threads, start_ticks) = (field(14)?, field(15)?, field(20)?, field(22)?);
    let virtual_bytes = field(23)?;
    // In kB whatever the page size (stat's rss is in pages, which are not 4 KiB everywhere).
    let resident_kib = std::fs::read_to_string("/proc/self/status").ok()?.lines().find_map(|line| {
        line.strip_prefix("VmRSS:").and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
    })?;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ").and_then(|t| t.trim().parse::<f64>().ok()))?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    Some(Process {
        cpu_seconds: (user + system) / TICKS_PER_SECOND,
        resident_bytes: resident_kib * 1024.0,
        virtual_bytes,
        start_time_seconds: boot_time + start_ticks / TICKS_PER_SECOND,
        open_fds,
        max_fds: max_fds(),
        threads,
    })
}

/// The soft limit on open files, from `/proc/self/limits`.
fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_metrics_describe_this_process() {
        let mut out = String::new();
        super::render(&mut out);
        let value = |name: &str| -> f64 {
            let line = out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6, "{out}");
        assert!(value("process_open_fds") >= 3.0, "stdin, stdout, stderr at least: {out}");
        assert!(value("process_threads") >= 1.0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started <= now + 1.0 && started > now - 86_400.0, "started within the day: {started} vs {now}");
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter"));
    }
}
