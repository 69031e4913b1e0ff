//! The master key management facility: generates KEKs, keeps their wrapped
//! DEKs in a [`DekStore`], and caches unwrapped DEKs (and their expanded
//! AES keys) for `timeout` seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use zeroize::Zeroizing;

use crate::cipher::{derive_cipher_key, DataCipher};
use crate::errors::{KmiError, KmiResult};
use crate::kek::Kek;
use crate::store::DekStore;

/// What a caller passes on every DEK lookup: the facility's overridable attributes.
pub struct DekPolicy<'a> {
    /// Seconds a cached DEK stays valid (`timeout`).
    pub timeout: f64,
    /// Protects legacy-encrypted and PKCS#8 KEKs (`rsaPassphrase`).
    pub passphrase: &'a [u8],
    /// Acceptable DEK lengths besides `modulus_bits / 16` (`keyLength`).
    pub dek_length: usize,
}

/// A cached, unwrapped DEK and the cipher derived from it.
pub struct CachedDek {
    pub name: String,
    pub fetched: f64,
    pub dek: Zeroizing<Vec<u8>>,
    cipher: Option<(Vec<u8>, Arc<DataCipher>)>,
}

/// Cached DEKs by the exact KEK bytes (foldhash: the KEK is ~1.7 KB and hashed on every call).
type DekMap = HashMap<Box<[u8]>, CachedDek, foldhash::fast::RandomState>;

pub struct Facility {
    store: DekStore,
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

impl Facility {
    pub fn open(dir: &str, max_cached: usize) -> KmiResult<Facility> {
        let max_cached = max_cached.max(1);
        Ok(Facility {
            store: DekStore::open(dir, max_cached)?,
            deks: Mutex::new(HashMap::default()),
            max_cached,
        })
    }

    pub fn store(&self) -> &DekStore {
        &self.store
    }

    fn deks(&self) -> MutexGuard<'_, DekMap> {
        self.deks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Generate a KEK, wrap a fresh DEK of `dek_length` bytes with it, store
    /// the wrapped DEK durably, and return the KEK as legacy PEM.
    pub fn generate(
        &self,
        bits: usize,
        exponent: u64,
        passphrase: &[u8],
        dek_length: usize,
    ) -> KmiResult<(String, Vec<u8>)> {
        if dek_length == 0 {
            return Err(KmiError::BadArgument("keyLength must be positive".into()));
        }
        let kek = Kek::generate(bits, exponent)?;
        let pem = kek.to_legacy_pem(passphrase)?;
        let mut dek = Zeroizing::new(vec![0u8; dek_length]);
        getrandom::fill(&mut dek).map_err(|e| KmiError::Io(std::io::Error::other(e)))?;
        let wrapped = kek.wrap_dek(&dek)?;
        let name = kek_name(&pem);
        self.store.put(&name, &wrapped)?;
        Ok((name, pem))
    }

    fn lookup(&self, kek: &[u8], timeout: f64) -> Option<MutexGuard<'_, DekMap>> {
        let deks = self.deks();
        match deks.get(kek) {
            Some(entry) if entry.fetched + timeout > now() => Some(deks),
            _ => None,
        }
    }

    /// The unwrapped DEK for `kek`, from the cache if fresh, else from the store.
    /// Returns the DEK and whether it was fetched from the store (to log it).
    pub fn dek(
        &self,
        kek: &[u8],
        policy: &DekPolicy,
    ) -> KmiResult<(Zeroizing<Vec<u8>>, Option<String>)> {
        if let Some(deks) = self.lookup(kek, policy.timeout) {
            return Ok((deks[kek].dek.clone(), None));
        }
        // The .dek comes first: an unknown KEK is a KeyError without parsing it.
        let name = kek_name(kek);
        let wrapped = self.store.get(&name)?;
        let key = Kek::from_pem(kek, policy.passphrase)?;
        let lengths = [key.bits() / 16, policy.dek_length];
        let dek = key.unwrap_dek(&wrapped, &lengths).map_err(|e| match e {
            KmiError::BadData(m) => KmiError::BadData(format!("{name}.dek: {m}")),
            other => other,
        })?;
        self.remember(kek, name.clone(), now(), dek.clone(), policy.timeout);
        Ok((dek, Some(name)))
    }

    fn remember(
        &self,
        kek: &[u8],
        name: String,
        fetched: f64,
        dek: Zeroizing<Vec<u8>>,
        timeout: f64,
    ) {
        let mut deks = self.deks();
        if deks.len() >= self.max_cached && !deks.contains_key(kek) {
            evict(&mut deks, self.max_cached, fetched - timeout);
        }
        deks.insert(
            kek.into(),
            CachedDek {
                name,
                fetched,
                dek,
                cipher: None,
            },
        );
    }

    /// The data cipher for `kek` under `salt` if its DEK is cached and fresh:
    /// derived once per cached DEK, so a hit costs a hash lookup.
    pub fn cached_cipher(
        &self,
        kek: &[u8],
        timeout: f64,
        salt: &[u8],
    ) -> KmiResult<Option<Arc<DataCipher>>> {
        let Some(mut deks) = self.lookup(kek, timeout) else {
            return Ok(None);
        };
        let entry = deks.get_mut(kek).expect("looked up");
        if let Some((s, c)) = &entry.cipher {
            if s == salt {
                return Ok(Some(c.clone()));
            }
        }
        let cipher = Arc::new(DataCipher::new(&*derive_cipher_key(&entry.dek, salt)?));
        entry.cipher = Some((salt.to_vec(), cipher.clone()));
        Ok(Some(cipher))
    }

