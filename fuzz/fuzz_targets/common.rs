//! What the targets share: the published testing KEK and small helpers.
#![allow(dead_code)]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// The published 512-bit, e = 161 testing KEK of keas.kmi.
#[allow(unused_imports)] // not every target uses it
pub use _kmi::kek::TESTING_KEK;

/// The passphrase the targets use when the input does not choose one.
pub const PASSPHRASE: &[u8] = b"key management facility";

/// The known DEK of `dek_unwrap` (32 bytes, the facility's DEK length for a 512-bit KEK).
pub const KNOWN_DEK: &[u8; 32] = b"keas.kmi fuzzing: the known DEK!";

/// The padding bytes `dek_unwrap` and fuzz/make_seeds.py put before the known DEK,
/// so that its wrapped form is deterministic.
pub const KNOWN_PS: u8 = 0x5a;

/// PEM armour: `-----BEGIN label-----`, base64 in 64-character lines, `-----END label-----`.
pub fn armour(label: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("-----BEGIN {label}-----\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\n"));
    }
    if !headers.is_empty() {
        out.push('\n');
    }
    let b64 = STANDARD.encode(body);
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out.into_bytes()
}
