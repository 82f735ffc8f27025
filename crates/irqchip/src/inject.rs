//! TODO: inject
