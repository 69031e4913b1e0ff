//! The master key management facility's key work: generates KEKs and wraps
//! fresh DEKs with them, unwraps stored DEKs, and caches unwrapped DEKs (and
//! their expanded AES keys) for `timeout` seconds. Where the wrapped DEKs
//! live is the caller's business: the directory of [`crate::store`], or a
//! database.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use zeroize::Zeroizing;

use crate::cipher::{derive_cipher_key, DataCipher};
use crate::errors::{KmiError, KmiResult};
use crate::kek::Kek;
use crate::v2::V2Key;

/// What a caller passes on every DEK lookup: the facility's overridable attributes.
pub struct DekPolicy<'a> {
    /// Seconds a cached DEK stays valid (`timeout`).
    pub timeout: f64,
    /// Protects legacy-encrypted and PKCS#8 KEKs (`rsaPassphrase`).
    pub passphrase: &'a [u8],
    /// Acceptable DEK lengths besides `modulus_bits / 16` (`keyLength`).
    pub dek_length: usize,
}

/// A new key: the KEK for the client, the wrapped DEK for the store, and
/// what the key's metadata records of it.
pub struct Generated {
    pub name: String,
    pub pem: Vec<u8>,
    pub wrapped: Vec<u8>,
    /// The v2 kid of the DEK.
    pub kid: [u8; 16],
    /// SHA-256 of the KEK's public key (SubjectPublicKeyInfo DER).
    pub fingerprint: [u8; 32],
}

/// A cached, unwrapped DEK and the cipher derived from it.
pub struct CachedDek {
    kek: Box<[u8]>,
    kek_hash: u64,
    pub name: String,
    pub fetched: f64,
    pub dek: Zeroizing<Vec<u8>>,
    cipher: Option<(Vec<u8>, Arc<DataCipher>)>,
    v2: Option<Arc<V2Key>>,
    /// The key's state (from its metadata) and when it was last read.
    state: KeyState,
    state_read: f64,
}

/// What a server needs of a cached DEK: the DEK, its v2 keys and its name.
pub type Serving = (Zeroizing<Vec<u8>>, Arc<V2Key>, String);

/// A cached entry's key state, or its name when the state is due to be read again.
pub type StateCheck = Result<KeyState, String>;

/// A key's state (NIST SP 800-57), as far as serving its DEK goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Deactivated,
    Suspended,
    Compromised,
    Destroyed,
}

