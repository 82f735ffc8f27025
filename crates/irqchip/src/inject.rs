//! Which event a vCPU takes next, given what is pending and whether the
//! guest can take an event right now.
//!
//! Priority: NMI, then ExtINT from the 8259A, then the local APIC's highest
//! deliverable vector. An event the guest cannot take yet turns into a
//! request for an interrupt-window (or NMI-window) exit, where the caller
//! asks again.

use serde::{Deserialize, Serialize};

/// What currently stops the vCPU from taking an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interruptibility {
    /// RFLAGS.IF: maskable interrupts are enabled.
    pub if_flag: bool,
    /// One-instruction shadow after STI or MOV SS / POP SS.
    pub interrupt_shadow: bool,
    /// An NMI is in service (blocked until the next IRET).
    pub nmi_blocked: bool,
    /// An event is already being injected (pending re-injection on entry).
    pub event_pending: bool,
}

/// What is waiting for the vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEvents {
    /// An NMI is pending.
    pub nmi: bool,
    /// The 8259A's output (through LINT0 in ExtINT mode) is asserted.
    pub extint: bool,
    /// The local APIC's highest deliverable vector, if any.
    pub vector: Option<u8>,
}

/// What to do before the next guest entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Inject an NMI.
    InjectNmi,
    /// Acknowledge the 8259A (INTA) and inject the vector it returns.
    InjectExtInt,
    /// Acknowledge this local APIC vector and inject it.
    InjectVector(u8),
    /// Something is pending but the vCPU cannot take it now: ask for an
    /// NMI-window exit if an NMI is pending, an interrupt-window exit if a
    /// maskable event is pending, and decide again on that exit.
    RequestWindow,
    /// Nothing pending.
    Idle,
}

impl Interruptibility {
    /// Whether an NMI can be injected now.
    ///
    /// Both shadows block NMIs here. Intel blocks NMI in a MOV SS shadow;
    /// whether an STI shadow does is model-specific, and VM entry may refuse
    /// to inject an NMI with STI blocking set, so we are conservative and
    /// wait for the shadow to end, as KVM does.
    pub fn nmi_allowed(&self) -> bool {
        !self.nmi_blocked && !self.event_pending && !self.interrupt_shadow
    }

    /// Whether a maskable interrupt (ExtINT or a LAPIC vector) can be injected now.
    pub fn interrupt_allowed(&self) -> bool {
        self.if_flag && !self.interrupt_shadow && !self.event_pending
    }
}

