//! PEM armour for KEKs: reading every flavour deployments hold (PKCS#1, legacy
//! OpenSSL encryption, PKCS#8 plain and PBES2) and writing the legacy
//! DES-EDE3-CBC form that keas.kmi 3.0-3.2 wrote.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use md5::{Digest, Md5};
use pkcs8::der::Decode;
use zeroize::Zeroizing;

use crate::errors::{KmiError, KmiResult};
use crate::kdf;

const RSA_ENCRYPTION_OID: &str = "1.2.840.113549.1.1.1";

/// One PEM block: its label, its RFC 1421 headers and its decoded body.
struct PemBlock {
    label: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn parse_block(pem: &[u8]) -> KmiResult<PemBlock> {
    let text = std::str::from_utf8(pem)
        .map_err(|_| KmiError::bad_key("malformed PEM: the KEK is not ASCII text"))?;
    let mut lines = text.lines().map(str::trim_end);
    let label = loop {
        let line = lines
            .next()
            .ok_or_else(|| KmiError::bad_key("malformed PEM: no -----BEGIN line"))?;
        if let Some(rest) = line.trim_start().strip_prefix("-----BEGIN ") {
            let label = rest
                .strip_suffix("-----")
                .ok_or_else(|| KmiError::bad_key("malformed PEM: bad -----BEGIN line"))?;
            break label.to_owned();
        }
    };
    let end = format!("-----END {label}-----");
    let mut headers = Vec::new();
    let mut b64 = String::new();
    let mut in_headers = true;
    let mut ended = false;
    for line in lines {
        let line = line.trim();
        if line == end {
            ended = true;
            break;
        }
        if in_headers {
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
                continue;
            }
            in_headers = false;
            if line.is_empty() {
                continue;
            }
        }
        b64.push_str(line);
    }
    if !ended {
        return Err(KmiError::bad_key(format!(
            "malformed PEM: missing '{end}' (truncated key?)"
        )));
    }
    let body = STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| KmiError::bad_key(format!("malformed PEM: bad base64 body ({e})")))?;
    if body.is_empty() {
        return Err(KmiError::bad_key("malformed PEM: empty body"));
    }
    Ok(PemBlock {
        label,
        headers,
        body,
    })
}

/// Decode a KEK PEM of any supported flavour into PKCS#1 `RSAPrivateKey` DER.
pub fn decode_private_key(pem: &[u8], passphrase: &[u8]) -> KmiResult<Zeroizing<Vec<u8>>> {
    let block = parse_block(pem)?;
    let body = Zeroizing::new(block.body);
    match block.label.as_str() {
        "RSA PRIVATE KEY" => {
            let encrypted = block
                .headers
                .iter()
                .any(|(k, v)| k == "Proc-Type" && v.ends_with("ENCRYPTED"));
            if !encrypted {
                return Ok(body);
            }
            let dek_info = block
                .headers
                .iter()
                .find(|(k, _)| k == "DEK-Info")
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| {
                    KmiError::bad_key("malformed PEM: encrypted key without DEK-Info")
                })?;
            legacy_decrypt(dek_info, &body, passphrase)
        }
        "PRIVATE KEY" => pkcs8_rsa_key(&body),
        "ENCRYPTED PRIVATE KEY" => {
            let info = pkcs8::EncryptedPrivateKeyInfoRef::from_der(&body).map_err(|e| {
                KmiError::bad_key(format!("malformed PEM: bad PKCS#8 structure ({e})"))
            })?;
            check_kdf_cost(&info)?;
            if let Some(der) = pbkdf2_sha256_decrypt(&info, passphrase) {
                return pkcs8_rsa_key(&der?);
            }
            let doc = info.decrypt(passphrase).map_err(pkcs8_error)?;
            pkcs8_rsa_key(doc.as_bytes())
        }
        "EC PRIVATE KEY" | "DSA PRIVATE KEY" | "OPENSSH PRIVATE KEY" => Err(KmiError::bad_key(
            format!("not an RSA key: the PEM holds a {}", block.label),
        )),
        other => Err(KmiError::bad_key(format!(
            "malformed PEM: '{other}' is not a private key label"
        ))),
    }
}