impl KeyState {
    pub fn parse(text: &str) -> KmiResult<KeyState> {
        Ok(match text {
            "active" => KeyState::Active,
            "deactivated" => KeyState::Deactivated,
            "suspended" => KeyState::Suspended,
            "compromised" => KeyState::Compromised,
            "destroyed" => KeyState::Destroyed,
            other => return Err(KmiError::BadData(format!("unknown key state {other:?}"))),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Deactivated => "deactivated",
            KeyState::Suspended => "suspended",
            KeyState::Compromised => "compromised",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// Whether the DEK may be used: to decrypt in active and deactivated
    /// keys, to encrypt in active ones only.
    pub fn allows(self, encrypting: bool) -> bool {
        match self {
            KeyState::Active => true,
            KeyState::Deactivated => !encrypting,
            _ => false,
        }
    }
}

/// A KEK as the DEK cache finds it: its bytes, and a hash of them that the
/// caller may already have (Python caches a `bytes` object's hash, so a
/// warm call need not hash the ~1.7 KB again; it still compares them).
#[derive(Clone, Copy)]
pub struct KekId<'a> {
    pub bytes: &'a [u8],
    pub hash: u64,
}

impl<'a> KekId<'a> {
    pub fn hashed(bytes: &'a [u8], hash: u64) -> KekId<'a> {
        KekId { bytes, hash }
    }
}

impl<'a> From<&'a [u8]> for KekId<'a> {
    fn from(bytes: &'a [u8]) -> KekId<'a> {
        use std::hash::BuildHasher;
        static SEED: std::sync::OnceLock<foldhash::fast::RandomState> = std::sync::OnceLock::new();
        let hash = SEED.get_or_init(Default::default).hash_one(bytes);
        KekId { bytes, hash }
    }
}

impl<'a> From<&'a Vec<u8>> for KekId<'a> {
    fn from(bytes: &'a Vec<u8>) -> KekId<'a> {
        KekId::from(&bytes[..])
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for KekId<'a> {
    fn from(bytes: &'a [u8; N]) -> KekId<'a> {
        KekId::from(&bytes[..])
    }
}

/// Cached DEKs, found by their KEK's hash and exact bytes.
type DekMap = hashbrown::HashTable<CachedDek>;

fn find<'m>(deks: &'m mut DekMap, kek: KekId<'_>) -> Option<&'m mut CachedDek> {
    deks.find_mut(kek.hash, |e| e.kek_hash == kek.hash && *e.kek == *kek.bytes)
}

pub struct Facility {
    deks: Mutex<DekMap>,
    max_cached: usize,
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The storage name of a KEK: the md5 hex digest of its exact bytes.
pub fn kek_name(kek: &[u8]) -> String {
    hex::encode(Md5::digest(kek))
}

fn wrap_new(kek: &Kek, pem: Vec<u8>, dek: &[u8]) -> KmiResult<Generated> {
    Ok(Generated {
        name: kek_name(&pem),
        wrapped: kek.wrap_dek(dek)?,
        kid: *V2Key::new(dek).kid(),
        fingerprint: kek.public_fingerprint()?,
        pem,
    })
}

/// Unwrap a stored DEK with its KEK, checking the padding and the length:
/// what a client in wrapped mode does locally.
pub fn unwrap_with(
    kek: &[u8],
    name: &str,
    wrapped: &[u8],
    policy: &DekPolicy,
) -> KmiResult<Zeroizing<Vec<u8>>> {
    let key = Kek::from_pem(kek, policy.passphrase)?;
    let lengths = [key.bits() / 16, policy.dek_length];
    key.unwrap_dek(wrapped, &lengths).map_err(|e| match e {
        KmiError::BadData(m) => KmiError::BadData(format!("key {name}: {m}")),
        other => other,
    })
}

impl Facility {
    pub fn new(max_cached: usize) -> Facility {
        Facility {
            deks: Mutex::new(DekMap::new()),
            max_cached: max_cached.max(1),
        }
    }

    fn deks(&self) -> MutexGuard<'_, DekMap> {
        self.deks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Generate a KEK and wrap a fresh DEK of `dek_length` bytes with it.
    /// The caller stores the wrapped DEK (durably) before handing out the KEK.
    pub fn generate(
        &self,
        bits: usize,
        exponent: u64,
        passphrase: &[u8],
        dek_length: usize,
    ) -> KmiResult<Generated> {
        if dek_length == 0 {
            return Err(KmiError::BadArgument("keyLength must be positive".into()));
        }
        let kek = Kek::generate(bits, exponent)?;
        let pem = kek.to_legacy_pem(passphrase)?;
        let mut dek = Zeroizing::new(vec![0u8; dek_length]);
        getrandom::fill(&mut dek).map_err(|e| KmiError::Io(std::io::Error::other(e)))?;
        wrap_new(&kek, pem, &dek)
    }

    /// Wrap the DEK that `old_kek` unwraps under a new KEK (same modulus size
    /// and exponent as the old one unless given): the same DEK, and so the
    /// same kid, under a new name.
    pub fn rewrap(
        &self,
        old_kek: &[u8],
        name: &str,
        wrapped: &[u8],
        policy: &DekPolicy,
        exponent: u64,
    ) -> KmiResult<Generated> {
        let old = Kek::from_pem(old_kek, policy.passphrase)?;
        let dek = old
            .unwrap_dek(wrapped, &[old.bits() / 16, policy.dek_length])
            .map_err(|e| match e {
                KmiError::BadData(m) => KmiError::BadData(format!("key {name}: {m}")),
                other => other,
            })?;
        let kek = Kek::generate(old.bits(), exponent)?;
        let pem = kek.to_legacy_pem(policy.passphrase)?;
        wrap_new(&kek, pem, &dek)
    }

    /// `f` of the cached entry of `kek` if it is younger than `timeout`
    /// seconds, with its key state (or, when the state was read more than
    /// `state_age` seconds ago, the key's name to read it again): one hash of
    /// the ~1.7 KB KEK per call.
    fn fresh<T>(
        &self,
        kek: KekId<'_>,
        timeout: f64,
        state_age: f64,
        f: impl FnOnce(&mut CachedDek) -> KmiResult<T>,
    ) -> KmiResult<Option<(T, StateCheck)>> {
        let mut deks = self.deks();
        let Some(entry) = find(&mut deks, kek) else {
            return Ok(None);
        };
        let now = now();
        if entry.fetched + timeout <= now {
            return Ok(None);
        }
        let state = if entry.state_read + state_age > now {
            Ok(entry.state)
        } else {
            Err(entry.name.clone())
        };
        Ok(Some((f(entry)?, state)))
    }

    /// What a server answers for a cached `kek`: the DEK, its v2 keys (for
    /// the kid) and its name, with the state check, in one lookup.
    pub fn cached_serving<'k>(
        &self,
        kek: impl Into<KekId<'k>>,
        timeout: f64,
        state_age: f64,
    ) -> Option<(Serving, StateCheck)> {
        self.fresh(kek.into(), timeout, state_age, |entry| {
            let dek = &entry.dek;
            let v2 = entry
                .v2
                .get_or_insert_with(|| Arc::new(V2Key::new(dek)))
                .clone();
            Ok((entry.dek.clone(), v2, entry.name.clone()))
        })
        .expect("cannot fail")
    }

    /// The DEK for `kek` if it is cached and younger than `timeout` seconds.
    pub fn cached_dek<'k>(
        &self,
        kek: impl Into<KekId<'k>>,
        timeout: f64,
        state_age: f64,
    ) -> Option<(Zeroizing<Vec<u8>>, StateCheck)> {
        self.fresh(kek.into(), timeout, state_age, |e| Ok(e.dek.clone()))
            .expect("cannot fail")
    }

    /// Unwrap `wrapped`, the stored DEK named `name`, with `kek`, and cache
    /// it with the key's `state` as just read.
    pub fn unwrap<'k>(
        &self,
        kek: impl Into<KekId<'k>>,
        name: &str,
        wrapped: &[u8],
        policy: &DekPolicy,
        state: KeyState,
    ) -> KmiResult<Zeroizing<Vec<u8>>> {
        let kek = kek.into();
        let dek = unwrap_with(kek.bytes, name, wrapped, policy)?;
        self.remember(
            kek,
            name.to_owned(),
            now(),
            dek.clone(),
            policy.timeout,
            state,
        );
        Ok(dek)
    }

    /// Record the state just read for `kek`'s key.
    pub fn set_state<'k>(&self, kek: impl Into<KekId<'k>>, state: KeyState) {
        if let Some(entry) = find(&mut self.deks(), kek.into()) {
            entry.state = state;
            entry.state_read = now();
        }
    }

    fn remember<'k>(
        &self,
        kek: impl Into<KekId<'k>>,
        name: String,
        fetched: f64,
        dek: Zeroizing<Vec<u8>>,
        timeout: f64,
        state: KeyState,
    ) {
        let kek = kek.into();
        let mut deks = self.deks();
        if let Some(old) = find(&mut deks, kek) {
            // Unwrapped again (its cache entry had expired): refresh it.
            old.name = name;
            old.fetched = fetched;
            old.dek = dek;
            old.cipher = None;
            old.v2 = None;
            old.state = state;
            old.state_read = fetched;
            return;
        }
        if deks.len() >= self.max_cached {
            evict(&mut deks, self.max_cached, fetched - timeout);
        }
        deks.insert_unique(
            kek.hash,
            CachedDek {
                kek: kek.bytes.into(),
                kek_hash: kek.hash,
                name,
                fetched,
                dek,
                cipher: None,
                v2: None,
                state,
                state_read: fetched,
            },
            |e| e.kek_hash,
        );
    }

    /// The data cipher for `kek` under `salt` if its DEK is cached and fresh:
    /// derived once per cached DEK, so a hit costs a hash lookup.
    pub fn cached_cipher<'k>(
        &self,
        kek: impl Into<KekId<'k>>,
        timeout: f64,
        salt: &[u8],
        state_age: f64,
    ) -> KmiResult<Option<(Arc<DataCipher>, StateCheck)>> {
        self.fresh(kek.into(), timeout, state_age, |entry| {
            if let Some((s, c)) = &entry.cipher {
                if s == salt {
                    return Ok(c.clone());
                }
            }
            let cipher = Arc::new(DataCipher::new(&*derive_cipher_key(&entry.dek, salt)?));
            entry.cipher = Some((salt.to_vec(), cipher.clone()));
            Ok(cipher)
        })
    }

