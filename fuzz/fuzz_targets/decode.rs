//! Arbitrary bytes into the Postgres wire decoder: startup packets, tagged frames, and every
//! message reader on every frame body. Nothing may panic, allocate without bound, or decode a
//! frame that does not re-encode to the bytes it was read from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxy_node::mask::read_fields;
use proxy_node::wire::postgres::frame::{decode_frame, decode_startup, take_cstr};
use proxy_node::wire::postgres::messages::{
    read_bind, read_cstr_body, read_data_row, read_error_fields, read_execute, read_parse,
    read_row_description, read_target, rows_in_tag,
};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, data)) = data.split_first() else { return };
    // The configured message limit, 5 bytes to 16 MiB.
    let max = 5 + (usize::from(limit) << 16);

    let mut startup = BytesMut::from(data);
    let before = startup.len();
    match decode_startup(&mut startup) {
        Ok(Some(_)) => assert!(startup.len() < before, "a startup packet consumed nothing"),
        Ok(None) => assert_eq!(startup.len(), before, "incomplete input was consumed"),
        Err(_) => {}
    }

    let mut buf = BytesMut::from(data);
    let mut at = 0;
    loop {
        let before = buf.len();
        match decode_frame(&mut buf, max) {
            Ok(Some(frame)) => {
                let consumed = before - buf.len();
                assert!(consumed >= 5 && frame.body.len() + 5 == consumed);
                let mut again = BytesMut::new();
                frame.encode_into(&mut again);
                assert_eq!(&again[..], &data[at..at + consumed], "frame does not round-trip");
                at += consumed;
                read_all(&frame.body);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "incomplete input was consumed");
                break;
            }
            Err(_) => break,
        }
    }
    // Bodies need not come from a well-formed frame.
    read_all(data);
});

fn read_all(body: &[u8]) {
    let _ = read_cstr_body(body);
    let _ = read_error_fields(body);
    if let Some(cols) = read_row_description(body) {
        assert!(cols.len() <= i16::MAX as usize);
    }
    if let Some(fields) = read_fields(body) {
        assert!(fields.len() <= i16::MAX as usize);
    }
    if let Some(vals) = read_data_row(body) {
        let bytes: usize = vals.iter().flatten().map(|v| v.len()).sum();
        assert!(bytes <= body.len());
    }
    let _ = read_parse(body);
    if let Some(b) = read_bind(body) {
        let bytes: usize = b.params.iter().filter_map(|(v, _)| *v).map(<[u8]>::len).sum();
        assert!(bytes <= body.len());
    }
    let _ = read_target(body);
    let _ = read_execute(body);
    if let Ok(tag) = std::str::from_utf8(body) {
        let _ = rows_in_tag(tag);
    }
    let mut b = body;
    while take_cstr(&mut b).is_some() {}
}
