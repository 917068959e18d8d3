use super::*;

const LIMITS: Limits = Limits {
    max_request_bytes: 16 * 1024,
    max_attributes: 64,
};

/// What Postfix 3.x sends for a RCPT in an authenticated TLS session (every attribute of
/// SMTPD_POLICY_README), then a second RCPT on the same connection, then a request with an
/// attribute name this version does not know, `=` inside values and a CR LF line end.
fn postfix_stream() -> Vec<u8> {
    let first = "request=smtpd_access_policy\n\
protocol_state=RCPT\n\
protocol_name=ESMTP\n\
helo_name=mail.mpt.gov.la\n\
queue_id=8045F2AB23\n\
sender=champa@mpt.gov.la\n\
recipient=somsak@mof.gov.la\n\
recipient_count=0\n\
client_address=192.0.2.10\n\
client_name=mail.mpt.gov.la\n\
reverse_client_name=mail.mpt.gov.la\n\
instance=123.456.7\n\
sasl_method=plain\n\
sasl_username=champa\n\
sasl_sender=\n\
size=12345\n\
ccert_subject=\n\
ccert_issuer=\n\
ccert_fingerprint=\n\
ccert_pubkey_fingerprint=\n\
encryption_protocol=TLSv1.3\n\
encryption_cipher=TLS_AES_256_GCM_SHA384\n\
encryption_keysize=256\n\
etrn_domain=\n\
stress=\n\
server_address=192.0.2.1\n\
server_port=587\n\
policy_context=submission\n\
compatibility_level=3.6\n\
mail_version=3.7.11\n\
\n";
    let second = "request=smtpd_access_policy\n\
protocol_state=RCPT\n\
queue_id=8045F2AB23\n\
sender=champa@mpt.gov.la\n\
recipient=noy@mpt.gov.la\n\
recipient_count=1\n\
client_address=2001:db8::25\n\
\n";
    let third = "request=smtpd_access_policy\r\n\
protocol_state=END-OF-MESSAGE\n\
ccert_subject=CN=mail.mpt.gov.la,O=MPT\n\
x_future_attribute=a=b=c\n\
sender=\n\
\n";
    [first, second, third].concat().into_bytes()
}

fn decode_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<Request> {
    let mut d = Decoder::new(LIMITS);
    let mut out = Vec::new();
    for c in chunks {
        d.feed(c);
        while let Some(r) = d.next_request().expect("valid stream") {
            out.push(r);
        }
    }
    assert!(!d.in_progress(), "bytes left over after the last request");
    out
}

#[test]
fn decodes_a_realistic_postfix_stream() {
    let reqs = decode_chunks([postfix_stream().as_slice()]);
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].len(), 30);
    assert_eq!(reqs[0].get("request"), Some("smtpd_access_policy"));
    assert_eq!(reqs[0].get("recipient"), Some("somsak@mof.gov.la"));
    assert_eq!(reqs[0].get("sasl_sender"), Some(""));
    assert_eq!(reqs[0].non_empty("sasl_sender"), None);
    assert_eq!(reqs[0].get("mail_version"), Some("3.7.11"));
    assert_eq!(reqs[1].get("client_address"), Some("2001:db8::25"));
    assert_eq!(reqs[1].get("helo_name"), None);
    // CR LF tolerated, '=' inside values kept, unknown names kept.
    assert_eq!(reqs[2].get("request"), Some("smtpd_access_policy"));
    assert_eq!(
        reqs[2].get("ccert_subject"),
        Some("CN=mail.mpt.gov.la,O=MPT")
    );
    assert_eq!(reqs[2].get("x_future_attribute"), Some("a=b=c"));
    assert_eq!(reqs[2].get("sender"), Some(""));
}

#[test]
fn every_two_chunk_split_gives_the_same_requests() {
    let stream = postfix_stream();
    let whole = decode_chunks([stream.as_slice()]);
    for at in 0..=stream.len() {
        let (a, b) = stream.split_at(at);
        assert_eq!(decode_chunks([a, b]), whole, "split at byte {at}");
    }
}

#[test]
fn every_three_chunk_split_around_request_boundaries_gives_the_same_requests() {
    // All pairs of split points within a window around the first request boundary, where
    // the decoder must carry a partial line and a partial request across feeds.
    let stream = postfix_stream();
    let whole = decode_chunks([stream.as_slice()]);
    let boundary = stream.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    let lo = boundary.saturating_sub(40);
    let hi = (boundary + 40).min(stream.len());
    for i in lo..=hi {
        for j in i..=hi {
            let chunks = [&stream[..i], &stream[i..j], &stream[j..]];
            assert_eq!(decode_chunks(chunks), whole, "splits at {i} and {j}");
        }
    }
}

