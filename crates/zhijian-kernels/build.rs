//! Compiles the C++ shim (`cpp/*.cpp`) against LibTorch's headers, the way torch-sys
//! compiles its own shim: the same C++ standard and `_GLIBCXX_USE_CXX11_ABI`
//! (torch-sys's default of 1 unless `LIBTORCH_CXX11_ABI` says otherwise).
//! Always optimised: the kernels' loops run in debug-built tests too.
use std::path::PathBuf;

fn main() {
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports where LibTorch's libraries are"));
    let include = lib.parent().expect("LibTorch's lib folder has a parent").join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    // ATen's `parallel_for` is a header template: in a LibTorch built on
    // OpenMP it only runs on several threads where the caller is compiled
    // with OpenMP too, and links the OpenMP runtime LibTorch itself loads.
    let config = std::fs::read_to_string(include.join("ATen/Config.h")).unwrap_or_default();
    let openmp = config.contains("#define AT_PARALLEL_OPENMP 1");
    if openmp {
        build.flag("-fopenmp");
    }
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .opt_level(3)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("cpp/kernels.cpp")
        .file("cpp/residual_norm.cpp")
        .compile("zhijian_kernels");
    // After the static library, so the linker resolves its OpenMP calls.
    if openmp {
        let shipped = std::fs::read_dir(&lib)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|name| name.starts_with("libgomp") && name.contains(".so"));
        match shipped {
            Some(name) => {
                println!("cargo:rustc-link-search=native={}", lib.display());
                println!("cargo:rustc-link-lib=dylib:+verbatim={name}");
            }
            None => println!("cargo:rustc-link-lib=gomp"),
        }
    }
    // The tests of this crate link LibTorch too: give them its rpath.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rerun-if-changed=cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
}
