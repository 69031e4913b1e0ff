//! Key-encrypting keys: RSA key pairs that wrap and unwrap data-encrypting keys
//! (RSAES-PKCS1-v1_5, block type 2).

use getrandom::SysRng;
use rsa::hazmat::rsa_decrypt_and_check;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::traits::PublicKeyParts;
use rsa::{BoxedUint, PrivateKey};
use zeroize::Zeroizing;

use crate::errors::{KmiError, KmiResult};
use crate::pem;

/// The published 512-bit, e = 161 testing KEK of keas.kmi (unencrypted
/// PKCS#1): `keas.kmi.testing` hands it out, test databases are encrypted
/// under it, and the tests and fuzz targets use it.
pub const TESTING_KEK: &[u8] = b"-----BEGIN RSA PRIVATE KEY-----
MIIBOAIBAAJBAL+VS9lDsS9XOaeJppfK9lhxKMRFdcg50MR3aJEQK9rvDEqNwBS9
rQlU/x/NWxG0vvFCnrDn7VvQN+syb3+a0DMCAgChAkAzKw3lwPxw0VVccq1J7qeO
4DXR1iEMIoWruiCyq0aLkHnQzrZpaHnd4w+JNKIGOVDEWItf3iZNMXkoqj2hoPmp
AiEA5kWTkYrfH+glJUfV/GvU6jcPSNctcJCnqTfMjQU0KEUCIQDU/R3iz5Lojw1S
R1v6C5gdY/mrQydegHVGFS/p276KFwIgDk124UnRb7IyAlDI6xteUVSDVZ4Pivd+
fP6yEkylbQkCIDo1Ri4VvzRtDsVkmFdqhcucHhIu+UTCHN6uVjy7QmIpAiB7Gl9m
F4a4UlXVivb82J7ew3ZABnFIC9Q+dHW7WeZhxg==
-----END RSA PRIVATE KEY-----
";

/// SHA-256 of the testing KEK's SubjectPublicKeyInfo DER (from the openssl command).
#[cfg(test)]
const TESTING_KEK_FINGERPRINT: &str =
    "22b1de414551fb1d6e48e0de1b5b2a05cd139a685b28c409fbf767f32d681b51";

/// Moduli above this are refused before any arithmetic, so an absurd KEK fails fast.
pub const MAX_MODULUS_BITS: usize = 16384;

/// PKCS#1 v1.5 needs at least eight non-zero padding bytes.
const MIN_PADDING: usize = 8;

pub struct Kek {
    key: PrivateKey,
}

impl Kek {
    /// A fresh RSA key pair from the OS CSPRNG.
    pub fn generate(bits: usize, exponent: u64) -> KmiResult<Kek> {
        if !(1024..=MAX_MODULUS_BITS).contains(&bits) {
            return Err(KmiError::BadArgument(format!(
                "rsaKeyLength must be between 1024 and {MAX_MODULUS_BITS} bits, not {bits}"
            )));
        }
        if exponent < 3 || exponent.is_multiple_of(2) {
            return Err(KmiError::BadArgument(format!(
                "rsaKeyExponent must be an odd integer >= 3, not {exponent}"
            )));
        }
        let key = PrivateKey::new_with_exp(&mut SysRng, bits, BoxedUint::from(exponent))
            .map_err(|e| KmiError::BadArgument(format!("RSA key generation failed: {e}")))?;
        Ok(Kek { key })
    }

    /// Read a KEK from PEM bytes in any flavour deployments hold.
    pub fn from_pem(pem_bytes: &[u8], passphrase: &[u8]) -> KmiResult<Kek> {
        // Defence in depth: a panic in a parser is a bad key, never a crash.
        let der = std::panic::catch_unwind(|| pem::decode_private_key(pem_bytes, passphrase))
            .map_err(|_| KmiError::bad_key("malformed KEK: its encoding could not be parsed"))??;
        Self::from_pkcs1_der(&der)
    }

