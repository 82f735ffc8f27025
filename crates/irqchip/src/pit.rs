//! TODO: pit
