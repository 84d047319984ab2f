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
