//! Reading KVM's C unions without `unsafe`.
//!
//! `kvm_irqchip` carries the PIC or IOAPIC state in a union, and each IOAPIC
//! redirection entry is a union too; Rust only reads union fields in
//! `unsafe` code. kvm-bindings' serde support serializes these structs as
//! their exact memory image (one `serialize_bytes` call), so a serializer
//! that keeps that byte string gives us the raw layout to decode safely.
//! Writing a union field needs no `unsafe`, so the other direction builds
//! the structs directly.

use std::fmt;

use serde::ser::{Impossible, Serialize, Serializer};

/// Offset of the union in `kvm_irqchip` (after `chip_id` and `pad`).
pub(super) const IRQCHIP_UNION_OFFSET: usize = 8;
/// Size of `kvm_irqchip`: two u32 and the 512-byte union.
pub(super) const IRQCHIP_SIZE: usize = IRQCHIP_UNION_OFFSET + 512;

/// The memory image of `value` as kvm-bindings serializes it, copied into
/// `N` bytes (zero-filled if the image is shorter or the serializer did not
/// produce one; the unit tests check that it does for every type used).
pub(super) fn raw_bytes<T: Serialize, const N: usize>(value: &T) -> [u8; N] {
    let mut out = [0u8; N];
    if let Ok(image) = value.serialize(ByteImage) {
        for (dst, src) in out.iter_mut().zip(image) {
            *dst = src;
        }
    }
    out
}

/// `N` bytes at `offset` of `bytes`, zero where `bytes` ends early.
pub(super) fn field<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = bytes.get(offset..) {
        for (dst, b) in out.iter_mut().zip(src) {
            *dst = *b;
        }
    }
    out
}

/// A serializer that accepts exactly one byte string and returns it.
struct ByteImage;

/// The value was not serialized as one byte string.
#[derive(Debug)]
struct NotBytes;

impl fmt::Display for NotBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("value is not serialized as a byte string")
    }
}

impl std::error::Error for NotBytes {}

impl serde::ser::Error for NotBytes {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        NotBytes
    }
}

/// Every serializer entry point but `serialize_bytes` refuses.
macro_rules! refuse {
    ($($name:ident($($arg:ty),*) -> $ok:ty;)*) => {
        $(
            fn $name(self, $(_: $arg),*) -> Result<$ok, NotBytes> {
                Err(NotBytes)
            }
        )*
    };
}

type Refused = Impossible<Vec<u8>, NotBytes>;

impl Serializer for ByteImage {
    type Ok = Vec<u8>;
    type Error = NotBytes;
    type SerializeSeq = Refused;
    type SerializeTuple = Refused;
    type SerializeTupleStruct = Refused;
    type SerializeTupleVariant = Refused;
    type SerializeMap = Refused;
    type SerializeStruct = Refused;
    type SerializeStructVariant = Refused;

    fn serialize_bytes(self, v: &[u8]) -> Result<Vec<u8>, NotBytes> {
        Ok(v.to_vec())
    }

    refuse! {
        serialize_bool(bool) -> Vec<u8>;
        serialize_i8(i8) -> Vec<u8>;
        serialize_i16(i16) -> Vec<u8>;
        serialize_i32(i32) -> Vec<u8>;
        serialize_i64(i64) -> Vec<u8>;
        serialize_u8(u8) -> Vec<u8>;
        serialize_u16(u16) -> Vec<u8>;
        serialize_u32(u32) -> Vec<u8>;
        serialize_u64(u64) -> Vec<u8>;
        serialize_f32(f32) -> Vec<u8>;
        serialize_f64(f64) -> Vec<u8>;
        serialize_char(char) -> Vec<u8>;
        serialize_str(&str) -> Vec<u8>;
        serialize_none() -> Vec<u8>;
        serialize_unit() -> Vec<u8>;
        serialize_unit_struct(&'static str) -> Vec<u8>;
        serialize_unit_variant(&'static str, u32, &'static str) -> Vec<u8>;
        serialize_seq(Option<usize>) -> Refused;
        serialize_tuple(usize) -> Refused;
        serialize_tuple_struct(&'static str, usize) -> Refused;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Refused;
        serialize_map(Option<usize>) -> Refused;
        serialize_struct(&'static str, usize) -> Refused;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Refused;
    }

    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<Vec<u8>, NotBytes> {
        Err(NotBytes)
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<Vec<u8>, NotBytes> {
        Err(NotBytes)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Vec<u8>, NotBytes> {
        Err(NotBytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_irqchip, kvm_irqchip__bindgen_ty_1, kvm_pic_state};

    #[test]
    fn irqchip_image_has_chip_id_then_union() {
        let pic = kvm_pic_state {
            last_irr: 0x11,
            irr: 0x22,
            elcr_mask: 0xF8,
            ..Default::default()
        };
        let chip = kvm_irqchip {
            chip_id: 0x0102_0304,
            pad: 0,
            chip: kvm_irqchip__bindgen_ty_1 { pic },
        };
        let image: [u8; IRQCHIP_SIZE] = raw_bytes(&chip);
        assert_eq!(u32::from_ne_bytes(field(&image, 0)), 0x0102_0304);
        assert_eq!(image[IRQCHIP_UNION_OFFSET], 0x11);
        assert_eq!(image[IRQCHIP_UNION_OFFSET + 1], 0x22);
        assert_eq!(image[IRQCHIP_UNION_OFFSET + 15], 0xF8);
    }

    #[test]
    fn a_value_that_is_not_bytes_gives_zeros() {
        let image: [u8; 4] = raw_bytes(&7u32);
        assert_eq!(image, [0; 4]);
    }

    #[test]
    fn field_past_the_end_is_zero_filled() {
        assert_eq!(field::<4>(&[1, 2], 1), [2, 0, 0, 0]);
        assert_eq!(field::<2>(&[1, 2], 9), [0, 0]);
    }
}
