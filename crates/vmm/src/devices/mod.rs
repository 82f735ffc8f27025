//! Port-I/O platform devices and the bus that dispatches guest `in`/`out`
//! instructions to them.
//!
//! Devices see absolute port numbers (not offsets), so one device may be
//! inserted at several ranges (for example pc-testdev's IRQ lines at 0x2000
//! and its flush port at 0xE4).
//!
//! | ports          | device                          | module          |
//! |----------------|---------------------------------|-----------------|
//! | 0x3F8-0x3FF    | 16550 UART (COM1), IRQ 4        | [`serial`]      |
//! | 0xF4-0xF7      | isa-debug-exit                  | [`debug_exit`]  |
//! | 0xE4-0xE7      | pc-testdev flush page port      | [`testdev`]     |
//! | 0x2000-0x2017  | pc-testdev IRQ lines (GSI 0-23) | [`testdev`]     |
//! | 0x2400-0x240F  | virq MSI test device            | [`msi_testdev`] |
//! | 0x2500-0x251F  | virq ring device (doorbell+MSI) | [`ring`]        |
//! | 0x2520-0x252F  | virq pass-through line, GSI 19  | [`passthrough`] |
//! | 0x510-0x511    | fw_cfg (selector, data)         | [`fw_cfg`]      |

pub mod debug_exit;
pub mod fw_cfg;
pub mod msi_testdev;
pub mod passthrough;
pub mod ring;
pub mod serial;
pub mod testdev;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use serial::ConsoleLog;

/// How a device raises interrupts; implemented once per irqchip mode by the
/// VMM. Must be cheap and callable from any thread.
pub trait InterruptLines: Send + Sync {
    /// Set the level of a GSI as seen from one source (level lines; the chip
    /// ORs sources).
    fn set_gsi(&self, gsi: u32, level: bool);
    /// Raise then lower a GSI (an edge).
    fn pulse_gsi(&self, gsi: u32) {
        self.set_gsi(gsi, true);
        self.set_gsi(gsi, false);
    }
    /// Send an MSI (address, data) as a PCI device would.
    fn send_msi(&self, address: u64, data: u32);
}

/// What the VMM must do after a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing: carry on running the guest.
    None,
    /// The guest asked to exit with this status (isa-debug-exit:
    /// `(value << 1) | 1`).
    Exit(i32),
}

/// A device on the port-I/O bus.
///
/// `port` is the absolute port of the access and `data` holds the access
/// width (1, 2 or 4 bytes, little endian). A device must accept any port in
/// the ranges it was inserted at and any width without panicking.
pub trait PioDevice: Send {
    /// Guest `in`: fill `data`.
    fn read(&mut self, port: u16, data: &mut [u8]);
    /// Guest `out`: consume `data`, say whether the VMM must act.
    fn write(&mut self, port: u16, data: &[u8]) -> PioAction;
}

/// A shared, lockable port-I/O device.
pub type SharedPioDevice = Arc<Mutex<dyn PioDevice>>;

/// Errors building the platform.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// A new port range overlaps one already on the bus.
    #[error(
        "port range {first:#x}+{len:#x} overlaps the range {existing_first:#x}+{existing_len:#x} already on the bus"
    )]
    Overlap {
        /// First port of the rejected range.
        first: u16,
        /// Length of the rejected range.
        len: u16,
        /// First port of the range already present.
        existing_first: u16,
        /// Length of the range already present.
        existing_len: u16,
    },
    /// A range is empty or runs past port 0xFFFF.
    #[error("invalid port range {first:#x}+{len:#x}")]
    InvalidRange {
        /// First port of the rejected range.
        first: u16,
        /// Length of the rejected range.
        len: u16,
    },
}

/// One range on the bus.
struct PioRange {
    first: u16,
    len: u16,
    dev: SharedPioDevice,
}

impl PioRange {
    /// One past the last port, as u32 so 0xFFFF+1 does not overflow.
    fn end(&self) -> u32 {
        u32::from(self.first) + u32::from(self.len)
    }

    fn contains(&self, port: u16) -> bool {
        port >= self.first && u32::from(port) < self.end()
    }
}