    /// The data cipher for `kek` under `salt`, unwrapping the DEK if it is not
    /// cached. Also returns the name when the DEK was fetched from the store.
    pub fn cipher(
        &self,
        kek: &[u8],
        policy: &DekPolicy,
        salt: &[u8],
    ) -> KmiResult<(Arc<DataCipher>, Option<String>)> {
        if let Some(cipher) = self.cached_cipher(kek, policy.timeout, salt)? {
            return Ok((cipher, None));
        }
        let (dek, fetched) = self.dek(kek, policy)?;
        let cipher = Arc::new(DataCipher::new(&*derive_cipher_key(&dek, salt)?));
        if let Some(entry) = self.deks().get_mut(kek) {
            entry.cipher = Some((salt.to_vec(), cipher.clone()));
        }
        Ok((cipher, fetched))
    }

    /// A snapshot of the DEK cache: (md5 name, fetch time, DEK).
    pub fn cached_deks(&self) -> Vec<(String, f64, Zeroizing<Vec<u8>>)> {
        self.deks()
            .values()
            .map(|e| (e.name.clone(), e.fetched, e.dek.clone()))
            .collect()
    }

    /// Drop cached DEKs named `name` (all of them when `None`).
    pub fn forget(&self, name: Option<&str>) -> usize {
        let mut deks = self.deks();
        let before = deks.len();
        deks.retain(|_, e| name.is_some_and(|n| n != e.name));
        before - deks.len()
    }
}

/// Make room in a full cache: drop the entries fetched before `expired_before`,
/// and if that frees nothing, the older half. The dropped DEKs and cipher keys
/// are zeroized as they go.
fn evict<S: std::hash::BuildHasher>(
    deks: &mut HashMap<Box<[u8]>, CachedDek, S>,
    max: usize,
    expired_before: f64,
) {
    deks.retain(|_, e| e.fetched > expired_before);
    if deks.len() < max {
        return;
    }
    let mut times: Vec<f64> = deks.values().map(|e| e.fetched).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let cutoff = times[(max / 2).min(times.len() - 1)];
    deks.retain(|_, e| e.fetched > cutoff);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::TESTING_KEK;

    fn temp_dir() -> String {
        let mut n = [0u8; 6];
        getrandom::fill(&mut n).unwrap();
        std::env::temp_dir()
            .join(format!("kmi-facility-{}", hex::encode(n)))
            .to_string_lossy()
            .into_owned()
    }

    const POLICY: DekPolicy = DekPolicy {
        timeout: 3600.0,
        passphrase: b"key management facility",
        dek_length: 128,
    };

    #[test]
    fn generate_then_unwrap_and_cache() {
        let dir = temp_dir();
        let f = Facility::open(&dir, 8).unwrap();
        let (name, pem) = f.generate(1024, 65537, POLICY.passphrase, 64).unwrap();
        assert_eq!(name, kek_name(&pem));
        assert_eq!(f.store().get(&name).unwrap().len(), 128);
        let (dek, fetched) = f.dek(&pem, &POLICY).unwrap();
        assert_eq!(dek.len(), 64);
        assert_eq!(fetched.as_deref(), Some(name.as_str()));
        let (again, fetched) = f.dek(&pem, &POLICY).unwrap();
        assert_eq!(again, dek);
        assert!(fetched.is_none(), "second lookup comes from the cache");
        let expired = DekPolicy {
            timeout: 0.0,
            ..POLICY
        };
        assert!(f.dek(&pem, &expired).unwrap().1.is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_kek_is_not_found_before_parsing() {
        let dir = temp_dir();
        let f = Facility::open(&dir, 8).unwrap();
        assert!(matches!(
            f.dek(b"xxyz", &POLICY),
            Err(KmiError::NotFound(_))
        ));
        assert!(matches!(
            f.dek(TESTING_KEK, &POLICY),
            Err(KmiError::NotFound(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cache_stays_bounded() {
        let dir = temp_dir();
        let f = Facility::open(&dir, 4).unwrap();
        for i in 0..20u8 {
            f.remember(
                &[i],
                format!("n{i}"),
                i as f64 + now(),
                Zeroizing::new(vec![i]),
                3600.0,
            );
            assert!(f.deks().len() <= 4);
        }
        assert!(f.deks().contains_key(&[19u8][..]));
        // Expired entries go first: a short timeout frees everything older.
        let g = Facility::open(&dir, 2).unwrap();
        g.remember(b"a", "a".into(), now(), Zeroizing::new(vec![0]), 3600.0);
        g.remember(b"b", "b".into(), now(), Zeroizing::new(vec![0]), 3600.0);
        g.remember(
            b"c",
            "c".into(),
            now() + 100.0,
            Zeroizing::new(vec![0]),
            1.0,
        );
        assert_eq!(g.cached_deks().len(), 1);
        assert_eq!(f.forget(Some("n19")), 1);
        f.forget(None);
        assert!(f.cached_deks().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