/// Decide the one event to inject now, or whether to ask for a window.
///
/// One decision per call: after injecting, the caller marks the event as
/// being injected (`event_pending`) and calls again, which then yields
/// [`Decision::RequestWindow`] for anything still waiting. In particular
/// when an NMI is pending but blocked (one in service) and a maskable event
/// can go, the maskable one is injected now and the NMI waits for its
/// window; the NMI is not lost.
pub fn decide(pending: &PendingEvents, cpu: &Interruptibility) -> Decision {
    if pending.nmi && cpu.nmi_allowed() {
        return Decision::InjectNmi;
    }
    let maskable = pending.extint || pending.vector.is_some();
    if maskable && cpu.interrupt_allowed() {
        if pending.extint {
            return Decision::InjectExtInt;
        }
        if let Some(vector) = pending.vector {
            return Decision::InjectVector(vector);
        }
    }
    if pending.nmi || maskable {
        Decision::RequestWindow
    } else {
        Decision::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: u8 = 0x31;

    /// Expected (nmi allowed, maskable allowed) for every interruptibility,
    /// written out by hand. Index bits: 0 IF, 1 shadow, 2 NMI blocked, 3 event pending.
    const ALLOWED: [(bool, bool); 16] = [
        (true, false),  // 0000: IF clear
        (true, true),   // 0001: IF set, nothing blocks
        (false, false), // 0010: shadow
        (false, false), // 0011: shadow, IF
        (false, false), // 0100: NMI blocked
        (false, true),  // 0101: NMI blocked, IF
        (false, false), // 0110
        (false, false), // 0111
        (false, false), // 1000: event pending
        (false, false), // 1001
        (false, false), // 1010
        (false, false), // 1011
        (false, false), // 1100
        (false, false), // 1101
        (false, false), // 1110
        (false, false), // 1111
    ];

    fn cpu(bits: usize) -> Interruptibility {
        Interruptibility {
            if_flag: bits & 1 != 0,
            interrupt_shadow: bits & 2 != 0,
            nmi_blocked: bits & 4 != 0,
            event_pending: bits & 8 != 0,
        }
    }

    fn pending(bits: usize) -> PendingEvents {
        PendingEvents {
            nmi: bits & 1 != 0,
            extint: bits & 2 != 0,
            vector: (bits & 4 != 0).then_some(V),
        }
    }

    /// Expected decision for every pending set (index bits: 0 NMI, 1 ExtINT,
    /// 2 vector) under each (nmi allowed, maskable allowed) pair.
    fn expected(pending_bits: usize, allowed: (bool, bool)) -> Decision {
        use Decision::*;
        #[rustfmt::skip]
        const TABLE: [[Decision; 4]; 8] = [
            //       (F,F)          (F,T)            (T,F)          (T,T)
            /* - */ [Idle,          Idle,            Idle,          Idle],
            /* N */ [RequestWindow, RequestWindow,   InjectNmi,     InjectNmi],
            /* E */ [RequestWindow, InjectExtInt,    RequestWindow, InjectExtInt],
            /* NE*/ [RequestWindow, InjectExtInt,    InjectNmi,     InjectNmi],
            /* V */ [RequestWindow, InjectVector(V), RequestWindow, InjectVector(V)],
            /* NV*/ [RequestWindow, InjectVector(V), InjectNmi,     InjectNmi],
            /* EV*/ [RequestWindow, InjectExtInt,    RequestWindow, InjectExtInt],
            /*NEV*/ [RequestWindow, InjectExtInt,    InjectNmi,     InjectNmi],
        ];
        TABLE[pending_bits][usize::from(allowed.0) * 2 + usize::from(allowed.1)]
    }

    #[test]
    fn interruptibility_gates_nmi_and_maskable_as_tabulated() {
        for (bits, &(nmi, maskable)) in ALLOWED.iter().enumerate() {
            assert_eq!(cpu(bits).nmi_allowed(), nmi, "{bits:04b}");
            assert_eq!(cpu(bits).interrupt_allowed(), maskable, "{bits:04b}");
        }
    }

    #[test]
    fn every_combination_decides_as_tabulated() {
        for (cpu_bits, &allowed) in ALLOWED.iter().enumerate() {
            for pending_bits in 0..8 {
                assert_eq!(
                    decide(&pending(pending_bits), &cpu(cpu_bits)),
                    expected(pending_bits, allowed),
                    "cpu {cpu_bits:04b} pending {pending_bits:03b}"
                );
            }
        }
    }

    #[test]
    fn priority_is_nmi_then_extint_then_lapic_vector() {
        let open = cpu(1);
        assert_eq!(decide(&pending(0b111), &open), Decision::InjectNmi);
        assert_eq!(decide(&pending(0b110), &open), Decision::InjectExtInt);
        assert_eq!(decide(&pending(0b100), &open), Decision::InjectVector(V));
    }

    #[test]
    fn maskable_waits_for_a_window_while_if_is_clear_or_shadowed() {
        for bits in [0b0000, 0b0011, 0b1001] {
            assert_eq!(decide(&pending(0b100), &cpu(bits)), Decision::RequestWindow);
        }
    }

    #[test]
    fn nmi_ignores_if_but_waits_for_the_shadow() {
        assert_eq!(decide(&pending(0b001), &cpu(0b0000)), Decision::InjectNmi);
        assert_eq!(
            decide(&pending(0b001), &cpu(0b0010)),
            Decision::RequestWindow
        );
    }

    #[test]
    fn blocked_nmi_lets_a_maskable_interrupt_through_then_asks_for_a_window() {
        let mut c = cpu(0b0101); // IF set, NMI in service
        let p = pending(0b101);
        assert_eq!(decide(&p, &c), Decision::InjectVector(V));
        // The caller injected the vector; the NMI is still pending.
        c.event_pending = true;
        let p = PendingEvents { vector: None, ..p };
        assert_eq!(decide(&p, &c), Decision::RequestWindow);
    }

    #[test]
    fn nothing_pending_is_idle() {
        for bits in 0..16 {
            assert_eq!(
                decide(&PendingEvents::default(), &cpu(bits)),
                Decision::Idle
            );
        }
    }

    #[test]
    fn interruptibility_serde_round_trips() {
        for bits in 0..16 {
            let c = cpu(bits);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Interruptibility>(&json).unwrap(), c);
        }
    }
}
