//! Build script of mla-trainer: the libtorch link setup shared with the model crate
//! (model/build.rs: rpath, forced libtorch_cuda link), plus the C++ shim over libtorch
//! (src/cxx/shim.cpp: fused AdamW, foreach norm/scale, setting `.grad`) compiled with the
//! flags torch-sys uses for its own C++ (`-std=c++17`, the same `_GLIBCXX_USE_CXX11_ABI`).
//! Reruns only when the shim, the libtorch location or the ABI setting change.

mod link {
    include!("../model/build.rs");

    pub fn libtorch() {
        main();
    }
}

const SHIM: &str = "src/cxx/shim.cpp";

fn main() {
    link::libtorch();
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        // torch-sys built without libtorch (doc-only): nothing to compile against.
        return;
    };
    let include = std::path::Path::new(&lib_dir).join("../include");
    // torch-sys's default for a PyTorch install; it honours the same variable.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .file(SHIM)
        .compile("mla_shim");
}
