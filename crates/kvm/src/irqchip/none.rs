//! No interrupt controller at all: HLT ends the vCPU. For tests and for
//! guests that only need port I/O.

use super::{HltAction, IrqchipBackend, VcpuCtx};
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::Result;

/// A machine without interrupt controllers; raising lines does nothing.
#[derive(Debug, Default)]
pub struct NoIrqchip;

impl IrqchipBackend for NoIrqchip {
    fn name(&self) -> &'static str {
        "none"
    }

    fn setup_vm(&self, _vm: &Vm) -> Result<()> {
        Ok(())
    }

    fn setup_vcpu(&self, _vcpu: &Vcpu, _boot: bool) -> Result<()> {
        Ok(())
    }

    fn on_hlt(&self, _vcpu: &mut VcpuCtx<'_>) -> HltAction {
        // Nothing can ever interrupt it.
        HltAction::Stop
    }

    fn set_gsi(&self, _gsi: u32, _level: bool) -> Result<()> {
        Ok(())
    }

    fn send_msi(&self, _address: u64, _data: u32) -> Result<()> {
        Ok(())
    }
}