#[test]
fn byte_by_byte_gives_the_same_requests() {
    let stream = postfix_stream();
    let whole = decode_chunks([stream.as_slice()]);
    assert_eq!(decode_chunks(stream.chunks(1)), whole);
    for size in [2, 3, 7, 64, 500] {
        assert_eq!(
            decode_chunks(stream.chunks(size)),
            whole,
            "chunks of {size}"
        );
    }
}

#[test]
fn partial_request_waits_for_more_bytes() {
    let mut d = Decoder::new(LIMITS);
    assert!(!d.in_progress());
    d.feed(b"request=smtpd_access_policy\nprotocol_state=RC");
    assert_eq!(d.next_request(), Ok(None));
    assert!(d.in_progress());
    d.feed(b"PT\n");
    assert_eq!(d.next_request(), Ok(None));
    assert!(d.in_progress());
    d.feed(b"\n");
    let r = d.next_request().unwrap().unwrap();
    assert_eq!(r.get("protocol_state"), Some("RCPT"));
    assert!(!d.in_progress());
    assert_eq!(d.next_request(), Ok(None));
}

#[test]
fn request_at_the_byte_limit_passes_one_byte_over_fails() {
    // "a=" + value + "\n" + "\n"
    let limits = Limits {
        max_request_bytes: 100,
        max_attributes: 8,
    };
    let exact = format!("a={}\n\n", "x".repeat(100 - 4));
    assert_eq!(exact.len(), 100);
    let mut d = Decoder::new(limits);
    d.feed(exact.as_bytes());
    assert!(d.next_request().unwrap().is_some());

    let over = format!("a={}\n\n", "x".repeat(100 - 3));
    let mut d = Decoder::new(limits);
    d.feed(over.as_bytes());
    assert_eq!(
        d.next_request(),
        Err(CodecError::RequestTooLarge { limit: 100 })
    );
}

#[test]
fn endless_line_is_refused_before_it_completes() {
    // No LF ever arrives: the decoder must refuse as soon as the partial line is too big,
    // without waiting for the end of a line that never comes.
    let limits = Limits {
        max_request_bytes: 1024,
        max_attributes: 8,
    };
    let mut d = Decoder::new(limits);
    let chunk = [b'x'; 100];
    let mut fed = 0;
    let err = loop {
        d.feed(&chunk);
        fed += chunk.len();
        match d.next_request() {
            Ok(None) => assert!(fed <= 1024, "still buffering after {fed} bytes"),
            Ok(Some(_)) => panic!("garbage decoded as a request"),
            Err(e) => break e,
        }
    };
    assert_eq!(err, CodecError::RequestTooLarge { limit: 1024 });
    assert!(fed <= 1024 + chunk.len());
    // Sticky: the connection is over.
    d.feed(b"a=b\n\n");
    assert_eq!(d.next_request(), Err(err));
}

#[test]
fn many_short_lines_count_against_the_byte_limit() {
    let limits = Limits {
        max_request_bytes: 600,
        max_attributes: 10_000,
    };
    let mut d = Decoder::new(limits);
    let mut err = None;
    for i in 0..1000 {
        d.feed(format!("a{i}=1\n").as_bytes());
        if let Err(e) = d.next_request() {
            err = Some(e);
            break;
        }
    }
    assert_eq!(err, Some(CodecError::RequestTooLarge { limit: 600 }));
}

#[test]
fn too_many_attributes() {
    let limits = Limits {
        max_request_bytes: 16 * 1024,
        max_attributes: 8,
    };
    let ok: String = (0..8).map(|i| format!("a{i}=v\n")).collect::<String>() + "\n";
    let mut d = Decoder::new(limits);
    d.feed(ok.as_bytes());
    assert_eq!(d.next_request().unwrap().unwrap().len(), 8);

    let bad: String = (0..9).map(|i| format!("a{i}=v\n")).collect::<String>() + "\n";
    let mut d = Decoder::new(limits);
    d.feed(bad.as_bytes());
    assert_eq!(
        d.next_request(),
        Err(CodecError::TooManyAttributes { limit: 8 })
    );
}

