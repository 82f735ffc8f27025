//! The virq VMM: guest memory, image loading, platform devices, firmware
//! tables and the vCPU run loops on top of the `virq` device models.

pub mod cli;
pub mod devices;
pub mod firmware;
pub mod loader;
pub mod stats;
pub mod vm;
