//! glibc malloc settings: the only unsafe code of the control plane.

/// glibc's malloc keeps what a push's transient buffers freed resident: after a large free its
/// mmap threshold grows (up to 32 MB), so later large buffers come from the heap and fragment
/// it, and each thread's arena holds its own free memory. Fixed thresholds and two arenas let
/// freed memory go back to the system (`sluice serve` with 1000 Delta clients of a
/// 1000-service mesh: 256 → 183 MB RSS; BENCHMARKS.md). Call first in `main`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune() {
    const THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only sets allocator parameters; it runs first in main, before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
    }
}

/// [`tune`] where the allocator is not glibc's: nothing to set.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}

/// Gives the free pages inside the heap back to the system. The trim threshold only returns the
/// top of the heap; what many closed streams freed in the middle stays resident until this.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: malloc_trim takes the allocator's own locks; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`trim`] where the allocator is not glibc's: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

/// When to [`trim`], from a look now and then at how many streams have closed. Streams close
/// over a while and what they held is freed after them: a trim at the first look that saw
/// fewer streams came too early, and a look every few seconds missed a crowd that came and
/// went between two looks (2000 silent streams open for 3 s: RSS stayed at 113 MB after they
/// closed; `malloc_trim` a few seconds later took it to 48 MB). So the trim comes at the first
/// look after streams closed that saw none close since the look before.
#[derive(Debug, Default)]
pub struct TrimAfterStreams {
    previous: u64,
    trimmed: u64,
}

impl TrimAfterStreams {
    /// Takes the count of streams closed so far; true when it is time to trim.
    pub fn look(&mut self, closed: u64) -> bool {
        let settled = closed > self.trimmed && closed == self.previous;
        self.previous = closed;
        if settled {
            self.trimmed = closed;
        }
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::TrimAfterStreams;

    #[test]
    fn trims_once_streams_have_closed_and_no_more_are_closing() {
        let mut watch = TrimAfterStreams::default();
        let looks = [0, 0, 2000, 2000, 2000, 2100, 2500, 2500, 2501, 2501, 2501];
        let trims: Vec<usize> = looks.iter().enumerate().filter(|(_, n)| watch.look(**n)).map(|(i, _)| i).collect();
        // 2000 closed between looks 1 and 2 (settled at 3); 500 more by look 6 (settled at 7); one at 8.
        assert_eq!(trims, [3, 7, 9]);
    }
}