    fn from_pkcs1_der(der: &[u8]) -> KmiResult<Kek> {
        use pkcs1::der::Decode;
        let parsed = pkcs1::RsaPrivateKeyRef::from_der(der).map_err(|e| {
            KmiError::bad_key(format!(
                "wrong passphrase or malformed RSA key: the PKCS#1 structure does not parse ({e})"
            ))
        })?;
        let modulus = parsed.modulus.as_bytes();
        let leading_zeros = modulus.iter().take_while(|b| **b == 0).count();
        let bits = (modulus.len() - leading_zeros) * 8;
        if bits > MAX_MODULUS_BITS + 8 {
            return Err(KmiError::bad_key(format!(
                "RSA modulus of about {bits} bits is larger than the {MAX_MODULUS_BITS}-bit limit"
            )));
        }
        let key = PrivateKey::from_pkcs1_der(der)
            .map_err(|e| KmiError::bad_key(format!("inconsistent RSA key: {e}")))?;
        Ok(Kek { key })
    }

    /// The modulus length in bits.
    pub fn bits(&self) -> usize {
        self.key.n().bit_width_vartime() as usize
    }

    /// SHA-256 of the public key's SubjectPublicKeyInfo DER: names the KEK
    /// in key metadata without revealing it.
    pub fn public_fingerprint(&self) -> KmiResult<[u8; 32]> {
        use rsa::pkcs8::EncodePublicKey;
        use sha2::Digest;
        let der = self
            .key
            .as_public_key()
            .to_public_key_der()
            .map_err(|e| KmiError::BadArgument(format!("cannot encode the public key: {e}")))?;
        Ok(sha2::Sha256::digest(der.as_bytes()).into())
    }

    /// PKCS#1 DER of the private key, legacy-PEM-armoured under `passphrase`.
    pub fn to_legacy_pem(&self, passphrase: &[u8]) -> KmiResult<Vec<u8>> {
        let der = self
            .key
            .to_pkcs1_der()
            .map_err(|e| KmiError::BadArgument(format!("cannot encode the RSA key: {e}")))?;
        pem::encode_legacy_pem(der.as_bytes(), passphrase)
    }

    /// RSAES-PKCS1-v1_5 encryption of a DEK under the public key.
    pub fn wrap_dek(&self, dek: &[u8]) -> KmiResult<Vec<u8>> {
        self.key.as_public_key().pkcs1v15_encrypt(dek).map_err(|e| {
            KmiError::BadArgument(format!("cannot wrap a {}-byte DEK: {e}", dek.len()))
        })
    }

