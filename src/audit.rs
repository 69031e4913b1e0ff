//! The audit log's file (keas.kmi.audit): JSON lines appended under an
//! exclusive `flock`, each carrying the SHA-256 that chains it to the one
//! before, so that every server process extends one chain.
//!
//! Why in Rust: a server answers key requests from many threads, and every
//! request appends an entry before it is answered. Done in Python, each of
//! the append's system calls (flock, fstat, write) released the GIL while the
//! append lock was held, and the threads of a worker took turns waiting on
//! each other: measured under granian, half the requests a second with the
//! log on. Here the whole append is one call of a few microseconds that keeps
//! the GIL, as a single event-loop thread would.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest, Sha256};

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What links an entry to the one before: SHA-256 of `prev`, `seq` and the
/// entry's fields (the JSON text that keas.kmi.audit.entry_fields makes).
pub fn chain_hash(prev: &str, seq: u64, body: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(prev.as_bytes());
    hash.update(format!("\n{seq}\n").as_bytes());
    hash.update(body.as_bytes());
    hex::encode(hash.finalize())
}

/// The line of an entry: its fields, then the chain, last (so that the head
/// of the log can be read from its last bytes).
pub fn line(body: &str, seq: u64, prev: &str) -> String {
    let hash = chain_hash(prev, seq, body);
    let fields = body.strip_suffix('}').unwrap_or(body);
    format!("{fields},\"prev\":\"{prev}\",\"seq\":{seq},\"hash\":\"{hash}\"}}\n")
}

/// (seq, hash) from the end of a line this module wrote, if it is one.
fn parse_head(tail: &[u8]) -> Option<(u64, String)> {
    let text = std::str::from_utf8(tail).ok()?;
    let text = text.strip_suffix("\"}\n")?;
    let (rest, hash) = text.split_at(text.len().checked_sub(64)?);
    if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let rest = rest.strip_suffix(",\"hash\":\"")?;
    let seq = &rest[rest.rfind("\"seq\":")? + 6..];
    Some((seq.parse().ok()?, hash.to_owned()))
}

struct Open {
    file: File,
    /// The file's size after our last append, or None when unknown.
    end: Option<u64>,
    head: (u64, String),
    unsynced: bool,
}

pub struct AuditFile {
    path: PathBuf,
    open: Mutex<Option<Open>>,
}

