//! TODO: ioapic