/// Port-I/O dispatch: a list of (first port, length, device). Unclaimed reads
/// return all ones, unclaimed writes are ignored (both are counted).
#[derive(Default)]
pub struct PioBus {
    /// Sorted by first port, never overlapping.
    ranges: Vec<PioRange>,
    unclaimed_reads: AtomicU64,
    unclaimed_writes: AtomicU64,
    console: Option<ConsoleLog>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u16, u16)> = self.ranges.iter().map(|r| (r.first, r.len)).collect();
        f.debug_struct("PioBus").field("ranges", &ranges).finish()
    }
}

/// Lock a device, tolerating a poisoned mutex: a panic elsewhere must not take
/// every later port access down with it.
fn lock(dev: &SharedPioDevice) -> MutexGuard<'_, dyn PioDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claim ports `first..first + len` for `dev`.
    pub fn insert(
        &mut self,
        first: u16,
        len: u16,
        dev: SharedPioDevice,
    ) -> Result<(), DeviceError> {
        let new = PioRange { first, len, dev };
        if len == 0 || new.end() > 0x1_0000 {
            return Err(DeviceError::InvalidRange { first, len });
        }
        if let Some(old) = self
            .ranges
            .iter()
            .find(|r| u32::from(r.first) < new.end() && u32::from(first) < r.end())
        {
            return Err(DeviceError::Overlap {
                first,
                len,
                existing_first: old.first,
                existing_len: old.len,
            });
        }
        let at = self.ranges.partition_point(|r| r.first < first);
        self.ranges.insert(at, new);
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&PioRange> {
        // The last range starting at or below `port` is the only candidate.
        let after = self.ranges.partition_point(|r| r.first <= port);
        let candidate = self.ranges.get(after.checked_sub(1)?)?;
        candidate.contains(port).then_some(candidate)
    }

    /// Guest `in` from `port`; returns whether a device claimed it. Unclaimed
    /// reads fill `data` with 0xFF like an undriven ISA bus.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some(range) => {
                lock(&range.dev).read(port, data);
                true
            }
            None => {
                data.fill(0xFF);
                self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Guest `out` to `port`; returns whether a device claimed it and what
    /// the VMM must do next.
    pub fn write(&self, port: u16, data: &[u8]) -> (bool, PioAction) {
        match self.find(port) {
            Some(range) => (true, lock(&range.dev).write(port, data)),
            None => {
                self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
                (false, PioAction::None)
            }
        }
    }

    /// How many reads no device claimed.
    pub fn unclaimed_reads(&self) -> u64 {
        self.unclaimed_reads.load(Ordering::Relaxed)
    }

    /// How many writes no device claimed.
    pub fn unclaimed_writes(&self) -> u64 {
        self.unclaimed_writes.load(Ordering::Relaxed)
    }

    /// The in-memory copy of the guest's serial output, if the bus was built
    /// by [`platform_devices`].
    pub fn console(&self) -> Option<ConsoleLog> {
        self.console.clone()
    }
}

/// What the platform devices need to know about the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformConfig {
    /// Number of vCPUs (reported by fw_cfg).
    pub cpus: u32,
    /// Guest RAM size in bytes (reported by fw_cfg).
    pub ram_bytes: u64,
}