    /// The data cipher for a DEK just unwrapped for `kek`, remembered beside it.
    pub fn remember_cipher<'k>(
        &self,
        kek: impl Into<KekId<'k>>,
        dek: &[u8],
        salt: &[u8],
    ) -> KmiResult<Arc<DataCipher>> {
        let cipher = Arc::new(DataCipher::new(&*derive_cipher_key(dek, salt)?));
        if let Some(entry) = find(&mut self.deks(), kek.into()) {
            entry.cipher = Some((salt.to_vec(), cipher.clone()));
        }
        Ok(cipher)
    }

    /// The v2 keys for `kek` if its DEK is cached and fresh: derived once
    /// per cached DEK.
    pub fn cached_v2<'k>(
        &self,
        kek: impl Into<KekId<'k>>,
        timeout: f64,
        state_age: f64,
    ) -> Option<(Arc<V2Key>, StateCheck)> {
        self.fresh(kek.into(), timeout, state_age, |entry| {
            let dek = &entry.dek;
            Ok(entry
                .v2
                .get_or_insert_with(|| Arc::new(V2Key::new(dek)))
                .clone())
        })
        .expect("cannot fail")
    }

    /// A snapshot of the DEK cache: (md5 name, fetch time, DEK).
    pub fn cached_deks(&self) -> Vec<(String, f64, Zeroizing<Vec<u8>>)> {
        self.deks()
            .iter()
            .map(|e| (e.name.clone(), e.fetched, e.dek.clone()))
            .collect()
    }

    /// Drop cached DEKs named `name` (all of them when `None`).
    pub fn forget(&self, name: Option<&str>) -> usize {
        let mut deks = self.deks();
        let before = deks.len();
        deks.retain(|e| name.is_some_and(|n| n != e.name));
        before - deks.len()
    }
}

