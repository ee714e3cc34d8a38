//! Shared build script of every package whose binaries or tests link LibTorch.
//!
//! torch-sys puts no rpath on Rust binaries, so without this a test fails with
//! `libtorch_cpu.so: cannot open shared object file`. `--no-as-needed -ltorch`
//! keeps `libtorch_cuda.so` in the link on GPU builds (tch-rs issue #980).
//! Each such package needs a direct `torch-sys` dependency for `DEP_TCH_LIBTORCH_LIB`.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch,--as-needed");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
}