/// An exclusive `flock` on a file, released on drop.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn new(file: &'a File) -> io::Result<Flock<'a>> {
        loop {
            // SAFETY: flock on a descriptor the File owns, alive for 'a.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Flock(file));
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor locked in `new`, still open.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl AuditFile {
    pub fn new(path: impl Into<PathBuf>) -> AuditFile {
        AuditFile {
            path: path.into(),
            open: Mutex::new(None),
        }
    }

    fn state(&self) -> MutexGuard<'_, Option<Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append the entry whose fields are `body`; fsync it with `sync`.
    /// Returns its (seq, prev, hash). On an error nothing of it stays in the file.
    pub fn append(&self, body: &str, sync: bool) -> io::Result<(u64, String, String)> {
        let mut state = self.state();
        if state.is_none() {
            if let Some(folder) = self.path.parent() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(folder)?;
            }
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.path)?;
            *state = Some(Open {
                file,
                end: None,
                head: (0, GENESIS.to_owned()),
                unsynced: false,
            });
        }
        let open = state.as_mut().expect("opened");
        let _lock = Flock::new(&open.file)?;
        let mut size = open.file.metadata()?.len();
        if Some(size) != open.end {
            // Another process wrote since: find the head it left.
            let (head, valid) = self.read_head(&open.file, size)?;
            open.head = head;
            size = valid;
        }
        let seq = open.head.0 + 1;
        let prev = std::mem::take(&mut open.head.1);
        let text = line(body, seq, &prev);
        let written = (|| {
            use std::io::Write;
            (&open.file).write_all(text.as_bytes())?;
            if sync {
                open.file.sync_data()?;
            }
            Ok(())
        })();
        if let Err(error) = written {
            // Leave no partial entry behind: the chain stays whole.
            let _ = open.file.set_len(size);
            open.end = None;
            open.head.1 = prev;
            return Err(error);
        }
        let hash = text[text.len() - 67..text.len() - 3].to_owned();
        open.end = Some(size + text.len() as u64);
        open.head = (seq, hash.clone());
        open.unsynced |= !sync;
        Ok((seq, prev, hash))
    }

    /// (head, size of the valid part): a partial last line, left by a crash in
    /// the middle of a write (never acknowledged), is cut off first.
    fn read_head(&self, file: &File, size: u64) -> io::Result<((u64, String), u64)> {
        if size == 0 {
            return Ok(((0, GENESIS.to_owned()), 0));
        }
        let mut span = 256u64;
        loop {
            let start = size.saturating_sub(span);
            let mut tail = vec![0u8; (size - start) as usize];
            file.read_exact_at(&mut tail, start)?;
            let mut valid = size;
            if tail.last() != Some(&b'\n') {
                match tail.iter().rposition(|b| *b == b'\n') {
                    Some(cut) => {
                        valid = start + cut as u64 + 1;
                        tail.truncate(cut + 1);
                    }
                    None if start > 0 => {
                        span *= 16;
                        continue;
                    }
                    None => {
                        file.set_len(0)?;
                        return Ok(((0, GENESIS.to_owned()), 0));
                    }
                }
                file.set_len(valid)?;
            }
            if let Some(head) = parse_head(&tail) {
                return Ok((head, valid));
            }
            return Err(io::Error::other(format!(
                "the audit log {} ends in a damaged entry: run kmi audit verify",
                self.path.display()
            )));
        }
    }

    /// fsync what was appended and not yet synced. The fsync itself runs on
    /// a duplicate of the descriptor, without the lock: it takes milliseconds
    /// here, and appends go on meanwhile.
    pub fn flush(&self) -> io::Result<()> {
        let file = {
            let mut state = self.state();
            match state.as_mut() {
                Some(open) if open.unsynced => {
                    open.unsynced = false;
                    open.file.try_clone()?
                }
                _ => return Ok(()),
            }
        };
        file.sync_data()
    }

    /// Close the file (it is opened again by the next append).
    pub fn close(&self) -> io::Result<()> {
        self.flush()?;
        *self.state() = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let mut n = [0u8; 6];
        getrandom::fill(&mut n).unwrap();
        std::env::temp_dir().join(format!("kmi-audit-{tag}-{}.jsonl", hex::encode(n)))
    }

    #[test]
    fn appends_chain_and_survive_a_reopen_and_a_torn_line() {
        let path = temp("chain");
        let log = AuditFile::new(&path);
        let (s1, p1, h1) = log.append(r#"{"event":"a"}"#, false).unwrap();
        let (s2, p2, h2) = log.append(r#"{"event":"b"}"#, true).unwrap();
        assert_eq!((s1, s2), (1, 2));
        assert_eq!((p1.as_str(), p2.as_str()), (GENESIS, h1.as_str()));
        assert_eq!(h2, chain_hash(&h1, 2, r#"{"event":"b"}"#));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().nth(1).unwrap(),
            format!(r#"{{"event":"b","prev":"{h1}","seq":2,"hash":"{h2}"}}"#)
        );
        // Another writer (a new process) finds the head; a torn line goes.
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"event\":\"c\",\"pr")
            .unwrap();
        let other = AuditFile::new(&path);
        let (s3, p3, _) = other.append(r#"{"event":"d"}"#, false).unwrap();
        assert_eq!((s3, p3), (3, h2));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        // The first writer notices the other's entry.
        assert_eq!(log.append("{}", false).unwrap().0, 4);
        log.close().unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_head_is_parsed_from_the_end_only() {
        let l = line(r#"{"x":"\"seq\":9"}"#, 12, GENESIS);
        let (seq, hash) = parse_head(l.as_bytes()).unwrap();
        assert_eq!(seq, 12);
        assert_eq!(hash, chain_hash(GENESIS, 12, r#"{"x":"\"seq\":9"}"#));
        assert!(parse_head(b"{\"seq\":1}\n").is_none());
    }
}
