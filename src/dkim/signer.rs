//! The per-message signer: one mail-auth signing stream per key, fed the same bytes.
//!
//! mail-auth's `DkimSigningStream` borrows its key; the milter keeps a signer across
//! callbacks, so each stream is stored together with the `Arc` of its key in a
//! self-referential cell (`self_cell`, no unsafe code here).

use super::keys::SigningKey;
use crate::config::DkimAlgorithm;
use mail_auth::{crypto::DkimKey, dkim::DkimSigningStream, headers::HeaderWriter as _};
use std::sync::Arc;

type Stream<'a> = Option<DkimSigningStream<'a, DkimKey>>;

self_cell::self_cell!(
    struct KeyStream {
        owner: Arc<SigningKey>,
        #[covariant]
        dependent: Stream,
    }
);

/// Signing failed for one key; the message must not leave unsigned (tempfail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DKIM signing with {selector}._domainkey.{domain} failed: {reason}")]
pub struct SignError {
    pub domain: String,
    pub selector: String,
    pub reason: String,
}

/// One signature, ready to be put in front of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// The whole header, `DKIM-Signature: v=1; ...\r\n` (CRLF-folded), as in a message file.
    pub header: String,
}

impl Signed {
    /// The header value as the milter protocol carries it: without the `DKIM-Signature:`
    /// name and the space after it, folded with LF (the MTA turns LF into CRLF).
    pub fn milter_value(&self) -> String {
        let v = self
            .header
            .strip_prefix("DKIM-Signature:")
            .unwrap_or(&self.header);
        let v = v.strip_prefix(' ').unwrap_or(v);
        let v = v.strip_suffix("\r\n").unwrap_or(v);
        v.replace("\r\n", "\n")
    }
}

/// Signs one message with every key given, streaming.
pub struct MessageSigner {
    streams: Vec<KeyStream>,
}

impl MessageSigner {
    /// Starts signing with `keys`; `header_block` is the message's header section in wire
    /// form (each field `Name:value` ending in CRLF, folded with CRLF), without the empty
    /// line that ends it.
    pub fn new(keys: &[Arc<SigningKey>], header_block: &[u8]) -> MessageSigner {
        let mut streams: Vec<KeyStream> = keys
            .iter()
            .map(|k| KeyStream::new(k.clone(), |k| Some(k.signer.sign_streaming())))
            .collect();
        for s in &mut streams {
            s.with_dependent_mut(|_, st| {
                if let Some(st) = st {
                    st.write(header_block);
                    st.write(b"\r\n");
                }
            });
        }
        MessageSigner { streams }
    }

    /// One chunk of the body, exactly as received (CRLF line ends).
    pub fn body(&mut self, chunk: &[u8]) {
        for s in &mut self.streams {
            s.with_dependent_mut(|_, st| {
                if let Some(st) = st {
                    st.write(chunk);
                }
            });
        }
    }

    /// Signs: one signature per key, in key order, or the first failure.
    pub fn finish(mut self) -> Result<Vec<Signed>, SignError> {
        let mut out = Vec::with_capacity(self.streams.len());
        for s in &mut self.streams {
            let key = s.borrow_owner().clone();
            let result = s.with_dependent_mut(|_, st| match st.take() {
                Some(st) => st.finish().map_err(|e| e.to_string()),
                None => Err("signing stream already finished".to_owned()),
            });
            match result {
                Ok(sig) => out.push(Signed {
                    domain: key.domain.clone(),
                    selector: key.selector.clone(),
                    algorithm: key.algorithm,
                    header: sig.to_header(),
                }),
                Err(reason) => {
                    return Err(SignError {
                        domain: key.domain.clone(),
                        selector: key.selector.clone(),
                        reason,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Appends one header field as the milter delivers it (`name`, value after the colon,
/// LF-folded) to `block` in wire form: `name:value\r\n`, folds as CRLF.
pub fn append_header(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    block.extend_from_slice(name);
    block.push(b':');
    let mut prev = 0u8;
    for &b in value {
        if b == b'\n' && prev != b'\r' {
            block.push(b'\r');
        }
        block.push(b);
        prev = b;
    }
    block.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests;
