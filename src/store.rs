//! The storage directory: one `<md5hex(KEK)>.dek` file per wrapped DEK,
//! written atomically and durably, with a cache of file contents.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::errors::{KmiError, KmiResult};

const SUFFIX: &str = ".dek";
/// Temporary files start with this, so no listing ever mistakes one for a key.
const TMP_PREFIX: &str = ".tmp-";

pub struct DekStore {
    dir: PathBuf,
    contents: Mutex<HashMap<String, Arc<[u8]>>>,
    max_cached: usize,
}

/// A name is a plain file name: no separators, no `..`, no NUL, not empty.
pub fn check_name(name: &str) -> KmiResult<()> {
    if name.is_empty()
        || name.contains(['/', '\\', '\0'])
        || name.contains("..")
        || name.starts_with('.')
    {
        return Err(KmiError::NotFound(format!("invalid key name {name:?}")));
    }
    Ok(())
}

/// A temporary this old was left by a writer that died (SIGKILL, power loss);
/// a live writer renames its temporary within milliseconds.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(600);

/// Delete temporaries that crashed writers left behind. Best effort: the
/// listing never shows them anyway.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_tmp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TMP_PREFIX));
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMPORARY);
        if is_tmp && stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl DekStore {
    /// Open (and create, mode 0700, if missing) a storage directory.
    pub fn open(dir: impl Into<PathBuf>, max_cached: usize) -> KmiResult<DekStore> {
        let dir = dir.into();
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
        }
        remove_stale_temporaries(&dir);
        Ok(DekStore {
            dir,
            contents: Mutex::new(HashMap::new()),
            max_cached,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{SUFFIX}"))
    }

    /// Names of the stored DEKs (file names without `.dek`).
    pub fn names(&self) -> KmiResult<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let file_name = entry?.file_name();
            if let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) {
                if check_name(name).is_ok() {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    pub fn contains(&self, name: &str) -> bool {
        check_name(name).is_ok() && (self.lock().contains_key(name) || self.path(name).is_file())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<[u8]>>> {
        self.contents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The wrapped DEK stored under `name`.
    pub fn get(&self, name: &str) -> KmiResult<Arc<[u8]>> {
        check_name(name)?;
        if let Some(data) = self.lock().get(name) {
            return Ok(data.clone());
        }
        let data: Arc<[u8]> = match fs::read(self.path(name)) {
            Ok(d) => d.into(),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(KmiError::NotFound(name.to_owned()))
            }
            Err(e) => return Err(e.into()),
        };
        let mut cache = self.lock();
        if cache.len() >= self.max_cached {
            cache.clear();
        }
        cache.insert(name.to_owned(), data.clone());
        Ok(data)
    }

    /// Store `data` under `name`: write a temporary file, fsync it, rename it
    /// into place, fsync the directory. When this returns, the DEK is durable.
    pub fn put(&self, name: &str, data: &[u8]) -> KmiResult<()> {
        check_name(name)?;
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| KmiError::Io(std::io::Error::other(e)))?;
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{name}-{}", hex::encode(nonce)));
        let written = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, self.path(name))?;
            File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        self.lock().remove(name);
        Ok(())
    }

    pub fn remove(&self, name: &str) -> KmiResult<()> {
        check_name(name)?;
        self.lock().remove(name);
        match fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(KmiError::NotFound(name.to_owned())),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let mut n = [0u8; 6];
        getrandom::fill(&mut n).unwrap();
        std::env::temp_dir().join(format!("kmi-store-{tag}-{}", hex::encode(n)))
    }

    #[test]
    fn put_get_list_remove() {
        let dir = temp_dir("basic");
        let store = DekStore::open(&dir, 16).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        store.put("abc", b"wrapped").unwrap();
        assert_eq!(&*store.get("abc").unwrap(), b"wrapped");
        assert_eq!(store.names().unwrap(), vec!["abc".to_owned()]);
        assert!(store.contains("abc"));
        let mode = fs::metadata(dir.join("abc.dek"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        store.remove("abc").unwrap();
        assert!(!store.contains("abc"));
        assert!(matches!(store.get("abc"), Err(KmiError::NotFound(_))));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn names_outside_the_directory_are_refused() {
        let dir = temp_dir("names");
        let store = DekStore::open(&dir, 16).unwrap();
        for bad in ["", "../x", "a/b", "..", "x\0y", ".tmp-abc"] {
            assert!(
                matches!(store.get(bad), Err(KmiError::NotFound(_))),
                "{bad:?}"
            );
            assert!(store.put(bad, b"x").is_err(), "{bad:?}");
            assert!(!store.contains(bad));
        }
        fs::write(dir.join(".tmp-abc-0011"), b"partial").unwrap();
        assert!(store.names().unwrap().is_empty());
        // A fresh temporary may belong to a live writer: opening keeps it;
        // an old one is removed.
        DekStore::open(&dir, 16).unwrap();
        assert!(dir.join(".tmp-abc-0011").exists());
        let old = std::time::SystemTime::now() - 2 * STALE_TEMPORARY;
        File::options()
            .write(true)
            .open(dir.join(".tmp-abc-0011"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        DekStore::open(&dir, 16).unwrap();
        assert!(!dir.join(".tmp-abc-0011").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    use std::os::unix::fs::PermissionsExt;
}
