//! Rule families, one file each.

pub mod compromise;
pub mod directory;
pub mod dkim;
pub mod limits;
pub mod quota;
pub mod submission;
