//! Host CPU time (user + system) from `getrusage`, for measuring what a
//! whole VM costs the host: every thread of this process, ended ones
//! included, or every child process already waited for (e.g. QEMU).

use std::ops::Sub;
use std::time::Duration;

/// CPU time consumed, split as the kernel accounts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct CpuTime {
    /// Time running in user mode.
    pub user: Duration,
    /// Time running in the kernel (for a VMM this includes `KVM_RUN`).
    pub system: Duration,
}

impl CpuTime {
    /// User plus system time.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

impl Sub for CpuTime {
    type Output = CpuTime;

    /// The time spent between two readings; never negative.
    fn sub(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

fn usage(who: libc::c_int) -> std::io::Result<CpuTime> {
    // SAFETY: rusage is plain integers, so all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the call to fill.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(CpuTime {
        user: time(ru.ru_utime),
        system: time(ru.ru_stime),
    })
}

/// CPU time of this whole process so far: all its threads, running or ended.
pub fn this_process() -> std::io::Result<CpuTime> {
    usage(libc::RUSAGE_SELF)
}

/// CPU time of this process's children that have ended and been waited for.
pub fn reaped_children() -> std::io::Result<CpuTime> {
    usage(libc::RUSAGE_CHILDREN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Work done on a thread that has ended still counts for the process.
    #[test]
    fn ended_threads_count() {
        let before = this_process().unwrap();
        std::thread::spawn(|| {
            let start = Instant::now();
            let mut x = 0u64;
            while start.elapsed() < Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        })
        .join()
        .unwrap();
        let spent = this_process().unwrap() - before;
        assert!(spent.total() >= Duration::from_millis(20), "{spent:?}");
    }

    #[test]
    fn children_count_once_reaped() {
        let before = reaped_children().unwrap();
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        let spent = reaped_children().unwrap() - before;
        assert!(spent.total() > Duration::ZERO, "{spent:?}");
    }

    #[test]
    fn difference_never_negative() {
        let a = CpuTime {
            user: Duration::from_millis(5),
            system: Duration::from_millis(1),
        };
        assert_eq!((CpuTime::default() - a).total(), Duration::ZERO);
        assert_eq!((a - CpuTime::default()).total(), Duration::from_millis(6));
    }
}