/// PBKDF2 rounds above this are refused: 600000 is today's usual count, and
/// ten million already takes about a second and a half.
const MAX_PBKDF2_ROUNDS: u32 = 10_000_000;
/// scrypt memory (128 * N * r bytes) above this is refused (N = 2^20, r = 8).
const MAX_SCRYPT_BYTES: u128 = 1 << 30;

/// Refuse KDF parameters that would take minutes, exhaust memory, or that
/// the KDF implementation cannot handle (scrypt N = 0 panics inside pkcs5).
fn check_kdf_cost(info: &pkcs8::EncryptedPrivateKeyInfoRef<'_>) -> KmiResult<()> {
    let pkcs8::pkcs5::EncryptionScheme::Pbes2(params) = &info.encryption_algorithm else {
        return Ok(());
    };
    if let Some(p) = params.kdf.pbkdf2() {
        if !(1..=MAX_PBKDF2_ROUNDS).contains(&p.iteration_count) {
            return Err(KmiError::bad_key(format!(
                "unsupported algorithm parameters: PBKDF2 iteration count {} is outside 1..={MAX_PBKDF2_ROUNDS}",
                p.iteration_count
            )));
        }
    }
    if let Some(p) = params.kdf.scrypt() {
        let (n, r, par) = (
            u128::from(p.cost_parameter),
            u128::from(p.block_size),
            u128::from(p.parallelization),
        );
        let sane = n >= 2 && n.is_power_of_two() && r >= 1 && par >= 1;
        if !sane || 128 * n * r > MAX_SCRYPT_BYTES || 128 * r * par > MAX_SCRYPT_BYTES {
            return Err(KmiError::bad_key(format!(
                "unsupported algorithm parameters: scrypt N={n}, r={r}, p={par} (at most 1 GiB of memory)"
            )));
        }
    }
    Ok(())
}

/// PBES2 with PBKDF2-HMAC-SHA256 (what pycryptodome 4.x writes, at 600000
/// iterations) through our own PBKDF2, which costs half of the generic one.
/// `None` for every other scheme, which the pkcs8 crate decrypts.
fn pbkdf2_sha256_decrypt(
    info: &pkcs8::EncryptedPrivateKeyInfoRef<'_>,
    passphrase: &[u8],
) -> Option<KmiResult<Zeroizing<Vec<u8>>>> {
    use pkcs8::pkcs5::pbes2::{EncryptionScheme as Cipher, Pbkdf2Prf};
    let pkcs8::pkcs5::EncryptionScheme::Pbes2(params) = &info.encryption_algorithm else {
        return None;
    };
    let kdf = params.kdf.pbkdf2()?;
    if kdf.prf != Pbkdf2Prf::HmacWithSha256 {
        return None;
    }
    let cipher = params.encryption;
    let key_len = cipher.key_size();
    if kdf.key_length.is_some_and(|n| n as usize != key_len) {
        return None;
    }
    let key = kdf::pbkdf2_hmac_sha256(
        passphrase,
        kdf.salt.as_bytes(),
        kdf.iteration_count,
        key_len,
    );
    let body = info.encrypted_data.as_bytes();
    let plain = match cipher {
        Cipher::Aes128Cbc { iv } => cbc_decrypt::<aes::Aes128>(&key, &iv, body),
        Cipher::Aes192Cbc { iv } => cbc_decrypt::<aes::Aes192>(&key, &iv, body),
        Cipher::Aes256Cbc { iv } => cbc_decrypt::<aes::Aes256>(&key, &iv, body),
        Cipher::DesEde3Cbc { iv } => cbc_decrypt::<des::TdesEde3>(&key, &iv, body),
        _ => return None,
    };
    Some(plain.ok_or_else(|| KmiError::bad_key("wrong passphrase for the encrypted PKCS#8 KEK")))
}

