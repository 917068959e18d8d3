//! Shared by the integration tests (`mod common;`): mailwarden as a process, a private
//! Postfix instance wired with the `deploy/postfix/` snippets, an SMTP sink, swaks.
//!
//! Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

pub mod mailwarden;
pub mod postfix;
pub mod process;
pub mod smtp;
