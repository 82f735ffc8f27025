//! TODO: msi