fn pkcs8_error(e: pkcs8::Error) -> KmiError {
    match e {
        pkcs8::Error::EncryptedPrivateKey(pkcs8::pkcs5::Error::DecryptFailed) => {
            KmiError::bad_key("wrong passphrase for the encrypted PKCS#8 KEK")
        }
        pkcs8::Error::EncryptedPrivateKey(pkcs8::pkcs5::Error::UnsupportedAlgorithm { oid }) => {
            KmiError::bad_key(format!(
                "unsupported algorithm {oid} protects the PKCS#8 KEK"
            ))
        }
        pkcs8::Error::EncryptedPrivateKey(pkcs8::pkcs5::Error::NoPbes1CryptSupport) => {
            KmiError::bad_key("unsupported algorithm: PBES1 protects the PKCS#8 KEK")
        }
        pkcs8::Error::EncryptedPrivateKey(e) => KmiError::bad_key(format!(
            "unsupported algorithm parameters in the PKCS#8 KEK ({e})"
        )),
        // A decryption that "succeeds" into garbage is almost always a wrong passphrase.
        other => KmiError::bad_key(format!("wrong passphrase or corrupt PKCS#8 KEK ({other})")),
    }
}

fn pkcs8_rsa_key(der: &[u8]) -> KmiResult<Zeroizing<Vec<u8>>> {
    let info = pkcs8::PrivateKeyInfoRef::from_der(der).map_err(|e| {
        KmiError::bad_key(format!("wrong passphrase or malformed PKCS#8 KEK ({e})"))
    })?;
    let oid = info.algorithm.oid.to_string();
    if oid != RSA_ENCRYPTION_OID {
        return Err(KmiError::bad_key(format!(
            "not an RSA key: PKCS#8 algorithm {oid}"
        )));
    }
    Ok(Zeroizing::new(info.private_key.as_bytes().to_vec()))
}

/// The legacy ciphers OpenSSL writes into `DEK-Info`: (name, key length, IV length).
const LEGACY_CIPHERS: &[(&str, usize, usize)] = &[
    ("DES-CBC", 8, 8),
    ("DES-EDE3-CBC", 24, 8),
    ("AES-128-CBC", 16, 16),
    ("AES-192-CBC", 24, 16),
    ("AES-256-CBC", 32, 16),
];

/// OpenSSL `EVP_BytesToKey` with MD5 and one round, as legacy PEM encryption uses it.
pub fn bytes_to_key(passphrase: &[u8], salt: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    let mut key = Zeroizing::new(Vec::with_capacity(len + 16));
    let mut prev: Option<[u8; 16]> = None;
    while key.len() < len {
        let mut h = Md5::new();
        if let Some(p) = prev {
            h.update(p);
        }
        h.update(passphrase);
        h.update(salt);
        let d: [u8; 16] = h.finalize().into();
        key.extend_from_slice(&d);
        prev = Some(d);
    }
    key.truncate(len);
    key
}

fn legacy_decrypt(dek_info: &str, body: &[u8], passphrase: &[u8]) -> KmiResult<Zeroizing<Vec<u8>>> {
    let (alg, iv_hex) = dek_info
        .split_once(',')
        .ok_or_else(|| KmiError::bad_key("malformed PEM: bad DEK-Info header"))?;
    let &(_, key_len, iv_len) = LEGACY_CIPHERS
        .iter()
        .find(|(name, _, _)| name.eq_ignore_ascii_case(alg.trim()))
        .ok_or_else(|| {
            KmiError::bad_key(format!("unsupported algorithm {alg} protects the KEK"))
        })?;
    let iv = hex::decode(iv_hex.trim())
        .ok()
        .filter(|iv| iv.len() == iv_len)
        .ok_or_else(|| KmiError::bad_key("malformed PEM: bad IV in DEK-Info"))?;
    let key = bytes_to_key(passphrase, &iv[..8], key_len);
    let plain = match key_len {
        8 => cbc_decrypt::<des::Des>(&key, &iv, body),
        24 if iv_len == 8 => cbc_decrypt::<des::TdesEde3>(&key, &iv, body),
        16 => cbc_decrypt::<aes::Aes128>(&key, &iv, body),
        24 => cbc_decrypt::<aes::Aes192>(&key, &iv, body),
        _ => cbc_decrypt::<aes::Aes256>(&key, &iv, body),
    };
    plain.ok_or_else(|| {
        KmiError::bad_key("wrong passphrase for the encrypted KEK (or a corrupt key)")
    })
}

