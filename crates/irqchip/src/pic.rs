//! TODO: pic
