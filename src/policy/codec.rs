//! The policy delegation wire format, without I/O.
//!
//! A request is a sequence of `name=value` lines, each terminated by LF, and ends with an
//! empty line (Postfix `SMTPD_POLICY_README`). The reply has the same shape: one
//! `action=...` line and an empty line. The [`Decoder`] takes bytes in whatever chunks the
//! socket delivers and yields complete requests; it keeps at most one partial request, and
//! refuses one that grows past the configured limits, so input can never grow memory without
//! bound.
//!
//! Tolerances, on purpose:
//! - unknown attribute names are kept and ignored by the caller (Postfix adds new ones);
//! - a value may contain `=` (only the first `=` separates name and value);
//! - a line may end in CR LF (people test with `nc -C` or telnet); the CR is dropped.
//!
//! Refused, as a [`CodecError`] that ends the connection: a line without `=`, an empty name,
//! the same name twice in one request (ambiguous), bytes that are not UTF-8, a request larger
//! than `server.policy_max_request_bytes`, more than `server.policy_max_attributes` attributes,
//! and an empty line with no attribute before it.

use std::fmt;

/// Limits on one request, from `server.policy_max_request_bytes` and
/// `server.policy_max_attributes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request in bytes, counting every line with its LF and the terminating empty line.
    pub max_request_bytes: usize,
    /// Most attributes in one request.
    pub max_attributes: usize,
}

impl Limits {
    pub fn from_config(server: &crate::config::ServerConfig) -> Limits {
        Limits {
            max_request_bytes: server.policy_max_request_bytes,
            max_attributes: server.policy_max_attributes,
        }
    }
}

/// Why a byte stream is not a valid sequence of policy requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("request is larger than {limit} bytes")]
    RequestTooLarge { limit: usize },
    #[error("request has more than {limit} attributes")]
    TooManyAttributes { limit: usize },
    #[error("line {line} of the request has no '=' (expected name=value)")]
    MissingEquals { line: usize },
    #[error("line {line} of the request has an empty attribute name")]
    EmptyName { line: usize },
    #[error("attribute {name:?} appears twice in one request")]
    DuplicateAttribute { name: String },
    #[error("line {line} of the request is not valid UTF-8")]
    NotUtf8 { line: usize },
    #[error("empty request (a blank line with no attributes before it)")]
    EmptyRequest,
    #[error(
        "attribute {name:?} cannot be encoded: names and values must not contain control characters, names no '='"
    )]
    Unencodable { name: String },
}

/// One complete request: its attributes in the order they arrived.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    attrs: Vec<(String, String)>,
}

impl Request {
    /// Builds a request from attributes (for clients and tests).
    pub fn from_attrs<N: Into<String>, V: Into<String>>(
        attrs: impl IntoIterator<Item = (N, V)>,
    ) -> Request {
        Request {
            attrs: attrs
                .into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        }
    }

    /// The value of attribute `name`, if the request carries it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name` when present and not empty (Postfix sends empty values for
    /// attributes it has no data for).
    pub fn non_empty(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    pub fn attrs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.attrs.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.attrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty()
    }

    /// The wire form: `name=value\n` lines and the terminating empty line. Fails when a name
    /// or value contains a control character (it would change the request's meaning).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(
            self.attrs
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>()
                + 1,
        );
        for (n, v) in &self.attrs {
            if n.is_empty()
                || n.contains('=')
                || n.chars().any(char::is_control)
                || v.chars().any(char::is_control)
            {
                return Err(CodecError::Unencodable { name: n.clone() });
            }
            out.extend_from_slice(n.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
        Ok(out)
    }
}