/// Make room in a full cache: drop the entries fetched before `expired_before`,
/// and if that frees nothing, the older half. The dropped DEKs and cipher keys
/// are zeroized as they go.
fn evict(deks: &mut DekMap, max: usize, expired_before: f64) {
    deks.retain(|e| e.fetched > expired_before);
    if deks.len() < max {
        return;
    }
    let mut times: Vec<f64> = deks.iter().map(|e| e.fetched).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let cutoff = times[(max / 2).min(times.len() - 1)];
    deks.retain(|e| e.fetched > cutoff);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::TESTING_KEK;

    const POLICY: DekPolicy = DekPolicy {
        timeout: 3600.0,
        passphrase: b"key management facility",
        dek_length: 128,
    };

    #[test]
    fn generate_then_unwrap_and_cache() {
        let f = Facility::new(8);
        let new = f.generate(1024, 65537, POLICY.passphrase, 64).unwrap();
        assert_eq!(new.name, kek_name(&new.pem));
        assert_eq!(new.wrapped.len(), 128);
        assert!(f.cached_dek(&new.pem, POLICY.timeout, 1.0).is_none());
        let dek = f
            .unwrap(&new.pem, &new.name, &new.wrapped, &POLICY, KeyState::Active)
            .unwrap();
        assert_eq!(dek.len(), 64);
        assert_eq!(
            f.cached_dek(&new.pem, POLICY.timeout, 60.0),
            Some((dek, Ok(KeyState::Active)))
        );
        assert!(
            f.cached_dek(&new.pem, 0.0, 60.0).is_none(),
            "older than a zero timeout"
        );
        assert!(f
            .cached_cipher(&new.pem, 0.0, b"12345678", 60.0)
            .unwrap()
            .is_none());
        assert!(f
            .cached_cipher(&new.pem, 60.0, b"12345678", 60.0)
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_damaged_wrapped_dek_names_the_key() {
        let f = Facility::new(8);
        let err = f
            .unwrap(TESTING_KEK, "abc", &[0u8; 64], &POLICY, KeyState::Active)
            .expect_err("refused");
        assert!(
            matches!(&err, KmiError::BadData(m) if m.starts_with("key abc: ")),
            "{err:?}"
        );
        assert!(f.cached_dek(TESTING_KEK, 60.0, 60.0).is_none());
    }

    #[test]
    fn the_state_is_cached_and_read_again_when_old() {
        let f = Facility::new(8);
        let new = f.generate(1024, 65537, POLICY.passphrase, 64).unwrap();
        assert_eq!(
            new.kid,
            *V2Key::new(
                &f.unwrap(
                    &new.pem,
                    &new.name,
                    &new.wrapped,
                    &POLICY,
                    KeyState::Deactivated
                )
                .unwrap()
            )
            .kid()
        );
        let state = |age| f.cached_v2(&new.pem, 60.0, age).map(|(_, state)| state);
        assert_eq!(state(60.0), Some(Ok(KeyState::Deactivated)));
        assert_eq!(state(0.0), Some(Err(new.name.clone())));
        f.set_state(&new.pem, KeyState::Suspended);
        assert_eq!(state(60.0), Some(Ok(KeyState::Suspended)));
        assert!(f.cached_v2(b"other", 60.0, 60.0).is_none());
        assert!(KeyState::Deactivated.allows(false) && !KeyState::Deactivated.allows(true));
        assert!(!KeyState::Suspended.allows(false) && KeyState::Active.allows(true));
        for s in [
            "active",
            "deactivated",
            "suspended",
            "compromised",
            "destroyed",
        ] {
            assert_eq!(KeyState::parse(s).unwrap().as_str(), s);
        }
        assert!(KeyState::parse("gone").is_err());
    }

    #[test]
    fn rewrap_keeps_the_dek_under_a_new_kek() {
        let f = Facility::new(8);
        let old = f.generate(1024, 65537, POLICY.passphrase, 64).unwrap();
        let new = f
            .rewrap(&old.pem, &old.name, &old.wrapped, &POLICY, 65537)
            .unwrap();
        assert_ne!(new.name, old.name);
        assert_eq!(new.kid, old.kid);
        assert_ne!(new.fingerprint, old.fingerprint);
        let a = unwrap_with(&old.pem, &old.name, &old.wrapped, &POLICY).unwrap();
        let b = unwrap_with(&new.pem, &new.name, &new.wrapped, &POLICY).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn cache_stays_bounded() {
        let f = Facility::new(4);
        for i in 0..20u8 {
            f.remember(
                &[i],
                format!("n{i}"),
                i as f64 + now(),
                Zeroizing::new(vec![i]),
                3600.0,
                KeyState::Active,
            );
            assert!(f.deks().len() <= 4);
        }
        assert!(find(&mut f.deks(), KekId::from(&[19u8])).is_some());
        // Expired entries go first: a short timeout frees everything older.
        let g = Facility::new(2);
        let active = KeyState::Active;
        g.remember(
            b"a",
            "a".into(),
            now(),
            Zeroizing::new(vec![0]),
            3600.0,
            active,
        );
        g.remember(
            b"b",
            "b".into(),
            now(),
            Zeroizing::new(vec![0]),
            3600.0,
            active,
        );
        g.remember(
            b"c",
            "c".into(),
            now() + 100.0,
            Zeroizing::new(vec![0]),
            1.0,
            active,
        );
        assert_eq!(g.cached_deks().len(), 1);
        assert_eq!(f.forget(Some("n19")), 1);
        f.forget(None);
        assert!(f.cached_deks().is_empty());
    }
}