/// Build the bus with every platform device: serial, isa-debug-exit,
/// pc-testdev, the MSI test device and fw_cfg. The serial port writes the
/// guest's output to `serial_out` and keeps a copy reachable through
/// [`PioBus::console`].
pub fn platform_devices(
    cfg: &PlatformConfig,
    lines: Arc<dyn InterruptLines>,
    serial_out: Box<dyn std::io::Write + Send>,
) -> Result<PioBus, DeviceError> {
    let mut bus = PioBus::new();

    let serial = serial::SerialPort::new(serial::COM1_BASE, lines.clone(), serial_out);
    bus.console = Some(serial.console());
    bus.insert(
        serial::COM1_BASE,
        serial::PORT_COUNT,
        Arc::new(Mutex::new(serial)),
    )?;

    bus.insert(
        debug_exit::PORT,
        debug_exit::PORT_COUNT,
        Arc::new(Mutex::new(debug_exit::DebugExit)),
    )?;

    let testdev: SharedPioDevice = Arc::new(Mutex::new(testdev::PcTestdev::new(lines.clone())));
    bus.insert(
        testdev::IRQ_LINE_BASE,
        testdev::IRQ_LINE_COUNT,
        testdev.clone(),
    )?;
    bus.insert(testdev::FLUSH_PORT, testdev::FLUSH_PORT_COUNT, testdev)?;

    bus.insert(
        msi_testdev::BASE,
        msi_testdev::PORT_COUNT,
        Arc::new(Mutex::new(msi_testdev::MsiTestdev::new(lines))),
    )?;

    bus.insert(
        fw_cfg::SELECTOR_PORT,
        fw_cfg::PORT_COUNT,
        Arc::new(Mutex::new(fw_cfg::FwCfg::new(cfg.cpus, cfg.ram_bytes))),
    )?;

    Ok(bus)
}

/// Little-endian value of a 1-, 2- or 4-byte access (at most 8 bytes used).
pub(crate) fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |acc, (i, b)| acc | (u64::from(*b) << (8 * i)))
}

