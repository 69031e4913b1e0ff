//! The storage directory, the embedded key store: one `<name>.dek` file per
//! wrapped DEK, written once, atomically and durably, and beside it an
//! optional `<name>.meta` sidecar that is replaced atomically.
//!
//! The reference keas.kmi lists only `*.dek` files, so it still reads a
//! directory this store wrote.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::errors::{KmiError, KmiResult};

const DEK_SUFFIX: &str = ".dek";
const META_SUFFIX: &str = ".meta";
/// Temporary files start with this, so no listing ever mistakes one for a key.
const TMP_PREFIX: &str = ".tmp-";

pub struct DekStore {
    dir: PathBuf,
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

/// How a finished temporary file takes its final name.
#[derive(Clone, Copy)]
enum Publish {
    /// `link(2)`: fails if the name exists, so a key is never overwritten.
    Once,
    /// `rename(2)`: atomically replaces what was there (metadata sidecars).
    Replace,
}

fn read_optional(path: &Path) -> KmiResult<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl DekStore {
    /// Open (and create, mode 0700, if missing) a storage directory.
    pub fn open(dir: impl Into<PathBuf>) -> KmiResult<DekStore> {
        let dir = dir.into();
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
        }
        remove_stale_temporaries(&dir);
        Ok(DekStore { dir })
    }

    fn path(&self, name: &str, suffix: &str) -> PathBuf {
        self.dir.join(format!("{name}{suffix}"))
    }

