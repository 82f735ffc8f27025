//! TODO: lapic
