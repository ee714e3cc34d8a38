//! End-to-end tests of the facade (one binary: each test binary links LibTorch).

mod compare;
mod conformance;
mod lazy;
mod merge;
mod mpnet;
mod multimodal;
mod pretrained;

/// LibTorch's default random generator is global to the process and the test
/// harness runs tests on parallel threads; tests whose results depend on the
/// random stream (initialisation, dropout, shuffling) hold this lock.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes `text` to `dir/name` (an experiment file of a test) and returns its path.
pub fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
