//! Rule families, one file each.

pub mod directory;