/// Fills a read of any width with `value`'s little-endian bytes (zero past
/// the fourth).
pub(crate) fn put_le(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

/// Test helpers shared by the device modules.
#[cfg(test)]
pub(crate) mod test_util {
    use super::InterruptLines;
    use std::sync::Mutex;

    /// One thing a device did to its interrupt lines.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Event {
        /// `set_gsi(gsi, level)`.
        Gsi(u32, bool),
        /// `send_msi(address, data)`.
        Msi(u64, u32),
    }

    /// Records every call, in order.
    #[derive(Default)]
    pub struct RecordingLines {
        pub events: Mutex<Vec<Event>>,
    }

    impl RecordingLines {
        pub fn take(&self) -> Vec<Event> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    impl InterruptLines for RecordingLines {
        fn set_gsi(&self, gsi: u32, level: bool) {
            self.events.lock().unwrap().push(Event::Gsi(gsi, level));
        }
        fn send_msi(&self, address: u64, data: u32) {
            self.events.lock().unwrap().push(Event::Msi(address, data));
        }
    }

    /// A tiny deterministic generator for "any access" tests.
    pub struct XorShift(pub u64);

    impl XorShift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{Event, RecordingLines, XorShift};
    use super::*;

    /// Remembers the last access it saw.
    #[derive(Default)]
    struct Probe {
        last: Option<(u16, Vec<u8>)>,
    }

    impl PioDevice for Probe {
        fn read(&mut self, port: u16, data: &mut [u8]) {
            data.fill(port as u8);
        }
        fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
            self.last = Some((port, data.to_vec()));
            PioAction::None
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedPioDevice) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let shared: SharedPioDevice = p.clone();
        (p, shared)
    }

    #[test]
    fn bus_can_be_shared_between_vcpu_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PioBus>();
        assert_send_sync::<ConsoleLog>();
    }

    #[test]
    fn overlapping_insert_is_rejected() {
        let mut bus = PioBus::new();
        bus.insert(0x100, 8, probe().1).unwrap();
        let err = bus.insert(0x107, 2, probe().1).unwrap_err();
        assert_eq!(
            err,
            DeviceError::Overlap {
                first: 0x107,
                len: 2,
                existing_first: 0x100,
                existing_len: 8
            }
        );
        let err = bus.insert(0xF0, 0x20, probe().1).unwrap_err();
        assert!(matches!(
            err,
            DeviceError::Overlap {
                existing_first: 0x100,
                ..
            }
        ));
        // Adjacent ranges are fine on both sides.
        bus.insert(0x108, 1, probe().1).unwrap();
        bus.insert(0xF8, 8, probe().1).unwrap();
    }

    #[test]
    fn empty_or_wrapping_range_is_rejected() {
        let mut bus = PioBus::new();
        assert_eq!(
            bus.insert(0x10, 0, probe().1),
            Err(DeviceError::InvalidRange {
                first: 0x10,
                len: 0
            })
        );
        assert_eq!(
            bus.insert(0xFFFF, 2, probe().1),
            Err(DeviceError::InvalidRange {
                first: 0xFFFF,
                len: 2
            })
        );
        bus.insert(0xFFFF, 1, probe().1).unwrap();
        assert!(bus.read(0xFFFF, &mut [0]));
    }

    #[test]
    fn unclaimed_read_returns_all_ones_and_is_counted() {
        let mut bus = PioBus::new();
        bus.insert(0x100, 4, probe().1).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x104, &mut data));
        assert_eq!(data, [0xFF; 4]);
        assert!(!bus.read(0xFF, &mut data[..1]));
        assert_eq!(bus.unclaimed_reads(), 2);
        assert_eq!(bus.unclaimed_writes(), 0);
    }

    #[test]
    fn unclaimed_write_is_ignored_and_counted() {
        let bus = PioBus::new();
        assert_eq!(bus.write(0x80, &[1]), (false, PioAction::None));
        assert_eq!(bus.write(0x80, &[1, 2]), (false, PioAction::None));
        assert_eq!(bus.unclaimed_writes(), 2);
    }

    #[test]
    fn claimed_access_reaches_device_with_absolute_port() {
        let mut bus = PioBus::new();
        let (p, shared) = probe();
        bus.insert(0x200, 0x10, shared).unwrap();
        assert_eq!(bus.write(0x20F, &[7, 8]), (true, PioAction::None));
        assert_eq!(p.lock().unwrap().last, Some((0x20F, vec![7, 8])));
        let mut data = [0u8; 2];
        assert!(bus.read(0x203, &mut data));
        assert_eq!(data, [0x03, 0x03]);
    }

    #[test]
    fn platform_bus_routes_every_device() {
        let lines = Arc::new(RecordingLines::default());
        let cfg = PlatformConfig {
            cpus: 3,
            ram_bytes: 64 << 20,
        };
        let bus = platform_devices(&cfg, lines.clone(), Box::new(std::io::sink())).unwrap();

        // Serial: print a byte, see it in the console copy.
        assert_eq!(bus.write(0x3F8, b"Z"), (true, PioAction::None));
        assert_eq!(bus.console().unwrap().contents(), b"Z");
        // isa-debug-exit.
        assert_eq!(bus.write(0xF4, &[3]), (true, PioAction::Exit(7)));
        // pc-testdev IRQ line and flush port.
        lines.take();
        assert_eq!(bus.write(0x2005, &[1]), (true, PioAction::None));
        assert_eq!(lines.take(), vec![Event::Gsi(5, true)]);
        let mut dword = [0xAAu8; 4];
        assert!(bus.read(0xE4, &mut dword));
        assert_eq!(dword, [0; 4]);
        // MSI test device signature.
        assert!(bus.read(0x240C, &mut dword));
        assert_eq!(u32::from_le_bytes(dword), 0x7172_6976);
        // fw_cfg: CPU count.
        assert_eq!(bus.write(0x510, &[0x05, 0x00]), (true, PioAction::None));
        let mut b = [0u8];
        bus.read(0x511, &mut b);
        assert_eq!(b, [3]);
        // A port nobody claims.
        assert!(!bus.read(0x60, &mut b));
    }

    #[test]
    fn any_access_to_platform_bus_never_panics() {
        let lines = Arc::new(RecordingLines::default());
        let cfg = PlatformConfig {
            cpus: 255,
            ram_bytes: u64::MAX,
        };
        let bus = platform_devices(&cfg, lines, Box::new(std::io::sink())).unwrap();
        let ports = [0x3F8u16, 0xF4, 0xE4, 0x2000, 0x2400, 0x510, 0x0, 0xFFFF];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let r = rng.next();
            let base = ports[(r % ports.len() as u64) as usize];
            let port = base.wrapping_add(((r >> 8) % 0x20) as u16);
            let width = [1usize, 2, 4][((r >> 16) % 3) as usize];
            let bytes = (r >> 24).to_le_bytes();
            if r & (1 << 63) != 0 {
                let mut data = [0u8; 4];
                bus.read(port, &mut data[..width]);
            } else {
                let _ = bus.write(port, &bytes[..width]);
            }
        }
    }
}