    /// Recover a DEK wrapped by [`Kek::wrap_dek`].
    ///
    /// The `rsa` crate's own PKCS#1 v1.5 decryption uses implicit rejection: on
    /// bad padding it returns random bytes. A KMS must never hand out a wrong
    /// DEK, so this checks the padding explicitly, and the DEK length against
    /// `dek_lengths` when that is not empty. (The caller of a KMS holds the KEK,
    /// so there is no padding oracle to protect here.)
    pub fn unwrap_dek(
        &self,
        wrapped: &[u8],
        dek_lengths: &[usize],
    ) -> KmiResult<Zeroizing<Vec<u8>>> {
        let k = self.key.size();
        if wrapped.len() != k {
            return Err(KmiError::bad_data(format!(
                "wrapped DEK has {} bytes, the KEK needs {k} (corrupt .dek file or mismatched KEK)",
                wrapped.len()
            )));
        }
        let c = BoxedUint::from_be_slice(wrapped, self.key.n_bits_precision())
            .map_err(|_| KmiError::bad_data("wrapped DEK does not fit the KEK's modulus"))?;
        // No blinding: it defends a private key against timing by whoever
        // chooses ciphertexts, and here the caller supplies the private key
        // itself, while the ciphertext comes from our own store. It halves
        // the cost of a cold DEK lookup.
        let m = Zeroizing::new(
            rsa_decrypt_and_check(&self.key, None::<&mut SysRng>, &c)
                .map_err(|_| KmiError::bad_data("wrapped DEK does not decrypt under this KEK (corrupt .dek file or mismatched KEK)"))?,
        );
        let raw = Zeroizing::new(m.to_be_bytes());
        // Left-pad to k bytes: the precision may be wider than the modulus.
        let mut em = Zeroizing::new(vec![0u8; k]);
        let take = raw.len().min(k);
        em[k - take..].copy_from_slice(&raw[raw.len() - take..]);
        let bad = || {
            KmiError::bad_data(
                "wrapped DEK has invalid PKCS#1 v1.5 padding (corrupt .dek file or mismatched KEK)",
            )
        };
        if em[0] != 0 || em[1] != 2 {
            return Err(bad());
        }
        let sep = em[2..].iter().position(|b| *b == 0).ok_or_else(bad)? + 2;
        if sep < 2 + MIN_PADDING || sep + 1 == k {
            return Err(bad());
        }
        let dek = Zeroizing::new(em[sep + 1..].to_vec());
        if !dek_lengths.is_empty() && !dek_lengths.contains(&dek.len()) {
            return Err(KmiError::bad_data(format!(
                "unwrapped DEK has {} bytes, expected one of {dek_lengths:?} (corrupt .dek file or mismatched KEK)",
                dek.len()
            )));
        }
        Ok(dek)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn testing_kek_wraps_and_unwraps() {
        let kek = Kek::from_pem(TESTING_KEK, b"ignored").unwrap();
        assert_eq!(kek.bits(), 512);
        let dek = [7u8; 32];
        let wrapped = kek.wrap_dek(&dek).unwrap();
        assert_eq!(wrapped.len(), 64);
        assert_eq!(&*kek.unwrap_dek(&wrapped, &[32]).unwrap(), &dek);
    }

    #[test]
    fn corrupt_wrapped_dek_is_an_error_never_a_wrong_key() {
        let kek = Kek::from_pem(TESTING_KEK, b"").unwrap();
        let wrapped = kek.wrap_dek(&[9u8; 32]).unwrap();
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x40;
            match kek.unwrap_dek(&bad, &[32]) {
                Err(KmiError::BadData(_)) => {}
                Ok(dek) => panic!("flipped byte {i} unwrapped to {dek:?}"),
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
        assert!(kek.unwrap_dek(&wrapped[1..], &[32]).is_err());
    }

    #[test]
    fn generated_kek_round_trips_through_legacy_pem() {
        let kek = Kek::generate(1024, 65537).unwrap();
        let pem = kek.to_legacy_pem(b"key management facility").unwrap();
        let again = Kek::from_pem(&pem, b"key management facility").unwrap();
        let wrapped = kek.wrap_dek(&[1u8; 64]).unwrap();
        assert_eq!(&*again.unwrap_dek(&wrapped, &[64]).unwrap(), &[1u8; 64]);
        assert!(Kek::from_pem(&pem, b"not it").is_err());
    }

    #[test]
    fn scrypt_with_zero_cost_is_a_bad_key() {
        // Found by fuzz/pem_import: pkcs5 panics on N = 0.
        let der = hex::decode(
            "3062304e06092a864886f70d01050d3041302006092b06010401da47040b30130408000000000000\
             0000020100020101020101301d060960864801650304012a0410000000000000000000000000000000\
             00041000000000000000000000000000000000",
        )
        .unwrap();
        use base64::Engine;
        let pem = format!(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\n{}\n-----END ENCRYPTED PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        );
        let err = Kek::from_pem(pem.as_bytes(), b"x").err().expect("refused");
        assert!(matches!(err, KmiError::BadKey(_)), "{err:?}");
    }

    #[test]
    fn the_fingerprint_is_sha256_of_the_spki_der() {
        // openssl rsa -in testing.pem -pubout -outform DER | sha256sum
        let kek = Kek::from_pem(TESTING_KEK, b"").unwrap();
        assert_eq!(
            hex::encode(kek.public_fingerprint().unwrap()),
            TESTING_KEK_FINGERPRINT
        );
    }

    #[test]
    fn absurd_parameters_are_refused() {
        assert!(Kek::generate(512, 65537).is_err());
        assert!(Kek::generate(2048, 4).is_err());
    }
}
