//! Rule families, one file each.

pub mod compromise;
pub mod directory;
pub mod dkim;
pub mod limits;
pub mod quota;
pub mod sendas;
pub mod spoofing;
pub mod submission;
