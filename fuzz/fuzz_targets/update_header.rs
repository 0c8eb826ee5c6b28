//! The application's session headers: `codec::decode_update`, `codec::decode_patch` and
//! `codec::merge_patch` on arbitrary header values.
//!
//! Input: one or two header values separated by `\n` (a byte no header value holds):
//! each is decoded as an update and as a patch, under several `max_bytes`, and every
//! decoded patch is merged into every decoded session and into no session.
//!
//! Invariants:
//! - `Replace(data)`: `data` is a non-empty JSON object of at most `max_bytes`, and
//!   handing it to the application and back (`encode` → `decode_update`) gives the same
//!   bytes: what the proxy stores is a fixed point of the protocol;
//! - a decoded patch is a JSON object;
//! - `merge_patch` results are at most `max_bytes` when `Ok`, a non-empty object when
//!   `Data`, and applying the same patch again changes nothing (RFC 7396 is idempotent).

#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use session_proxy::session::codec::{self, Merged, Update};

const MAX_BYTES: [usize; 3] = [16, 256, 4096];

fn object_of(data: &[u8]) -> serde_json::Map<String, Value> {
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(object)) => object,
        other => panic!("not a JSON object: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let values: Vec<HeaderValue> = data
        .splitn(2, |b| *b == b'\n')
        .filter_map(|part| HeaderValue::from_bytes(part).ok())
        .collect();

    for max in MAX_BYTES {
        let mut sessions: Vec<Option<Vec<u8>>> = vec![None];
        let mut patches = Vec::new();
        for value in &values {
            if let Ok(update) = codec::decode_update(value, max)
                && let Update::Replace(data) = update
            {
                // seeds/update_header/crash-number-exponent: 16 bytes as sent, 17 once
                // compacted (`1E400` is stored as `1e+400`).
                assert!(data.len() <= max, "{} > {max}", data.len());
                assert!(!object_of(&data).is_empty(), "Replace of an empty object");
                let round = codec::decode_update(&codec::encode(&data), max);
                assert_eq!(
                    round,
                    Ok(Update::Replace(data.clone())),
                    "not a fixed point"
                );
                sessions.push(Some(data.to_vec()));
            }
            if let Ok(patch) = codec::decode_patch(value, max) {
                assert!(patch.is_object(), "patch is not an object");
                patches.push(patch);
            }
        }

        for stored in &sessions {
            for patch in &patches {
                let Ok(merged) = codec::merge_patch(stored.as_deref(), patch, max) else {
                    continue;
                };
                let Merged::Data(merged) = merged else {
                    continue;
                };
                assert!(merged.len() <= max, "merged {} > {max}", merged.len());
                assert!(!object_of(&merged).is_empty(), "Data of an empty object");
                let again = codec::merge_patch(Some(&merged), patch, max);
                assert_eq!(
                    again,
                    Ok(Merged::Data(merged.clone())),
                    "patch not idempotent"
                );
            }
        }
    }
});