fn cbc_decrypt<C>(key: &[u8], iv: &[u8], body: &[u8]) -> Option<Zeroizing<Vec<u8>>>
where
    C: cbc::cipher::BlockCipherDecrypt + cbc::cipher::KeyInit,
{
    let dec = cbc::Decryptor::<C>::new_from_slices(key, iv).ok()?;
    dec.decrypt_padded_vec::<Pkcs7>(body)
        .ok()
        .map(Zeroizing::new)
}

/// Armour PKCS#1 DER the way keas.kmi 3.0-3.2 (PyCrypto) wrote KEKs: legacy
/// DES-EDE3-CBC encryption under `passphrase`, a random 8-byte IV, base64 in
/// 64-character lines, and no newline after the END line.
pub fn encode_legacy_pem(der: &[u8], passphrase: &[u8]) -> KmiResult<Vec<u8>> {
    let mut iv = [0u8; 8];
    getrandom::fill(&mut iv).map_err(|e| KmiError::Io(std::io::Error::other(e)))?;
    let key = bytes_to_key(passphrase, &iv, 24);
    let enc = cbc::Encryptor::<des::TdesEde3>::new_from_slices(&key, &iv)
        .map_err(|_| KmiError::BadArgument("3DES key setup failed".into()))?;
    let body = enc.encrypt_padded_vec::<Pkcs7>(der);
    let b64 = STANDARD.encode(body);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 160);
    out.push_str(
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: DES-EDE3-CBC,",
    );
    out.push_str(&hex::encode_upper(iv));
    out.push_str("\n\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END RSA PRIVATE KEY-----");
    Ok(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_to_key_matches_openssl() {
        // openssl enc -des-ede3-cbc -P -md md5 -k secret -S 0102030405060708
        let key = bytes_to_key(b"secret", &[1, 2, 3, 4, 5, 6, 7, 8], 24);
        assert_eq!(
            hex::encode_upper(&*key),
            "C9E5A1BD216DBE1317E230CEF48F38EE7F0E17AD64022144"
        );
    }

    #[test]
    fn legacy_round_trip() {
        let der = b"not really DER but any bytes do".to_vec();
        let pem = encode_legacy_pem(&der, b"pw").unwrap();
        let text = std::str::from_utf8(&pem).unwrap();
        assert!(text.starts_with(
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: DES-EDE3-CBC,"
        ));
        assert!(text.ends_with("\n-----END RSA PRIVATE KEY-----"));
        assert_eq!(&*decode_private_key(&pem, b"pw").unwrap(), &der);
        let err = decode_private_key(&pem, b"wrong");
        // A wrong passphrase fails the padding check (or, rarely, the DER parse later).
        if let Err(e) = err {
            assert!(e.to_string().contains("passphrase"));
        }
    }

    #[test]
    fn malformed_inputs_name_the_cause() {
        for (pem, needle) in [
            (&b"garbage"[..], "malformed PEM"),
            (b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n", "truncated"),
            (b"-----BEGIN RSA PRIVATE KEY-----\n!!!\n-----END RSA PRIVATE KEY-----", "base64"),
            (b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----", "not an RSA key"),
            (
                b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: BF-CBC,0102030405060708\n\nAAAA\n-----END RSA PRIVATE KEY-----",
                "unsupported algorithm",
            ),
        ] {
            let err = decode_private_key(pem, b"x").unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}