/// Incremental decoder: [`feed`](Decoder::feed) bytes as they arrive, then take requests with
/// [`next_request`](Decoder::next_request) until it returns `Ok(None)`.
///
/// Memory stays bounded when the caller feeds only after `next_request` returned `Ok(None)`:
/// the decoder then holds at most one partial request (refused past `max_request_bytes`) plus
/// the last chunk fed. After an error the decoder keeps returning that error.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    /// Bytes fed but not yet consumed as complete lines.
    buf: Vec<u8>,
    /// Where in `buf` to look for the next LF (bytes before it hold none).
    scanned: usize,
    /// Attributes of the request being read.
    attrs: Vec<(String, String)>,
    /// Bytes of complete lines consumed for the request being read.
    request_bytes: usize,
    failed: Option<CodecError>,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            buf: Vec::new(),
            scanned: 0,
            attrs: Vec::new(),
            request_bytes: 0,
            failed: None,
        }
    }

    /// Appends bytes received from the peer.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// True when part of a request has been received but not yet completed.
    pub fn in_progress(&self) -> bool {
        self.failed.is_none() && (!self.attrs.is_empty() || !self.buf.is_empty())
    }

    /// The next complete request, `Ok(None)` when more bytes are needed.
    pub fn next_request(&mut self) -> Result<Option<Request>, CodecError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.decode() {
            Ok(r) => Ok(r),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.attrs = Vec::new();
                Err(e)
            }
        }
    }

    fn decode(&mut self) -> Result<Option<Request>, CodecError> {
        let mut start = 0;
        let result = loop {
            let Some(nl) = self.buf[self.scanned.max(start)..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| i + self.scanned.max(start))
            else {
                self.scanned = self.buf.len();
                // The partial line counts against the request limit already.
                let pending = self.buf.len() - start;
                if self.request_bytes + pending > self.limits.max_request_bytes {
                    break Err(CodecError::RequestTooLarge {
                        limit: self.limits.max_request_bytes,
                    });
                }
                break Ok(None);
            };
            let line_len = nl + 1 - start;
            self.request_bytes += line_len;
            if self.request_bytes > self.limits.max_request_bytes {
                break Err(CodecError::RequestTooLarge {
                    limit: self.limits.max_request_bytes,
                });
            }
            let mut line = &self.buf[start..nl];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            let line_no = self.attrs.len() + 1;
            start = nl + 1;
            if line.is_empty() {
                if self.attrs.is_empty() {
                    break Err(CodecError::EmptyRequest);
                }
                self.request_bytes = 0;
                break Ok(Some(Request {
                    attrs: std::mem::take(&mut self.attrs),
                }));
            }
            let Ok(line) = std::str::from_utf8(line) else {
                break Err(CodecError::NotUtf8 { line: line_no });
            };
            let Some((name, value)) = line.split_once('=') else {
                break Err(CodecError::MissingEquals { line: line_no });
            };
            if name.is_empty() {
                break Err(CodecError::EmptyName { line: line_no });
            }
            if self.attrs.len() >= self.limits.max_attributes {
                break Err(CodecError::TooManyAttributes {
                    limit: self.limits.max_attributes,
                });
            }
            if self.attrs.iter().any(|(n, _)| n == name) {
                break Err(CodecError::DuplicateAttribute {
                    name: name.to_owned(),
                });
            }
            self.attrs.push((name.to_owned(), value.to_owned()));
        };
        // Drop consumed lines; what is left is the start of the next line.
        self.buf.drain(..start);
        self.scanned = self.scanned.saturating_sub(start);
        result
    }
}

/// The action of a reply, in access(5) syntax (`DUNNO`, `REJECT text`, `550 5.2.1 text`, …).
///
/// Built only through constructors that replace control characters with spaces, so a text
/// taken from anywhere can never end the `action=` line early or inject a second attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action(String);

impl Action {
    /// `DUNNO`: no opinion, Postfix goes on with its next restriction.
    pub fn dunno() -> Action {
        Action("DUNNO".into())
    }

    /// Any access(5) action; control characters (CR, LF, NUL, …) become spaces.
    pub fn new(action: &str) -> Action {
        let clean: String = action
            .trim()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if clean.trim().is_empty() {
            Action::dunno()
        } else {
            Action(clean)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The reply on the wire: `action=...\n\n`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() + 9);
        out.extend_from_slice(b"action=");
        out.extend_from_slice(self.0.as_bytes());
        out.extend_from_slice(b"\n\n");
        out
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests;