#[test]
fn limits_apply_per_request_not_per_connection() {
    let limits = Limits {
        max_request_bytes: 512,
        max_attributes: 8,
    };
    let one = "request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=a@b.la\n\n";
    let mut d = Decoder::new(limits);
    for _ in 0..100 {
        d.feed(one.as_bytes());
        assert!(d.next_request().unwrap().is_some());
    }
}

fn first_error(bytes: &[u8]) -> CodecError {
    let mut d = Decoder::new(LIMITS);
    d.feed(bytes);
    loop {
        match d.next_request() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("no error for {:?}", String::from_utf8_lossy(bytes)),
            Err(e) => return e,
        }
    }
}

#[test]
fn garbage_is_a_typed_error() {
    assert_eq!(
        first_error(b"GET / HTTP/1.1\nHost: x\n\n"),
        CodecError::MissingEquals { line: 1 }
    );
    assert_eq!(
        first_error(b"request=smtpd_access_policy\n=value\n\n"),
        CodecError::EmptyName { line: 2 }
    );
    assert_eq!(
        first_error(b"sender=a@b.la\nrecipient=\xff\xfe@b.la\n\n"),
        CodecError::NotUtf8 { line: 2 }
    );
    assert_eq!(first_error(b"\n"), CodecError::EmptyRequest);
    assert_eq!(
        first_error(b"a=1\n\n\n"),
        CodecError::EmptyRequest,
        "a second blank line is an empty request"
    );
    assert_eq!(
        first_error(b"recipient=a@b.la\nrecipient=c@d.la\n\n"),
        CodecError::DuplicateAttribute {
            name: "recipient".into()
        }
    );
}

#[test]
fn arbitrary_bytes_never_panic_and_stay_bounded() {
    // A small deterministic generator (xorshift) stands in for a fuzzer here; the byte mix is
    // biased towards the characters that matter to the grammar.
    let limits = Limits {
        max_request_bytes: 512,
        max_attributes: 8,
    };
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2000 {
        let mut d = Decoder::new(limits);
        for _ in 0..(next() % 20) {
            let len = (next() % 200) as usize;
            let chunk: Vec<u8> = (0..len)
                .map(|_| match next() % 8 {
                    0 => b'\n',
                    1 => b'=',
                    2 => b'\r',
                    3 => (next() % 256) as u8,
                    _ => b'a' + (next() % 26) as u8,
                })
                .collect();
            d.feed(&chunk);
            while let Ok(Some(r)) = d.next_request() {
                assert!(r.len() <= limits.max_attributes);
            }
            assert!(d.buf.len() <= limits.max_request_bytes);
        }
    }
}

#[test]
fn request_encoding_round_trips() {
    let r = Request::from_attrs([
        ("request", "smtpd_access_policy"),
        ("ccert_subject", "CN=x,O=y"),
        ("sender", ""),
    ]);
    let bytes = r.encode().unwrap();
    assert_eq!(
        bytes,
        b"request=smtpd_access_policy\nccert_subject=CN=x,O=y\nsender=\n\n"
    );
    let back = decode_chunks([bytes.as_slice()]);
    assert_eq!(back, vec![r]);
}

#[test]
fn request_encoding_refuses_injection() {
    for (n, v) in [
        ("recipient", "a@b.la\nrecipient=c@d.la"),
        ("a=b", "c"),
        ("", "x"),
    ] {
        assert!(
            Request::from_attrs([(n, v)]).encode().is_err(),
            "{n:?}={v:?} was encoded"
        );
    }
}

#[test]
fn reply_encoding() {
    assert_eq!(Action::dunno().encode(), b"action=DUNNO\n\n");
    assert_eq!(
        Action::new("550 5.2.1 Mailbox <a@b.la> is suspended").encode(),
        b"action=550 5.2.1 Mailbox <a@b.la> is suspended\n\n"
    );
}

#[test]
fn reply_text_cannot_inject_a_line() {
    let a = Action::new("REJECT nope\n\naction=OK\r\nx\0y");
    let wire = a.encode();
    // Exactly one line, then the empty line.
    assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 2);
    assert!(wire.ends_with(b"\n\n"));
    assert!(!wire.contains(&b'\r') && !wire.contains(&0));
    assert_eq!(a.as_str(), "REJECT nope  action=OK  x y");
    // The reply decodes as one attribute.
    let mut d = Decoder::new(LIMITS);
    d.feed(&wire);
    let r = d.next_request().unwrap().unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r.get("action"), Some(a.as_str()));
    // An action that is only control characters is no action at all.
    assert_eq!(Action::new("\n\r"), Action::dunno());
}
