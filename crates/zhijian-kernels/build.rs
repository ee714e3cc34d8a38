//! Compiles `cpp/kernels.cpp` against LibTorch's headers, the way torch-sys
//! compiles its own shim: the same C++ standard and `_GLIBCXX_USE_CXX11_ABI`
//! (torch-sys's default of 1 unless `LIBTORCH_CXX11_ABI` says otherwise).
//! Only ATen's operator headers are included, which keeps the compile short.
use std::path::PathBuf;

fn main() {
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports where LibTorch's libraries are"));
    let include = lib.parent().expect("LibTorch's lib folder has a parent").join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("cpp/kernels.cpp")
        .compile("zhijian_kernels");
    // The tests of this crate link LibTorch too: give them its rpath.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rerun-if-changed=cpp/kernels.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
}