    /// Names of the stored DEKs (file names without `.dek`).
    pub fn names(&self) -> KmiResult<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let file_name = entry?.file_name();
            if let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(DEK_SUFFIX)) {
                if check_name(name).is_ok() {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    /// Names that have a metadata sidecar, with or without a DEK beside it
    /// (a destroyed key keeps its metadata).
    pub fn meta_names(&self) -> KmiResult<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let file_name = entry?.file_name();
            if let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(META_SUFFIX)) {
                if check_name(name).is_ok() {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    pub fn contains(&self, name: &str) -> bool {
        check_name(name).is_ok() && self.path(name, DEK_SUFFIX).is_file()
    }

    /// The wrapped DEK stored under `name`.
    pub fn get(&self, name: &str) -> KmiResult<Vec<u8>> {
        check_name(name)?;
        read_optional(&self.path(name, DEK_SUFFIX))?.ok_or_else(|| KmiError::NotFound(name.into()))
    }

    /// Store `data` under `name`, once: when this returns, the DEK is durable.
    /// A name that holds the same bytes already is success (so a copy can be
    /// repeated); one that holds other bytes is [`KmiError::Exists`], and the
    /// stored key is untouched.
    pub fn put(&self, name: &str, data: &[u8]) -> KmiResult<()> {
        check_name(name)?;
        let target = self.path(name, DEK_SUFFIX);
        match self.publish(name, data, &target, Publish::Once) {
            Err(KmiError::Io(e)) if e.kind() == ErrorKind::AlreadyExists => {
                if read_optional(&target)?.as_deref() == Some(data) {
                    Ok(())
                } else {
                    Err(KmiError::Exists(name.into()))
                }
            }
            other => other,
        }
    }

    /// The metadata sidecar of `name`, if it has one.
    pub fn get_meta(&self, name: &str) -> KmiResult<Option<Vec<u8>>> {
        check_name(name)?;
        read_optional(&self.path(name, META_SUFFIX))
    }

    /// Replace the metadata sidecar of `name` atomically and durably.
    pub fn put_meta(&self, name: &str, data: &[u8]) -> KmiResult<()> {
        check_name(name)?;
        self.publish(name, data, &self.path(name, META_SUFFIX), Publish::Replace)
    }

    /// Write a temporary file, fsync it, give it its final name, fsync the
    /// directory. The temporary is gone afterwards, whatever happened.
    fn publish(&self, name: &str, data: &[u8], target: &Path, how: Publish) -> KmiResult<()> {
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
            match how {
                Publish::Once => fs::hard_link(&tmp, target)?,
                Publish::Replace => fs::rename(&tmp, target)?,
            }
            File::open(&self.dir)?.sync_all()
        })();
        let _ = fs::remove_file(&tmp);
        Ok(written?)
    }

    /// Delete the DEK of `name` (and its metadata when `with_meta`), durably.
    /// `NotFound` when there was nothing to delete.
    pub fn remove(&self, name: &str, with_meta: bool) -> KmiResult<()> {
        check_name(name)?;
        let mut removed = remove_optional(&self.path(name, DEK_SUFFIX))?;
        if with_meta {
            removed |= remove_optional(&self.path(name, META_SUFFIX))?;
        }
        if !removed {
            return Err(KmiError::NotFound(name.to_owned()));
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

/// Whether `path` was there to remove.
fn remove_optional(path: &Path) -> KmiResult<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let mut n = [0u8; 6];
        getrandom::fill(&mut n).unwrap();
        std::env::temp_dir().join(format!("kmi-store-{tag}-{}", hex::encode(n)))
    }

    #[test]
    fn put_get_list_remove() {
        let dir = temp_dir("basic");
        let store = DekStore::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        store.put("abc", b"wrapped").unwrap();
        assert_eq!(store.get("abc").unwrap(), b"wrapped");
        assert_eq!(store.names().unwrap(), vec!["abc".to_owned()]);
        assert!(store.contains("abc"));
        let mode = fs::metadata(dir.join("abc.dek"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        store.remove("abc", false).unwrap();
        assert!(!store.contains("abc"));
        assert!(matches!(store.get("abc"), Err(KmiError::NotFound(_))));
        assert!(matches!(
            store.remove("abc", false),
            Err(KmiError::NotFound(_))
        ));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keys_are_written_once() {
        let dir = temp_dir("once");
        let store = DekStore::open(&dir).unwrap();
        store.put("abc", b"first").unwrap();
        store.put("abc", b"first").unwrap();
        assert!(matches!(
            store.put("abc", b"second"),
            Err(KmiError::Exists(_))
        ));
        assert_eq!(store.get("abc").unwrap(), b"first");
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary is left behind");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn metadata_sidecars_are_replaced_and_outlive_the_dek() {
        let dir = temp_dir("meta");
        let store = DekStore::open(&dir).unwrap();
        assert_eq!(store.get_meta("abc").unwrap(), None);
        store.put("abc", b"wrapped").unwrap();
        store.put_meta("abc", b"one").unwrap();
        store.put_meta("abc", b"two").unwrap();
        assert_eq!(store.get_meta("abc").unwrap().as_deref(), Some(&b"two"[..]));
        store.remove("abc", false).unwrap();
        assert_eq!(store.names().unwrap(), Vec::<String>::new());
        assert_eq!(store.meta_names().unwrap(), vec!["abc".to_owned()]);
        store.remove("abc", true).unwrap();
        assert!(store.meta_names().unwrap().is_empty());
        assert!(matches!(
            store.remove("abc", true),
            Err(KmiError::NotFound(_))
        ));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn names_outside_the_directory_are_refused() {
        let dir = temp_dir("names");
        let store = DekStore::open(&dir).unwrap();
        for bad in ["", "../x", "a/b", "..", "x\0y", ".tmp-abc"] {
            assert!(
                matches!(store.get(bad), Err(KmiError::NotFound(_))),
                "{bad:?}"
            );
            assert!(store.put(bad, b"x").is_err(), "{bad:?}");
            assert!(store.put_meta(bad, b"x").is_err(), "{bad:?}");
            assert!(!store.contains(bad));
        }
        fs::write(dir.join(".tmp-abc-0011"), b"partial").unwrap();
        assert!(store.names().unwrap().is_empty());
        // A fresh temporary may belong to a live writer: opening keeps it;
        // an old one is removed.
        DekStore::open(&dir).unwrap();
        assert!(dir.join(".tmp-abc-0011").exists());
        let old = std::time::SystemTime::now() - 2 * STALE_TEMPORARY;
        File::options()
            .write(true)
            .open(dir.join(".tmp-abc-0011"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        DekStore::open(&dir).unwrap();
        assert!(!dir.join(".tmp-abc-0011").exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
