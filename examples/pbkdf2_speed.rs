//! PBKDF2-HMAC-SHA256 at 600000 iterations: the pbkdf2 crate against direct
//! use of the SHA-256 compression function (which runs on SHA-NI when present).
use std::time::Instant;

fn main() {
    let pw = b"key management facility";
    let salt = [7u8; 16];
    let mut out = [0u8; 32];
    let t = Instant::now();
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(pw, &salt, 600_000, &mut out);
    println!("pbkdf2 crate {:7.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    let fast = _kmi::kdf::pbkdf2_hmac_sha256(pw, &salt, 600_000, 32);
    println!("direct       {:7.1} ms", t.elapsed().as_secs_f64() * 1e3);
    assert_eq!(&fast[..], &out[..]);
}
