//! Salts for v2 messages: fresh bytes from the OS CSPRNG, each handed out
//! once. A `getrandom(2)` call costs about 250 ns here, a quarter of sealing
//! a short message, so each thread fetches a page of them at a time.
//!
//! A salt must never repeat under one DEK: two messages would share their
//! key and GCM nonces. A forked child would inherit the parent's unused
//! bytes, so the page is mapped with `MADV_WIPEONFORK`: the kernel hands the
//! child a zeroed page, whose zero "filled" marker makes it fetch its own.
//! Where the kernel cannot do that, every salt is a `getrandom` call.

use std::cell::RefCell;
use std::io;

/// Bytes of OS randomness fetched at once (one page).
const PAGE: usize = 4096;
/// The page starts with this marker while its bytes are good to hand out.
const FILLED: u64 = 0x6b6d_6973_616c_7473; // "kmisalts"
/// Marker (8 bytes) and read position (8 bytes).
const HEAD: usize = 16;

/// Fill `out` with bytes from the OS CSPRNG that no other caller, in this
/// process or a fork of it, is ever given.
pub fn fill(out: &mut [u8]) -> io::Result<()> {
    if out.len() > (PAGE - HEAD) / 4 {
        return getrandom::fill(out).map_err(io::Error::other);
    }
    let pooled = POOL.try_with(|pool| match pool.try_borrow_mut().as_deref_mut() {
        Ok(Some(page)) => Some(page.take(out)),
        _ => None,
    });
    match pooled {
        Ok(Some(result)) => result,
        // No pool (an old kernel), or the thread is being torn down.
        _ => getrandom::fill(out).map_err(io::Error::other),
    }
}

thread_local! {
    static POOL: RefCell<Option<Page>> = RefCell::new(Page::map());
}

#[cfg(target_os = "linux")]
use linux::Page;

#[cfg(not(target_os = "linux"))]
enum Page {}

#[cfg(not(target_os = "linux"))]
impl Page {
    fn map() -> Option<Page> {
        None
    }

    fn take(&mut self, _: &mut [u8]) -> io::Result<()> {
        match *self {}
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::{FILLED, HEAD, PAGE};
    use std::io;
    use std::ptr::NonNull;

    /// One anonymous page, private to its thread, wiped in forked children.
    pub(super) struct Page {
        base: NonNull<u8>,
    }

    impl Page {
        pub(super) fn map() -> Option<Page> {
            // SAFETY: an anonymous private mapping of PAGE bytes at an
            // address the kernel chooses: no existing memory is affected.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return None;
            }
            // SAFETY: `base` is the page just mapped, PAGE bytes long.
            let wiped = unsafe { libc::madvise(base, PAGE, libc::MADV_WIPEONFORK) } == 0;
            if !wiped {
                // An old kernel: no pool, a getrandom call per salt instead.
                // SAFETY: unmapping the page mapped above, used by nothing.
                unsafe { libc::munmap(base, PAGE) };
                return None;
            }
            NonNull::new(base.cast()).map(|base| Page { base })
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: `base` is a live mapping of PAGE readable and writable
            // bytes, owned by this Page alone (thread-local, never shared),
            // and the &mut self borrow makes this the only reference to it.
            unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), PAGE) }
        }

        pub(super) fn take(&mut self, out: &mut [u8]) -> io::Result<()> {
            let page = self.bytes();
            let marker = u64::from_ne_bytes(page[..8].try_into().expect("8 bytes"));
            let mut at = usize::from_ne_bytes(page[8..16].try_into().expect("8 bytes"));
            if marker != FILLED || at < HEAD || at + out.len() > PAGE {
                page[..8].fill(0); // not good until the refill is complete
                getrandom::fill(&mut page[HEAD..]).map_err(io::Error::other)?;
                page[..8].copy_from_slice(&FILLED.to_ne_bytes());
                at = HEAD;
            }
            let end = at + out.len();
            out.copy_from_slice(&page[at..end]);
            page[at..end].fill(0); // handed out: never again
            page[8..16].copy_from_slice(&end.to_ne_bytes());
            Ok(())
        }
    }

    impl Drop for Page {
        fn drop(&mut self) {
            // SAFETY: the page this Page mapped; nothing refers to it after drop.
            unsafe { libc::munmap(self.base.as_ptr().cast(), PAGE) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn salts_never_repeat_across_refills_and_threads() {
        let draw = || {
            (0..1000)
                .map(|_| {
                    let mut s = [0u8; 24];
                    fill(&mut s).unwrap();
                    s
                })
                .collect::<Vec<_>>()
        };
        let mut all: Vec<[u8; 24]> = draw();
        let other = std::thread::spawn(draw).join().unwrap();
        all.extend(other);
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
        assert!(all.iter().all(|s| s != &[0u8; 24]));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_forked_child_draws_other_salts() {
        let mut parent = [0u8; 24];
        fill(&mut parent).unwrap(); // the pool now holds unused bytes
        let (mut next, mut seen_by_child) = ([0u8; 24], [0u8; 24]);
        let mut fds = [0i32; 2];
        // SAFETY: a pipe into a local array of two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only draws a salt, writes it to the pipe and
        // exits without running destructors or touching other threads' state.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut s = [0u8; 24];
            let ok = fill(&mut s).is_ok();
            // SAFETY: writing the local buffer to the pipe, then leaving.
            unsafe {
                libc::write(fds[1], s.as_ptr().cast(), 24);
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        fill(&mut next).unwrap();
        // SAFETY: reading 24 bytes into a local buffer; waiting for our child.
        unsafe {
            assert_eq!(
                libc::read(fds[0], seen_by_child.as_mut_ptr().cast(), 24),
                24
            );
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_ne!(
            seen_by_child, next,
            "the child was handed the parent's next salt"
        );
        assert_ne!(seen_by_child, [0u8; 24]);
    }
}
